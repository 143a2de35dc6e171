"""Queries and the service load exactly the weights an index was built with, or refuse.

The index is built (as the job does: the job's own manifest fields) from a hub id resolved
through a Hugging Face cache laid out as the hub publishes (``hub/models--ORG--NAME/snapshots/
<commit>/`` + ``refs/main``, sharded weights, minimal config), then moved to "another host": the
recorded folder gone, the cache present or absent, ``--model`` given right or wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlray.cli import query_main
from vlray.config import build_config
from vlray.families import family_for, resolve_checkpoint
from vlray.families.fingerprint import hub_revision, weights_fingerprint
from vlray.index import build_index
from vlray.index.update import index_manifest_fields as _index_manifest_fields
from vlray.query import QueryError, Searcher, manifest_checkpoint
from vlray.testing.checkpoints import save_hub_siglip2

REPO = "acme/siglip2-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT = "a photo of a cat"
N = 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF cache (``HF_HOME/hub``) holding REPO at COMMIT, weights in shards."""
    hub = tmp_path_factory.mktemp("hf_home") / "hub"
    repo = hub / f"models--{REPO.replace('/', '--')}"
    save_hub_siglip2(repo / "snapshots" / COMMIT, seed=0, max_shard_size="20KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return hub


@pytest.fixture
def use_cache(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _reference_text(folder: Path) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(folder))(
        [TEXT], padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)[0].numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, hub_cache: Path) -> dict:
    """An index built from REPO through the cache, with the job's manifest fields."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(hub_cache), True
    try:
        checkpoint = resolve_checkpoint(REPO)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
    family = family_for(checkpoint)
    fields = _index_manifest_fields(build_config(None, {"demo": True}), checkpoint, family.name)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, family.embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"img-{i}" for i in range(N)]
    index_dir = tmp_path_factory.mktemp("out") / "index"
    build_index(
        lambda: [(ids, vectors)], index_dir, dim=family.embedding_dim, count=N, manifest=fields
    )
    expected = vectors @ _reference_text(Path(checkpoint.path))
    return {
        "index": index_dir,
        "fields": fields,
        "ranking": [ids[i] for i in np.argsort(-expected)[:5]],
        "scores": np.sort(expected)[::-1][:5],
    }


def _moved(built: dict, tmp_path: Path) -> Path:
    """The index copied to another host's folder, its recorded model folder absent there."""
    moved = tmp_path / "elsewhere" / "index"
    shutil.copytree(built["index"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model_path"] = str(tmp_path / "cluster-node" / "snapshots" / COMMIT)
    (moved / "manifest.json").write_text(json.dumps(manifest))
    return moved


def _assert_reference_hits(hits: list[dict], built: dict) -> None:
    assert [h["id"] for h in hits] == built["ranking"]
    np.testing.assert_allclose([h["score"] for h in hits], built["scores"], atol=1e-5)


def test_manifest_records_what_was_loaded(built: dict) -> None:
    fields = built["fields"]
    assert fields["model"] == REPO and fields["revision"] == COMMIT
    assert fields["weights"] == "pretrained"
    names = [f["name"] for f in fields["fingerprint"]["files"]]
    assert len(names) > 1 and all(n.endswith(".safetensors") for n in names)
    assert "index_sha256" in fields["fingerprint"]  # the shard index is covered
    assert fields["fingerprint"] == weights_fingerprint(fields["model_path"])


def test_fingerprint_tells_fine_tunes_apart(tmp_path: Path) -> None:
    """Same architecture, other weights: same headers, different data samples and digest."""
    a = weights_fingerprint(save_hub_siglip2(tmp_path / "a", seed=0))
    b = weights_fingerprint(save_hub_siglip2(tmp_path / "b", seed=1))
    assert a and b
    assert a["files"][0]["header_sha256"] == b["files"][0]["header_sha256"]
    assert a["digest"] != b["digest"]
    assert weights_fingerprint(tmp_path) is None
    assert hub_revision(tmp_path / "a") is None


def test_query_on_the_build_host(built: dict) -> None:
    _assert_reference_hits(Searcher.open(str(built["index"])).by_text(TEXT, 5), built)


def test_query_on_another_host_through_the_hub_cache(
    built: dict, tmp_path: Path, use_cache: Path
) -> None:
    searcher = Searcher.open(str(_moved(built, tmp_path)))
    _assert_reference_hits(searcher.by_text(TEXT, 5), built)
    assert searcher.family.checkpoint.path.endswith(f"snapshots/{COMMIT}")


def test_missing_weights_refuse_instead_of_random(
    built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    moved = _moved(built, tmp_path)
    with pytest.raises(QueryError, match="--model PATH_OR_ID"):
        Searcher.open(str(moved)).by_text(TEXT, 5)
    assert query_main(["--index", str(moved), "--text", TEXT, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the weights this index was built with")
    assert len(err.strip().splitlines()) == 1
    # the id query needs no model and still works
    assert Searcher.open(str(moved)).by_id("img-3", 1)[0]["id"] == "img-3"


def test_model_override_is_verified(
    built: dict, tmp_path: Path, hub_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    moved = _moved(built, tmp_path)
    manifest = json.loads((moved / "manifest.json").read_text())
    other = save_hub_siglip2(tmp_path / "fine-tune", seed=1, max_shard_size="20KB")
    with pytest.raises(QueryError, match=r"holds other weights .*\(model-00001-of-\d+"):
        manifest_checkpoint(manifest, str(other))
    whole = save_hub_siglip2(tmp_path / "unsharded", seed=0)
    with pytest.raises(QueryError, match="1 weight files instead of"):
        manifest_checkpoint(manifest, str(whole))
    copy = shutil.copytree(built["fields"]["model_path"], tmp_path / "copy")
    argv = ["--index", str(moved), "--text", TEXT, "-k", "5", "--json", "--model", str(copy)]
    assert query_main(argv) == 0
    _assert_reference_hits(json.loads(capsys.readouterr().out), built)


def test_seeded_random_index_rebuilds_without_files(tmp_path: Path) -> None:
    """weights: random with no fingerprint (seeded weights from a config) stays random."""
    folder = save_hub_siglip2(tmp_path / "arch", seed=0)
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    checkpoint = manifest_checkpoint(
        {"model": str(folder), "weights": "random", "fingerprint": None, "seed": 3}
    )
    assert checkpoint.weights == "random" and checkpoint.seed == 3
    with pytest.raises(QueryError, match="no .safetensors"):
        manifest_checkpoint(
            {"model": str(folder), "weights": "pretrained", "fingerprint": {"digest": "x"}}
        )


def test_service_refuses_with_503(built: dict, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vlray.serve import ServeConfig, create_app

    moved = _moved(built, tmp_path)
    other = save_hub_siglip2(tmp_path / "fine-tune", seed=1)
    app = create_app(ServeConfig(index=str(moved), reload_interval_s=0, model=str(other)))
    with TestClient(app) as client:
        response = client.get("/api/search/text", params={"q": TEXT, "k": 3})
        assert response.status_code == 503
        assert "holds other weights" in response.json()["detail"]
        assert client.get("/api/search/id", params={"id": "img-1", "k": 1}).status_code == 200
    good = shutil.copytree(built["fields"]["model_path"], tmp_path / "good")
    app = create_app(ServeConfig(index=str(moved), reload_interval_s=0, model=str(good)))
    with TestClient(app) as client:
        response = client.get("/api/search/text", params={"q": TEXT, "k": 5})
        assert response.status_code == 200, response.text
        _assert_reference_hits(response.json()["hits"], built)
