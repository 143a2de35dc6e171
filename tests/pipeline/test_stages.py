"""EncodeStage in-process (no Ray): groups, the one copy back per batch, bad cells, the device.

The CUDA tests run only where a GPU is visible (never required by CI): preprocessing on the
GPU equals the CPU's bit for bit, and the stage's embeddings match the CPU stage's.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from vlray.config import S3Config
from vlray.families import family_for, resolve_checkpoint
from vlray.pipeline.stages import DecodeStage, EncodeStage, decode_group, stack_group
from vlray.schema import ROW_SCHEMA
from vlray.testing.checkpoints import save_tiny_qwen2_vl, save_tiny_sam
from vlray.testing.images import bad_images, sample_photos, unusual_images

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _torch_threads():
    """The stages set torch's thread count for their process; give this one its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _decoded(
    checkpoint, photos: int = 10, decode: str = "exact", blobs=None, extra: bool = False
) -> dict:
    """A decoded batch as the encoder receives it (DecodeStage output as NumPy columns);
    ``extra`` adds a column ``meta`` no stage knows (b"k<row>") to the input rows."""
    if blobs is None:
        blobs = [blob for _, blob in sample_photos(photos, seed=3)]
        blobs.append(blobs[0])  # a duplicate: one group of more than one row
    n = len(blobs)
    rows = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "source": ["x"] * n,
            "data": blobs,
            "uri": [""] * n,
            "error": [""] * n,
            "stage": [""] * n,
            "prompts": [""] * n,
        },
        schema=ROW_SCHEMA,
    )
    if extra:
        rows = rows.append_column("meta", pa.array([f"k{i}".encode() for i in range(n)]))
    stage = DecodeStage(resolve_checkpoint(str(checkpoint)), 10**8, S3Config(), decode=decode)
    table = stage(rows)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _per_group_reference(checkpoint, batch, max_group_size):
    """Each same-shape group encoded on its own, as a caller without the stage would."""
    family = family_for(resolve_checkpoint(str(checkpoint)))
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    out = np.zeros((len(batch["id"]), encoder.dim), np.float32)
    keys = list(zip(batch["th"], batch["tw"], strict=True))
    for key in sorted(set(keys)):
        rows = [i for i, k in enumerate(keys) if k == key]
        for s in range(0, len(rows), max_group_size):
            group = rows[s : s + max_group_size]
            pixels = np.stack(
                [np.frombuffer(batch["pixels"][i], np.uint8).reshape(*key, 3) for i in group]
            )
            inputs = family.preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2))
            out[group] = encoder.encode(inputs).numpy()
    return out


def test_stack_group_values_layout_and_bad_cells():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    cells = np.array([i.tobytes() for i in images] + [b"short"], dtype=object)
    group = stack_group(cells, np.array([2, 0]), (5, 7), torch.device("cpu"))
    assert group.shape == (2, 3, 5, 7) and group.dtype == torch.uint8
    assert group.permute(0, 2, 3, 1).is_contiguous()  # channels-last, one copy
    assert torch.equal(group.permute(0, 2, 3, 1), torch.from_numpy(images[[2, 0]]))
    with pytest.raises(ValueError):
        stack_group(cells, np.array([0, 3]), (5, 7), torch.device("cpu"))


def test_encode_stage_matches_per_group_encoding(siglip2_checkpoint):
    batch = _decoded(siglip2_checkpoint)
    stage = EncodeStage(resolve_checkpoint(str(siglip2_checkpoint)), "cpu", "float32", 2, 1)
    out = stage(batch)
    n = len(batch["id"])
    assert (out["error"] == "").all()
    expected = _per_group_reference(siglip2_checkpoint, batch, 2)
    assert np.array_equal(out["embedding"], expected)
    assert np.allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert out["group_size"].min() >= 1 and out["group_size"].max() <= 2
    assert (out["batch_rows"] == n).all()


