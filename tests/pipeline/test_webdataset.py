"""WebDataset input: tar shards planned from their headers, read by byte range, exact rows."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlray.config import InputConfig
from vlray.pipeline.files import ReadStage
from vlray.pipeline.kept import from_cells
from vlray.pipeline.sources import InputError, plan_input
from vlray.pipeline.state import hash_ids
from vlray.pipeline.webdataset import expand_braces, split_name


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), seed % 256, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, members: list[tuple[str, bytes]], cut: int = 0) -> None:
    """A tar of ``members`` in order (PAX headers: unicode names); ``cut`` keeps only the first
    ``cut`` bytes (a truncated download)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(raw[:cut] if cut else raw)


def _sample(key: str, seed: int, caption: str | None = None, meta: dict | None = None) -> list:
    members = [(f"{key}.jpg", _jpeg(seed))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def _truncated_at(members: list[tuple[str, bytes]], keep: int) -> int:
    """Tar bytes that end ``keep`` bytes into the data of the last member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members[:-1]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        before = tar.offset
    name = members[-1][0]
    header = tarfile.TarInfo(name).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return before + len(header) + keep


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards in nested folders, img2dataset's sidecars beside them; odd keys (a dot after
    the first, spaces, unicode, a folder inside the tar), a sample without an image, a key the
    second shard repeats, a key repeated inside a shard, a truncated last member; and a file
    named .tar that is not a tar."""
    root = tmp_path_factory.mktemp("wds")
    first = [
        *_sample("000000", 0, "a red fox", {"url": "http://x/0", "label": 3, "score": 0.5}),
        *_sample("a.b", 1, "dots", {"url": "http://x/1", "label": 4, "score": 1.5}),
        ("sp ace/é ☃.png", _png(2)),
        ("sp ace/é ☃.txt", "unicode caption ✓".encode()),
        ("only_text.txt", b"no image here"),
        *_sample("dup", 3, "first dup"),
        ("between.jpg", _jpeg(4)),
        *_sample("dup", 5, "second dup"),
        ("__meta__", b"not a sample"),
    ]
    write_shard(root / "part" / "00000.tar", first)
    second = [*_sample("000000", 6, "again"), *_sample("last", 7)]  # last.jpg cut short
    write_shard(root / "part" / "00001.tar", second, cut=_truncated_at(second, 100))
    (root / "part" / "00000.parquet").write_bytes(b"img2dataset sidecar, not input")
    (root / "part" / "00000_stats.json").write_text("{}")
    (root / "part" / "zz-broken.tar").write_bytes(b"this is not a tar file " * 40)
    return root


EXPECTED_IDS = [
    "000000",
    "a",
    "sp ace/é ☃",
    "only_text",
    "dup",
    "between",
    "dup",
    "part/00001.tar/000000",
    "last",
]


def _rows(config: InputConfig, done: np.ndarray | None = None) -> tuple[list[dict], object]:
    plan = plan_input(config, done=done)
    stage = ReadStage(plan.root, config)
    tasks = [
        {k: np.array(v) if isinstance(v, tuple) else v for k, v in asdict(t).items()}
        for t in plan.tasks
    ]
    tables = [t for task in tasks for t in stage({"task": [task]})]
    return [r for t in tables for r in t.to_pylist()], plan


def test_keys_follow_webdatasets_rule_and_match_the_webdataset_library(shards):
    wds = pytest.importorskip("webdataset")
    plan = plan_input(InputConfig(uri=str(shards / "part" / "00000.tar")))
    ids = [i for t in plan.tasks for i in t.ids]
    url = str(shards / "part" / "00000.tar")
    library = [s["__key__"] for s in wds.WebDataset([url], shardshuffle=False)]
    assert ids == library == EXPECTED_IDS[:7]
    assert split_name("dir/a.b.JPG") == ("dir/a", "b.jpg")
    assert split_name("__meta__") is None and split_name("noext") is None
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_every_sample_is_one_row_and_bad_ones_are_error_rows(shards):
    config = InputConfig(uri=str(shards), rows_per_task=2, rows_per_block=2)
    rows, plan = _rows(config)
    assert plan.kind == "webdataset" and plan.rows == len(EXPECTED_IDS) == len(rows)
    assert [r["id"] for r in rows] == EXPECTED_IDS
    assert len(plan.tasks) == 5  # 7 samples in tasks of 2, then 2
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"only_text", "dup", "last"}
    assert "no image member" in errors["only_text"]
    size = len(_jpeg(7))
    assert errors["last"] == f"truncated tar member last.jpg: 100 of {size} bytes in the shard"
    dups = [r for r in rows if r["id"] == "dup"]
    assert [d["error"] for d in dups] == ["", "duplicate id: an earlier sample has the same key"]
    good = {r["id"]: r["data"] for r in rows if not r["error"]}
    assert good["a"] == _jpeg(1) and good["sp ace/é ☃"] == _png(2)
    assert good["part/00001.tar/000000"] == _jpeg(6)
    assert all(r["stage"] == "read" for r in rows if r["error"])
    assert plan.unreadable == ["part/zz-broken.tar: tar shard not readable at all (invalid header)"]
    assert plan.skipped_files == {"beside_tar_shards": 2, "tar_member_not_a_sample": 1}


