"""Hostile inputs, planner and read tasks only (no Ray): corrupt Parquet, odd column types,
ids, local fetches and folder listings. Every input row must come out exactly once."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.config import InputConfig, S3Config
from vlray.pipeline.files import ReadStage
from vlray.pipeline.sources import (
    InputError,
    ReadTask,
    group_ranges,
    plan_input,
    read_task_rows,
    resolve_path,
)
from vlray.pipeline.state import hash_ids
from vlray.storage import Location, TooLarge, fetch_bytes, locate


def _as_ray_row(task: ReadTask) -> dict:
    """A task as Ray's item table hands it to the read stage: sequences as NumPy arrays."""
    return {k: np.array(v) if isinstance(v, tuple) else v for k, v in asdict(task).items()}


def _rows(config: InputConfig, done: np.ndarray | None = None) -> tuple[list[dict], object]:
    """Plans ``config`` and runs its read tasks through the read stage; (rows, plan)."""
    plan = plan_input(config, done=done)
    stage = ReadStage(plan.root, config)
    tables = [t for task in plan.tasks for t in stage({"task": [_as_ray_row(task)]})]
    return [r for t in tables for r in t.to_pylist()], plan


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": [f"r{i}" for i in range(start, start + n)],
            "image": [bytes([i % 256]) * 40 for i in range(start, start + n)],
        }
    )