def test_columns_no_stage_produces_pass_through_with_their_rows(siglip2_checkpoint):
    """Kept input columns travel untouched: the decode stage reorders rows by shape and the
    encoder drops only what it consumes; each row keeps its own cell."""
    blobs = [blob for _, blob in sample_photos(6, seed=3)] + [b"not an image"]
    batch = _decoded(siglip2_checkpoint, blobs=blobs, extra=True)
    assert list(batch["th"]) == sorted(batch["th"])  # rows were reordered by shape
    assert [bytes(k) for k in batch["meta"]] == [f"k{i[1:]}".encode() for i in batch["id"]]
    stage = EncodeStage(resolve_checkpoint(str(siglip2_checkpoint)), "cpu", "float32", 4, 1)
    out = stage(batch)
    assert [bytes(k) for k in out["meta"]] == [f"k{i[1:]}".encode() for i in out["id"]]
    assert {"pixels", "th", "tw", "data", "uri"}.isdisjoint(out)
    assert sorted(out["id"][out["error"] != ""]) == ["r6"]


def test_encode_stage_bad_cell_fails_its_group_only(siglip2_checkpoint):
    batch = _decoded(siglip2_checkpoint)
    keys = list(zip(batch["th"], batch["tw"], strict=True))
    bad = 0
    batch["pixels"] = batch["pixels"].copy()
    batch["pixels"][bad] = batch["pixels"][bad][:-1]  # one byte short
    batch["error"] = batch["error"].astype(object)
    batch["error"][1] = "decode failed"  # a row already failed upstream
    batch["error"] = batch["error"].astype(str)
    stage = EncodeStage(resolve_checkpoint(str(siglip2_checkpoint)), "cpu", "float32", 256, 1)
    out = stage(batch)
    same_group = {i for i, k in enumerate(keys) if k == keys[bad] and i != 1}
    for i in range(len(batch["id"])):
        if i == 1:
            assert out["error"][i] == "decode failed" and out["stage"][i] == ""
        elif i in same_group:
            assert out["stage"][i] == "preprocess" and out["error"][i]
            assert not out["embedding"][i].any() and out["group_size"][i] == 0
        else:
            assert out["error"][i] == "", i
            assert abs(np.linalg.norm(out["embedding"][i]) - 1) < 1e-5


def _gpu_decode_inputs() -> list[bytes]:
    """Plain JPEGs (decoded on the device), and rows the CPU must decode or reject."""
    photos = [blob for _, blob in sample_photos(5, seed=4)]
    extra, bad = unusual_images(), bad_images()
    # a valid header, a body of noise, an EOI marker: passes the header probe
    head = photos[0][: photos[0].index(b"\xff\xda") + 2]
    noise = np.random.default_rng(5).integers(0, 255, 4000, dtype=np.uint8).tobytes()
    broken = head + noise.replace(b"\xff", b"\x00") + b"\xff\xd9"
    return [
        *photos,
        photos[1],
        extra["exif_rotated.jpg"],
        extra["cmyk.jpg"],
        extra["rgba.png"],
        bad["truncated.jpg"],
        bad["random.jpg"],
        broken,
    ]


def test_gpu_decode_stage_passes_plain_jpegs_encoded(siglip2_checkpoint):
    blobs = _gpu_decode_inputs()
    exact = _decoded(siglip2_checkpoint, blobs=blobs)
    gpu = _decoded(siglip2_checkpoint, decode="gpu", blobs=blobs)
    assert "encoded" not in exact
    by_id = {i: k for k, i in enumerate(exact["id"])}
    for k, row_id in enumerate(gpu["id"]):
        e, index = by_id[row_id], int(row_id[1:])
        for key in ("error", "stage", "width", "height", "th", "tw"):
            assert gpu[key][k] == exact[key][e], (row_id, key)
        if index < 6 or index == 12:  # plain RGB JPEGs with an EOI marker
            assert gpu["encoded"][k] == 1 and gpu["pixels"][k] == blobs[index], row_id
        else:
            assert gpu["encoded"][k] == 0 and gpu["pixels"][k] == exact["pixels"][e], row_id