def test_the_caption_is_kept_by_default_and_json_fields_when_asked(shards):
    rows, plan = _rows(InputConfig(uri=str(shards / "part" / "*.tar")))
    assert plan.kept == pa.schema([("caption", pa.string())])
    kept = from_cells([r["kept"] for r in rows if not r["error"]]).to_pylist()
    assert [k["caption"] for k in kept][:3] == ["a red fox", "dots", "unicode caption ✓"]
    config = InputConfig(
        uri=str(shards / "part" / "0000{0..1}.tar"), keep_columns=("label", "url", "score")
    )
    rows, plan = _rows(config)
    assert plan.kept == pa.schema(
        [("label", pa.int64()), ("url", pa.string()), ("score", pa.float64())]
    )
    ok = [r for r in rows if not r["error"]]
    kept = from_cells([r["kept"] for r in ok])
    assert kept.schema == plan.kept
    assert kept.to_pylist()[:3] == [
        {"label": 3, "url": "http://x/0", "score": 0.5},
        {"label": 4, "url": "http://x/1", "score": 1.5},
        {"label": None, "url": None, "score": None},
    ]
    with pytest.raises(InputError, match="'lable' is not 'caption' nor a field.*label, score, url"):
        plan_input(InputConfig(uri=str(shards), keep_columns=("lable",)))
    with pytest.raises(InputError, match="'id' cannot be kept"):
        plan_input(InputConfig(uri=str(shards), keep_columns=("id",)))


def test_done_samples_are_left_out_before_any_task(shards):
    done = np.unique(hash_ids(EXPECTED_IDS[:6]))
    rows, plan = _rows(InputConfig(uri=str(shards), rows_per_task=2), done=done)
    assert plan.skipped == 7  # both 'dup' rows share the done id
    assert [r["id"] for r in rows] == ["part/00001.tar/000000", "last"]
    assert len(plan.tasks) == 1 and plan.rows == 2


def test_shards_that_cannot_be_read_are_one_line(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(
        InputError,
        match=r"no readable WebDataset sample \(x.tar: tar shard not readable at all \(empty file\)\)",
    ):
        plan_input(InputConfig(uri=str(tmp_path)))
    with pytest.raises(InputError, match="no such file"):
        plan_input(InputConfig(uri=str(tmp_path / "nope.tar")))


def test_a_shard_corrupt_midway_keeps_the_samples_before(tmp_path):
    write_shard(tmp_path / "s.tar", [*_sample("k0", 0), *_sample("k1", 1), *_sample("k2", 2)])
    with tarfile.open(tmp_path / "s.tar") as tar:
        k2 = tar.getmember("k2.jpg").offset
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    raw[k2 : k2 + 512] = b"\xff" * 512  # k2's header: garbage
    (tmp_path / "s.tar").write_bytes(bytes(raw))
    rows, plan = _rows(InputConfig(uri=str(tmp_path)))
    assert [(r["id"], r["error"]) for r in rows] == [("k0", ""), ("k1", "")]
    assert plan.rows == 2
    assert plan.unreadable == [
        "s.tar: tar shard not readable after 2 samples (invalid header at byte 5120)"
    ]


def test_s3_shards_plan_and_read_like_local(shards, s3_env):
    local = shards / "part" / "00000.tar"
    s3_env.fs.put(str(local), f"{s3_env.bucket}/wds/shards/00000.tar")
    config = InputConfig(uri=f"s3://{s3_env.bucket}/wds/shards/{{00000..00001}}.tar")
    plan = plan_input(config, s3_env.s3)
    assert plan.skipped_files == {"missing": 1, "tar_member_not_a_sample": 1}
    stage = ReadStage(plan.root, config)
    rows = [r for t in plan.tasks for b in stage({"task": [asdict(t)]}) for r in b.to_pylist()]
    assert [r["id"] for r in rows] == EXPECTED_IDS[:7]
    assert rows[1]["data"] == _jpeg(1) and rows[0]["source"].startswith("s3://")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("caption,url", ("caption", "url")),
        ("[caption, url]", ("caption", "url")),
        ("", ()),
        (["a"], ("a",)),
    ],
)
def test_keep_columns_from_yaml_or_flags(value, expected):
    from vlray.config import ConfigError, build_config

    overrides = {"input": {"uri": "x", "keep_columns": value}, "model": {"name": "m"}}
    assert build_config(None, overrides).input.keep_columns == expected
    assert (
        build_config(None, {"input": {"uri": "x"}, "model": {"name": "m"}}).input.keep_columns
        is None
    )
    with pytest.raises(ConfigError, match="input.keep_columns: expected a list of names"):
        build_config(None, {"input": {"uri": "x", "keep_columns": 3}, "model": {"name": "m"}})