def _corrupt_page(path, row_group: int, column: int) -> None:
    """Overwrites the first page header of one column chunk."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))


# --- item 3: unreadable files and row groups ------------------------------------------------


def test_files_that_are_not_parquet_are_reported_and_the_rest_is_planned(tmp_path):
    pq.write_table(_table(5), tmp_path / "good.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty.parquet").write_bytes(b"")
    truncated = (tmp_path / "good.parquet").read_bytes()[:-30]
    (tmp_path / "cut.parquet").write_bytes(truncated)
    rows, plan = _rows(InputConfig(uri=str(tmp_path)))
    assert sorted(r["id"] for r in rows) == [f"r{i}" for i in range(5)] and plan.rows == 5
    assert len(plan.unreadable) == 3
    assert all("not a readable Parquet file" in line for line in plan.unreadable)
    for name in ("good.parquet", "cut.parquet"):
        (tmp_path / name).unlink()
    with pytest.raises(InputError, match="no readable Parquet file") as err:
        plan_input(InputConfig(uri=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_a_corrupt_row_group_is_read_error_rows_for_exactly_its_rows(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(_table(30), path, row_group_size=10)
    _corrupt_page(path, row_group=1, column=1)  # the image column of rows 10-19
    config = InputConfig(uri=str(path), rows_per_task=4, rows_per_block=3)
    rows, plan = _rows(config)
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(30))
    bad = {r["id"] for r in rows if r["error"]}
    assert bad == {f"r{i}" for i in range(10, 20)}
    assert all(r["stage"] == "read" and "row group 1" in r["error"] for r in rows if r["error"])
    # rows done by an earlier run are left out of the error rows too
    done = ["r12", "r13", "r3"]
    rows, plan = _rows(config, done=np.unique(hash_ids(done)))
    assert len(rows) == plan.rows == 27 and set(done).isdisjoint(r["id"] for r in rows)


def test_a_row_group_whose_ids_cannot_be_read_gets_the_derived_ids(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(_table(30), path, row_group_size=10)
    _corrupt_page(path, row_group=2, column=0)  # the id column of rows 20-29
    rows, plan = _rows(InputConfig(uri=str(path), rows_per_task=8))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 30
    assert {r["id"] for r in rows if r["error"]} == {f"x.parquet:{i}" for i in range(20, 30)}
    assert [t.id_error != "" for t in plan.tasks].count(True) == 2
    # the next run sees the same derived ids as done
    again, plan = _rows(InputConfig(uri=str(path)), done=np.unique(hash_ids(ids)))
    assert again == [] and plan.skipped == 30


# --- item 9: bounded read tasks -------------------------------------------------------------


def test_one_big_row_group_is_read_in_bounded_ranges(tmp_path):
    path = tmp_path / "one-group.parquet"
    pq.write_table(_table(1000), path)  # pyarrow's default: one row group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    config = InputConfig(uri=str(path), rows_per_task=96, rows_per_block=40)
    rows, plan = _rows(config)
    assert len(plan.tasks) == 11 and max(t.num_rows for t in plan.tasks) <= 96
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(1000)]
    assert all(r["data"] == bytes([int(r["id"][1:]) % 256]) * 40 for r in rows)
    assert rows[500]["source"].endswith("one-group.parquet#row=500")


def test_group_ranges_cover_every_row_and_cap_the_rereading():
    for rows, size in ((1000, 1 << 20), (7, 10), (256, 1), (10**6, 50 << 20)):
        ranges = group_ranges(rows, size, 256)
        assert sum(c for _, c in ranges) == rows
        assert [s for s, _ in ranges] == list(np.cumsum([0] + [c for _, c in ranges])[:-1])
    assert max(c for _, c in group_ranges(1000, 1 << 20, 256)) <= 256
    assert len(group_ranges(100_000, 20 << 30, 256)) == 4  # a 20 GB group: re-reading capped


# --- item 7: encodings and types of the image column ----------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        pa.array([b"a", b"b", None]).dictionary_encode(),
        pa.array([b"a", b"b", None], pa.binary_view()),
        pa.array([b"a", b"b", None], pa.large_binary()),
        pa.array([b"a", b"b", None], pa.binary(1)),
        pa.array(
            [{"bytes": b"a"}, {"bytes": b"b"}, None],
            pa.struct([("bytes", pa.dictionary(pa.int8(), pa.binary()))]),
        ),
    ],
    ids=["dictionary", "binary_view", "large_binary", "fixed_size_binary", "struct_dictionary"],
)
def test_valid_encodings_of_image_bytes_are_read(tmp_path, array):
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": array}), tmp_path / "t.parquet")
    rows, _ = _rows(InputConfig(uri=str(tmp_path)))
    assert [r["data"] for r in rows] == [b"a", b"b", None]
    assert rows[2]["error"] == "null image cell"


@pytest.mark.parametrize("typ", [pa.string_view(), pa.large_string(), "dictionary"])
def test_valid_encodings_of_image_paths_are_read(tmp_path, typ):
    names = ["img/a.jpg", "img/b.jpg"]
    array = pa.array(names).dictionary_encode() if typ == "dictionary" else pa.array(names, typ)
    pq.write_table(pa.table({"image": array}), tmp_path / "t.parquet")
    rows, _ = _rows(InputConfig(uri=str(tmp_path)))
    assert [r["uri"] for r in rows] == [str(tmp_path / n) for n in names]


@pytest.mark.parametrize(
    "array",
    [pa.array([1, 2]), pa.array([[b"a"], [b"b"]]), pa.array([{"x": b"a"}, {"x": b"b"}])],
    ids=["int", "list", "struct_without_bytes_or_path"],
)
def test_an_image_column_of_another_type_is_one_line_from_the_planner(tmp_path, array):
    pq.write_table(pa.table({"image": array}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="image column 'image': type") as err:
        plan_input(InputConfig(uri=str(tmp_path)))
    assert "\n" not in str(err.value) and "t.parquet" in str(err.value)


# --- item 6: ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (pa.array(["a\x00", "a", "\x00"]), ["a\x00", "a", "\x00"]),
        (pa.array([7, -1, 30], pa.int64()), ["7", "-1", "30"]),
        (pa.array([1, 2, 3], pa.uint8()).dictionary_encode(), ["1", "2", "3"]),
        (pa.array([b"x\x00", "é".encode(), b"z"]), ["x\x00", "é", "z"]),
        (pa.array(["a", "b", "c"], pa.large_string()), ["a", "b", "c"]),
    ],
    ids=["nul", "int", "dictionary_int", "utf8_binary", "large_string"],
)
def test_ids_are_kept_exactly(tmp_path, ids, expected):
    pq.write_table(pa.table({"id": ids, "image": [b"1", b"2", b"3"]}), tmp_path / "t.parquet")
    rows, plan = _rows(InputConfig(uri=str(tmp_path)))
    assert [r["id"] for r in rows] == expected and not any(r["error"] for r in rows)
    # and the done check of the next run knows them exactly
    _, plan = _rows(InputConfig(uri=str(tmp_path)), done=np.unique(hash_ids(expected[:1])))
    assert plan.skipped == 1 and plan.rows == 2


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (pa.array([b"\xff\xfe", b"a"]), "not valid UTF-8"),
        (pa.array([1.0, 2.5]), "type double cannot be an id"),
        (pa.array([[1], [2]]), "cannot be an id"),
    ],
    ids=["invalid_utf8", "float", "list"],
)
def test_ids_that_cannot_be_kept_are_one_line_from_the_planner(tmp_path, ids, message):
    pq.write_table(pa.table({"id": ids, "image": [b"1", b"2"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=message) as err:
        plan_input(InputConfig(uri=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_the_writer_stores_ids_with_nul_bytes_exactly(tmp_path):
    from vlray.pipeline.files import WriteStage

    ids = np.array(["a\x00", "b", "c\x00\x00"], dtype=object)
    batch = {
        "id": ids,
        "error": np.array(["", "", "bad"], dtype=object),
        "stage": np.array(["", "", "decode"], dtype=object),
        "source": np.array(["s"] * 3, dtype=object),
        "embedding": np.ones((3, 4), np.float32),
        "width": np.ones(3, np.int32),
        "height": np.ones(3, np.int32),
        "decode_s": np.zeros(3),
    }
    output = locate(str(tmp_path / "out"))
    WriteStage(output, 4, "float32")(batch)
    done = pq.read_table(tmp_path / "out" / "embeddings").column("id").to_pylist()
    failed = pq.read_table(tmp_path / "out" / "errors").column("id").to_pylist()
    assert sorted(done) == ["a\x00", "b"] and failed == ["c\x00\x00"]


# --- item 4: local fetches ------------------------------------------------------------------


def _fetch_in_time(uri: str, **kwargs) -> BaseException | bytes:
    """fetch_bytes in a thread, failing the test instead of hanging it."""
    result: list = []

    def go() -> None:
        try:
            result.append(fetch_bytes(uri, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result.append(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(5)
    assert result, f"fetch_bytes({uri!r}) blocked"
    return result[0]


def test_local_fetches_read_regular_files_only_and_never_block(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        str(tmp_path / "fifo.jpg"): "a FIFO",
        "/dev/zero": "a device",
        str(tmp_path / "folder.jpg"): "a folder",
        str(tmp_path / "nul\x00.jpg"): "invalid path",
    }
    for uri, reason in cases.items():
        exc = _fetch_in_time(uri)
        assert isinstance(exc, OSError) and reason in str(exc), (uri, exc)
    assert isinstance(_fetch_in_time(str(tmp_path / "none.jpg")), FileNotFoundError)


def test_local_fetches_are_capped_from_the_size_and_survive_memory_errors(tmp_path, monkeypatch):
    import vlray.storage as storage

    (tmp_path / "big.jpg").write_bytes(b"x" * 1000)
    assert fetch_bytes(str(tmp_path / "big.jpg"), max_bytes=1000) == b"x" * 1000
    with pytest.raises(TooLarge, match="1000 bytes is over input.max_bytes"):
        fetch_bytes(f"file://{tmp_path}/big.jpg", max_bytes=999)

    class Exhausted:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def read(self, n: int = -1) -> bytes:
            raise MemoryError

    monkeypatch.setattr(storage.os, "fdopen", Exhausted)
    with pytest.raises(OSError, match="out of memory"):
        fetch_bytes(str(tmp_path / "big.jpg"))


def test_the_decode_stage_turns_bad_local_paths_into_read_error_rows(tmp_path):
    from vlray.pipeline.stages import DecodeStage

    stage = object.__new__(DecodeStage)  # _fetch needs only these two settings
    stage.s3, stage.max_bytes = S3Config(), 10
    (tmp_path / "big.jpg").write_bytes(b"x" * 11)
    for path in ("/dev/zero", str(tmp_path / "big.jpg"), str(tmp_path)):
        reason, stage_name = stage._fetch(path)
        assert stage_name == "read" and reason.startswith("cannot read"), reason


def test_relative_paths_stay_inside_the_dataset_folder(tmp_path):
    root = locate(str(tmp_path))
    base = str(tmp_path / "shards")
    assert resolve_path("a/../b.jpg", base, root) == (f"{tmp_path}/shards/b.jpg", "")
    assert resolve_path("../b.jpg", base, root) == (f"{tmp_path}/b.jpg", "")
    uri, why = resolve_path("../../etc/passwd", base, root)
    assert uri == "" and "leaves the dataset folder" in why
    assert resolve_path("../../x.jpg", base, root, True)[0] == os.path.normpath(
        f"{tmp_path}/../x.jpg"
    )
    assert resolve_path("/abs/x.jpg", base, root) == ("/abs/x.jpg", "")
    assert resolve_path("s3://b/x.jpg", base, root) == ("s3://b/x.jpg", "")
    s3_root = Location(root.fs, "bucket/data", "s3://bucket/data")
    object.__setattr__(s3_root, "fs", pa.fs.S3FileSystem(anonymous=True, region="us-east-1"))
    assert resolve_path("x/../y.jpg", "bucket/data/p", s3_root) == ("s3://bucket/data/p/y.jpg", "")
    assert "leaves the dataset" in resolve_path("../../../z.jpg", "bucket/data/p", s3_root)[1]
    assert "s3:// dataset" in resolve_path("/etc/passwd", "bucket/data/p", s3_root)[1]


def test_a_path_escaping_the_dataset_is_an_error_row(tmp_path):
    (tmp_path / "data").mkdir()
    paths = pa.array(["ok.jpg", "../../secret.jpg", "", None])
    pq.write_table(pa.table({"image": paths}), tmp_path / "data" / "p.parquet")
    rows, _ = _rows(InputConfig(uri=str(tmp_path / "data")))
    assert rows[0]["uri"] == str(tmp_path / "data" / "ok.jpg") and not rows[0]["error"]
    assert rows[1]["uri"] == "" and rows[1]["stage"] == "read"
    assert "leaves the dataset folder" in rows[1]["error"]
    assert [r["error"] for r in rows[2:]] == ["null image cell"] * 2
    rows, _ = _rows(InputConfig(uri=str(tmp_path / "data"), allow_outside_root=True))
    assert rows[1]["uri"] == os.path.normpath(str(tmp_path / "data" / "../../secret.jpg"))


# --- item 5: folder listings ------------------------------------------------------------------


def test_a_folder_lists_every_image_once_and_counts_what_it_skips(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name in ("_DSC0001.JPG", "a.jpe", "b.jfif", "c.png", "sub/d.tiff", ".hidden.jpg"):
        (root / name).write_bytes(b"img")
    (root / ".cache").mkdir()
    (root / ".cache" / "e.jpg").write_bytes(b"img")
    (root / "notes.txt").write_text("no image")
    (root / "gone.jpg").symlink_to(root / "missing.jpg")
    (root / "sub" / "loop").symlink_to(root)  # a loop back to the top
    (root / "alias").symlink_to(root / "sub")  # the same folder twice
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "f.webp").write_bytes(b"img")
    (root / "linked").symlink_to(outside)  # a link to a folder not listed otherwise
    os.mkfifo(root / "pipe.jpg")
    plan = plan_input(InputConfig(uri=str(root)))
    ids = sorted(i for t in plan.tasks for i in t.ids)
    assert ids == ["_DSC0001.JPG", "a.jpe", "b.jfif", "c.png", "linked/f.webp", "sub/d.tiff"]
    assert plan.skipped_files == {
        "broken_link": 1,
        "hidden": 2,
        "not_regular": 1,
        "repeated_folder": 2,
        "unsupported_extension": 1,
    }


def test_a_glob_counts_only_what_it_matches(tmp_path):
    pq.write_table(_table(3), tmp_path / "a.parquet")
    pq.write_table(_table(2, 3), tmp_path / "_b.parquet")
    pq.write_table(_table(2, 5), tmp_path / ".c.parquet")
    (tmp_path / "readme.md").write_text("x")
    rows, plan = _rows(InputConfig(uri=str(tmp_path / "*.parquet")))
    assert sorted(r["id"] for r in rows) == [f"r{i}" for i in range(5)]
    assert plan.skipped_files == {"hidden": 1}


def test_an_image_format_vlray_does_not_decode_is_named_in_its_error_row():
    import io

    from PIL import Image

    from vlray.ops.decode import DecodeError, decode_image

    ppm = io.BytesIO()
    Image.new("RGB", (4, 4)).save(ppm, "PPM")
    with pytest.raises(DecodeError, match="unsupported image format .looks like PPM"):
        decode_image(ppm.getvalue(), max_pixels=100)


def test_s3_inputs_list_plan_and_fetch_under_the_same_rules(s3_env):
    bucket, fs = s3_env.bucket, s3_env.fs
    base = f"{bucket}/inputs-rules"
    sink = pa.BufferOutputStream()
    paths = ["img/a.jpg", "../../elsewhere/b.jpg", "/etc/passwd"]
    pq.write_table(pa.table({"image": pa.array(paths, pa.string_view())}), sink)
    fs.pipe(f"{base}/data/p.parquet", sink.getvalue().to_pybytes())
    fs.pipe(f"{base}/data/junk.parquet", b"not Parquet")
    fs.pipe(f"{base}/data/.hidden/x.parquet", b"hidden")
    fs.pipe(f"{base}/data/img/a.jpg", b"x" * 100)
    config = InputConfig(uri=f"s3://{base}/data")
    plan = plan_input(config, s3_env.s3)
    rows = [
        r for t in plan.tasks for b in read_task_rows(t, plan.root, config) for r in b.to_pylist()
    ]
    assert rows[0]["uri"] == f"s3://{base}/data/img/a.jpg" and not rows[0]["error"]
    assert "leaves the dataset folder" in rows[1]["error"]
    assert "s3:// dataset" in rows[2]["error"]
    assert len(plan.unreadable) == 1 and plan.skipped_files == {
        "hidden": 1,
        "images_beside_parquet": 1,
    }
    with pytest.raises(TooLarge):
        fetch_bytes(rows[0]["uri"], s3_env.s3, max_bytes=99)
    assert fetch_bytes(rows[0]["uri"], s3_env.s3, max_bytes=100) == b"x" * 100