def test_gpu_decode_on_cpu_gives_the_exact_embeddings(siglip2_checkpoint):
    # torchvision's CPU JPEG decode and CHW uint8 resize are the exact path's, bit for bit:
    # on the CPU, decode gpu must give the same rows and embeddings as exact
    blobs = _gpu_decode_inputs()
    checkpoint = resolve_checkpoint(str(siglip2_checkpoint))
    exact = EncodeStage(checkpoint, "cpu", "float32", 4, 1)(_decoded(checkpoint.path, blobs=blobs))
    batch = _decoded(checkpoint.path, decode="gpu", blobs=blobs)
    gpu = EncodeStage(checkpoint, "cpu", "float32", 4, 1)(batch)
    assert "encoded" not in gpu
    by_id = {i: k for k, i in enumerate(exact["id"])}
    for k, row_id in enumerate(gpu["id"]):
        e = by_id[row_id]
        assert (gpu["error"][k], gpu["stage"][k]) == (exact["error"][e], exact["stage"][e])
        assert np.array_equal(gpu["embedding"][k], exact["embedding"][e]), row_id
    assert (gpu["error"] == "").sum() >= 9


def test_decode_group_falls_back_image_by_image(siglip2_checkpoint):
    family = family_for(resolve_checkpoint(str(siglip2_checkpoint)))
    photos = [blob for _, blob in sample_photos(3, seed=6)]
    import io

    from PIL import Image

    sizes = [Image.open(io.BytesIO(b)).size for b in photos]
    size = family.target_size(sizes[0][1], sizes[0][0])
    cells = np.array([photos[0], b"\xff\xd8 not a jpeg \xff\xd9", photos[0]], dtype=object)
    images, kept, failed = decode_group(
        cells, np.arange(3), np.ones(3, np.int32), size, torch.device("cpu"), family.interpolation
    )
    assert list(kept) == [0, 2] and set(failed) == {1}
    assert failed[1][1] == "decode" and failed[1][0]
    assert images.shape == (2, 3, *size) and torch.equal(images[0], images[1])
    images, kept, failed = decode_group(
        cells, np.array([1]), np.ones(3, np.int32), size, torch.device("cpu"), family.interpolation
    )
    assert images.shape == (0, 3, *size) and len(kept) == 0 and set(failed) == {1}


@CUDA
@pytest.mark.parametrize("kind", ["siglip2", "siglip", "qwen2_vl", "sam"])
def test_preprocess_on_gpu_equals_cpu(kind, siglip2_checkpoint, siglip_checkpoint, tmp_path):
    folder = {
        "siglip2": lambda: siglip2_checkpoint,
        "siglip": lambda: siglip_checkpoint,
        "qwen2_vl": lambda: save_tiny_qwen2_vl(tmp_path / "q"),
        "sam": lambda: save_tiny_sam(tmp_path / "s"),
    }[kind]()
    family = family_for(resolve_checkpoint(str(folder)))
    rng = np.random.default_rng(1)
    h, w = family.target_size(480, 640)
    images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    cells = np.array([i.tobytes() for i in images], dtype=object)
    cpu = family.preprocess(stack_group(cells, np.arange(3), (h, w), torch.device("cpu")))
    gpu = family.preprocess(stack_group(cells, np.arange(3), (h, w), torch.device("cuda")))
    assert gpu["pixel_values"].device.type == "cuda"
    for key, value in cpu.items():
        assert torch.equal(gpu[key].cpu(), value), key


@CUDA
def test_encode_stage_on_gpu_matches_cpu(siglip2_checkpoint):
    batch = _decoded(siglip2_checkpoint)
    checkpoint = resolve_checkpoint(str(siglip2_checkpoint))
    cpu = EncodeStage(checkpoint, "cpu", "float32", 4, 1)(batch)
    gpu = EncodeStage(checkpoint, "cuda", "float32", 4, 1)(batch)
    assert (gpu["error"] == "").all()
    cosine = (cpu["embedding"] * gpu["embedding"]).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert np.array_equal(cpu["group_size"], gpu["group_size"])
