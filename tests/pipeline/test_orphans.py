"""Side parts (masks/, tokens/, regions/) of a batch whose done part was never written (a run
killed between the two writes) are removed before the next run redoes those rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.pipeline.state import remove_orphan_parts
from vlray.storage import list_files, locate


def _part(fs_write, path: str) -> None:
    fs_write(path, pa.table({"id": ["x"]}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_orphan_side_parts_are_removed_and_committed_ones_kept(where, tmp_path, request):
    if where == "local":
        root = str(tmp_path / "out")
        s3 = None

        def write(rel: str, table: pa.Table) -> None:
            path = tmp_path / "out" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    else:
        env = request.getfixturevalue("s3_env")
        root, s3 = f"s3://{env.bucket}/orphans", env.s3

        def write(rel: str, table: pa.Table) -> None:
            with env.fs.open(f"{env.bucket}/orphans/{rel}", "wb") as f:
                pq.write_table(table, f)

    for rel in (
        "embeddings/part-a.parquet",
        "masks/part-a.parquet",  # committed with its embeddings part
        "masks/part-b.parquet",  # the run died before embeddings/part-b
        "tokens/part-c.parquet",
        "regions/part-a.parquet",
        "regions/part-d.parquet",
        "errors/part-d.parquet",  # an errors part is not a done marker for side files
    ):
        _part(write, rel)
    output = locate(root, s3)
    assert remove_orphan_parts(output, "embeddings") == 3
    left = sorted(p.split("/orphans/")[-1].split("/out/")[-1] for p in list_files(output))
    assert left == [
        "embeddings/part-a.parquet",
        "errors/part-d.parquet",
        "masks/part-a.parquet",
        "regions/part-a.parquet",
    ]
    assert remove_orphan_parts(output, "embeddings") == 0
    # SAM alone: segmented/ is the done marker
    _part(write, "segmented/part-e.parquet")
    _part(write, "masks/part-e.parquet")
    _part(write, "masks/part-f.parquet")
    # masks/part-f, and masks/part-a + regions/part-a (no segmented/part-a)
    assert remove_orphan_parts(output, "segmented") == 3