def test_cli_job_on_shards_keeps_columns_into_query_hits(
    shards, siglip2_checkpoint, ray_local, tmp_path, capsys
):
    from vlray.cli import embed_main, query_main

    out = tmp_path / "out"
    args = ["--input", str(shards), "--output", str(out), "--model", str(siglip2_checkpoint)]
    keep = ["--set", "input.keep_columns=caption,label,score", "--set", "input.rows_per_task=4"]
    assert embed_main([*args, *keep]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["rows_in"], summary["embedded"], summary["errors"]) == (9, 6, 3)
    assert summary["accounted"] and summary["input_errors"] == [
        "part/zz-broken.tar: tar shard not readable at all (invalid header)"
    ]
    table = pq.read_table(out / "embeddings")
    assert table.schema.names == ["id", "embedding", "width", "height", "caption", "label", "score"]
    assert table.schema.field("label").type == pa.int64()
    rows = {r["id"]: r for r in table.select(["id", "caption", "label", "width"]).to_pylist()}
    assert rows["a"] == {"id": "a", "caption": "dots", "label": 4, "width": 40}
    assert rows["sp ace/é ☃"]["caption"] == "unicode caption ✓"
    errors = pq.read_table(out / "errors").to_pydict()
    assert sorted(errors["id"]) == ["dup", "last", "only_text"]
    capsys.readouterr()
    assert query_main(["--index", str(out / "index"), "--id", "a", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == "a"
    assert hits[0]["metadata"] == {"caption": "dots", "label": 4, "score": 1.5}
    assert embed_main([*args, *keep]) == 0  # nothing new: every sample is done
    again = json.loads((out / "_summary.json").read_text())
    assert (again["rows_in"], again["skipped_done"]) == (0, 9)


def test_a_caption_without_txt_comes_from_the_json(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            *_sample("k0", 0, meta={"caption": "from json"}),
            *_sample("k1", 1, "from txt", {"caption": "no"}),
        ],
    )
    rows, plan = _rows(InputConfig(uri=str(tmp_path / "s.tar"), keep_columns=("caption",)))
    assert from_cells([r["kept"] for r in rows]).column("caption").to_pylist() == [
        "from json",
        "from txt",
    ]
    write_shard(tmp_path / "t" / "s.tar", _sample("k0", 0))
    with pytest.raises(InputError, match="'caption' comes from .txt members"):
        plan_input(InputConfig(uri=str(tmp_path / "t"), keep_columns=("caption",)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_header_reader_agrees_with_tarfile(tmp_path, fmt):
    from vlray.pipeline.tarscan import fast_members

    long_dir = "d" * 60 + "/" + "e" * 60  # a ustar prefix, a GNU long name, a PAX path
    names = ["a.jpg", f"{long_dir}/k.jpg", f"{long_dir}/k.txt", "x" * 120 + ".json"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("é ☃/ü.png")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
                continue  # ustar cannot hold it
            info = tarfile.TarInfo(name)
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(b"z" * info.size))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    raw = buf.getvalue()

    def seen(members):
        return [(m.name, m.type, m.size, m.offset, m.offset_data) for m in members]

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = seen(tar.getmembers())
    assert seen(fast_members(io.BytesIO(raw), len(raw))) == expected
    assert len(expected) >= 5
    cut = raw[: expected[2][4] + 10]  # the third member's data cut short
    got = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        got.extend(fast_members(io.BytesIO(cut), len(cut)))
    assert seen(got) == expected[:3]


def test_a_header_type_the_fast_reader_leaves_to_tarfile_still_plans(tmp_path, caplog):
    write_shard(tmp_path / "s.tar", [*_sample("k0", 0), ("vol.txt", b"x"), *_sample("k1", 1)])
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    with tarfile.open(tmp_path / "s.tar") as tar:
        at = tar.getmember("vol.txt").offset
    raw[at + 156 : at + 157] = b"V"  # a GNU volume header
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 155] = b"%06o\0" % sum(raw[at : at + 512])
    (tmp_path / "s.tar").write_bytes(bytes(raw))
    with caplog.at_level("INFO", logger="vlray.pipeline.webdataset"):
        rows, plan = _rows(InputConfig(uri=str(tmp_path)))
    assert "tar header type b'V', reading its headers with tarfile" in caplog.text
    assert [(r["id"], r["error"]) for r in rows] == [("k0", ""), ("k1", "")]
    assert plan.skipped_files == {"tar_member_not_regular": 1}
