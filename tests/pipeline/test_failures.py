"""What is a row error, what stops the run, what stays undone (no Ray: the pure parts in-process).

A bad image is an error row; a whole group failing with one error, or a programming error, is a
systemic failure (rows not committed, exit 1); a network outage that outlasts the retries leaves
rows undone (not committed, exit 1, the next run retries them); the error budget stops a run
whose rows mostly fail.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlray.config import OutputConfig, S3Config
from vlray.families import resolve_checkpoint
from vlray.pipeline import stages as stages_module
from vlray.pipeline.files import WriteStage, part_name
from vlray.pipeline.job import STAT_KEYS, drive
from vlray.pipeline.stages import DecodeStage, EncodeStage, group_failure
from vlray.schema import SYSTEMIC, TRANSIENT
from vlray.storage import TransientError, locate


def test_group_failure_blames_one_image_only_when_it_is_alone():
    one, two = np.array([3]), np.array([3, 4])
    assert group_failure(ValueError("bad shape"), one, "preprocess") == ("bad shape", "preprocess")
    assert group_failure(ValueError("bad shape"), two, "preprocess")[1] == SYSTEMIC
    message, stage = group_failure(AttributeError("no attribute x"), one, "encode")
    assert stage == SYSTEMIC and message == "encode: AttributeError: no attribute x"


def test_a_broken_encoder_is_systemic_not_error_rows(siglip2_checkpoint, monkeypatch):
    from tests.pipeline.test_stages import _decoded

    batch = _decoded(siglip2_checkpoint)
    stage = EncodeStage(resolve_checkpoint(str(siglip2_checkpoint)), "cpu", "float32", 256, 1)

    def broken(inputs):
        raise TypeError("forward() got an unexpected keyword argument")

    monkeypatch.setattr(stage.encoder, "embed", broken)
    out = stage(batch)
    assert set(out["stage"]) == {SYSTEMIC}
    assert all("TypeError" in e for e in out["error"])


def _write_batch(ids, errors, stages):
    n = len(ids)
    return {
        "id": np.array(ids, dtype=object),
        "source": np.array(["s"] * n, dtype=object),
        "error": np.array(errors, dtype=object),
        "stage": np.array(stages, dtype=object),
        "embedding": np.tile(np.eye(1, 4, dtype=np.float32), (n, 1)),
        "width": np.ones(n, np.int32),
        "height": np.ones(n, np.int32),
        "decode_s": np.zeros(n),
    }


def test_writer_never_commits_transient_or_systemic_rows(tmp_path):
    output = locate(str(tmp_path))
    writer = WriteStage(output, 4, "float32")
    batch = _write_batch(
        ["ok", "bad", "net", "sys"],
        ["", "not an image", "unreachable for now: timed out", "encode: TypeError: x"],
        ["", "decode", TRANSIENT, SYSTEMIC],
    )
    counts = writer(batch)
    name = counts["file"][0]
    assert pq.read_table(tmp_path / "embeddings" / name).column("id").to_pylist() == ["ok"]
    assert pq.read_table(tmp_path / "errors" / name).column("id").to_pylist() == ["bad"]
    assert (counts["embedded"][0], counts["errors"][0]) == (1, 1)
    assert (counts["undone"][0], counts["systemic"][0]) == (1, 1)
    assert counts["errors_decode"][0] == 1
    assert "example id 'sys'" in counts["systemic_error"][0]


def test_part_names_never_collide_for_different_ids():
    # the old name hashed "\n".join(ids): these two batches shared a file and one was lost
    assert part_name(["a\nb", "c"]) != part_name(["a", "b\nc"])
    assert part_name(["x", "y"]) == part_name(["x", "y"])  # a retried write rewrites its file
    assert part_name(["a"], ["b"]) != part_name(["a", "b"], [])


def test_batches_with_the_same_ids_from_other_rows_keep_both_parts(tmp_path):
    # an input repeating a file's ids: the copy's rows are duplicate-id errors; with names
    # from the ids alone its errors part replaced the first file's (44 errors counted, 38 kept)
    writer = WriteStage(locate(str(tmp_path)), 4, "float32")
    first = _write_batch(["a", "b"], ["", "not an image"], ["", "decode"])
    first["source"] = np.array(["one.parquet#row=0", "one.parquet#row=1"], dtype=object)
    copy = _write_batch(["a", "b"], ["duplicate id"] * 2, ["read"] * 2)
    copy["source"] = np.array(["two.parquet#row=0", "two.parquet#row=1"], dtype=object)
    names = {writer(first)["file"][0], writer(copy)["file"][0]}
    assert len(names) == 2
    kept = [pq.read_table(p).column("source").to_pylist() for p in (tmp_path / "errors").iterdir()]
    assert sorted(kept) == [["one.parquet#row=1"], ["two.parquet#row=0", "two.parquet#row=1"]]
    assert writer(copy)["file"][0] in names  # a retried write still rewrites its own file


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **_):
        yield from self.batches


def _counts(rows, errors, systemic=""):
    return {
        **{k: np.array([0]) for k in STAT_KEYS},
        "rows": np.array([rows]),
        "errors": np.array([errors]),
        "systemic": np.array([1 if systemic else 0]),
        "systemic_error": np.array([systemic]),
        "file": np.array([f"part-{rows}-{errors}.parquet"]),
    }


def test_drive_stops_at_a_systemic_failure():
    ds = _Batches([_counts(10, 0), _counts(10, 0, "encode: TypeError: x"), _counts(10, 0)])
    totals, files, failure = drive(ds, OutputConfig())
    assert failure.startswith("systemic failure: encode: TypeError") and totals["rows"] == 20
    assert len(files) == 2


def test_drive_spends_the_error_budget_after_the_minimum_rows():
    ds = _Batches([_counts(60, 59), _counts(60, 40), _counts(60, 0)])
    totals, _, failure = drive(ds, OutputConfig())
    assert "error budget exceeded: 99 of the first 120 rows" in failure
    totals, _, failure = drive(_Batches([_counts(60, 59)]), OutputConfig())
    assert failure == ""  # fewer rows than error_budget_min_rows: no verdict yet
    ds = _Batches([_counts(200, 150)])
    assert drive(ds, OutputConfig(max_error_fraction=1.0))[2] == ""


def test_an_outage_that_passes_is_retried_and_one_that_lasts_is_left_undone(
    siglip2_checkpoint, monkeypatch, tmp_path
):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    calls = {"n": 0}
    real = stages_module.fetch_bytes

    def flaky(uri, s3=None, **_):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise TransientError("Connection reset by peer")
        return real(uri, s3)

    monkeypatch.setattr(stages_module, "fetch_bytes", flaky)
    monkeypatch.setattr(stages_module.time, "sleep", lambda s: None)
    checkpoint = resolve_checkpoint(str(siglip2_checkpoint))
    stage = DecodeStage(checkpoint, 10**8, S3Config(transient_retry_s=60))
    assert stage._fetch_all([str(img)])[0] == img.read_bytes()

    def down(uri, s3=None, **_):
        raise TransientError("HTTP status 503")

    monkeypatch.setattr(stages_module, "fetch_bytes", down)
    reason, stage_name = stage._fetch_all([str(img)])[0]
    assert stage_name == TRANSIENT and "503" in reason
    monkeypatch.setattr(
        stages_module, "fetch_bytes", lambda uri, s3=None, **_: open("/nonexistent")
    )
    assert stage._fetch_all(["/nonexistent"])[0][1] == "read"  # permanent: an error row


def test_pillows_global_pixel_limit_is_untouched():
    import vlray.ops.decode  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


@pytest.mark.parametrize("pixels", [200_000_000])
def test_our_pixel_limit_is_per_call(pixels):
    from vlray.ops.decode import DecodeError, probe_image

    png = _huge_png_header(20000, 10000)
    assert probe_image(png, max_pixels=pixels) == (20000, 10000)  # over Pillow's 179 MP refusal
    with pytest.raises(DecodeError, match="decompression bomb"):
        probe_image(png, max_pixels=100_000_000)


def _huge_png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
