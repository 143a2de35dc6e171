"""input.keep_columns from Parquet: the kept cells survive the stages' NumPy batches and land in
embeddings/ typed exactly as in the input."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.config import InputConfig
from vlray.pipeline.files import ReadStage, WriteStage
from vlray.pipeline.sources import InputError, plan_input
from vlray.storage import locate

KEPT = pa.schema(
    [
        ("caption", pa.string()),
        ("label", pa.int64()),
        ("tags", pa.list_(pa.string())),
        ("taken", pa.timestamp("ms")),
    ]
)


def _input(tmp_path) -> pa.Table:
    n = 5
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "image": [b"not decoded here"] * n,
            "caption": ["a", None, "c", "d", "é"],
            "label": pa.array([1, None, 3, 2**40, 5], pa.int64()),
            "tags": [["x"], [], None, ["y", "z"], ["w"]],
            "taken": pa.array(
                [datetime.datetime(2024, 1, i + 1) for i in range(n)], pa.timestamp("ms")
            ),
            "unused": [0.5] * n,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=3)
    return table


def test_kept_columns_reach_embeddings_with_their_types(tmp_path):
    table = _input(tmp_path)
    config = InputConfig(uri=str(tmp_path / "in.parquet"), keep_columns=tuple(KEPT.names))
    plan = plan_input(config)
    assert plan.kept == KEPT
    stage = ReadStage(plan.root, config)
    rows = pa.concat_tables(t for task in plan.tasks for t in stage({"task": [task]}))
    # as the stages hand it on: NumPy columns (object arrays), rows reordered
    order = np.array([4, 2, 0, 3, 1])
    batch = {c: rows.column(c).to_numpy(zero_copy_only=False)[order] for c in rows.column_names}
    n = len(order)
    batch.update(
        embedding=np.ones((n, 4), np.float32),
        width=np.full(n, 7),
        height=np.full(n, 9),
        error=np.array(["", "", "bad", "", ""], dtype=object),
        stage=np.array(["", "", "decode", "", ""], dtype=object),
        decode_s=np.zeros(n),
    )
    out = locate(str(tmp_path / "out"))
    counts = WriteStage(out, 4, "float32")(batch)
    assert int(counts["embedded"][0]) == 4 and int(counts["errors"][0]) == 1
    written = pq.read_table(tmp_path / "out" / "embeddings")
    assert written.schema.names == ["id", "embedding", "width", "height", *KEPT.names]
    assert written.select(KEPT.names).schema == KEPT
    expected = table.select(["id", *KEPT.names]).take([4, 2, 3, 1]).to_pylist()
    assert written.select(["id", *KEPT.names]).to_pylist() == expected


def test_kept_columns_the_input_lacks_are_one_line(tmp_path):
    _input(tmp_path)
    with pytest.raises(InputError, match=r"no column 'captoin' to keep"):
        plan_input(InputConfig(uri=str(tmp_path / "in.parquet"), keep_columns=("captoin",)))
    with pytest.raises(InputError, match=r"'image' cannot be kept"):
        plan_input(InputConfig(uri=str(tmp_path / "in.parquet"), keep_columns=("image",)))
    pq.write_table(
        pa.table({"id": ["o"], "image": [b"x"], "label": ["one"]}), tmp_path / "other.parquet"
    )
    with pytest.raises(InputError, match=r"kept column 'label' is string, int64 in an earlier"):
        plan_input(InputConfig(uri=str(tmp_path), keep_columns=("label",)))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="a folder of image files has no columns to keep"):
        plan_input(InputConfig(uri=str(tmp_path / "pics"), keep_columns=("caption",)))
