"""The wheel: it holds every module, preset and architecture config, and an install of it into a
fresh virtual environment (not the source tree) finds them (presets, configs/arch/, the demo
config and checkpoint, a model) and runs the README's demo and a query through its console
scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

# Run by the installed copy, from a folder without configs/ (see test_installed_wheel).
_CHECK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch

    site = Path(sys.argv[1]).resolve()

    def installed(path):
        assert Path(path).resolve().is_relative_to(site), f"{path} is not from {site}"

    import vlray
    from vlray.cli import embed_config
    from vlray.config import build_config, configs_dir
    from vlray.demo import demo_config
    from vlray.families import family_for, resolve_checkpoint
    from vlray.families.checkpoint import ARCH_DIR

    installed(vlray.__file__)
    installed(configs_dir())
    installed(ARCH_DIR)
    presets = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    archs = sorted(p.name for p in ARCH_DIR.iterdir())
    for arch in archs:
        checkpoint = resolve_checkpoint(arch, weights="random")
        installed(checkpoint.path)
        assert min(family_for(checkpoint).target_size(480, 640)) > 0, arch
    # as users pass it, with no configs/ in the current folder
    config = build_config("configs/siglip2-base-naflex.yaml", {"input": {"uri": "x"}})
    assert config.model.name == "google/siglip2-base-patch16-naflex", config.model

    installed(demo_config())
    config = embed_config([])  # the demo: no flags (writes its data under $VLRAY_HOME)
    assert config.demo and config.output.uri == "vlray-demo-output", (
        "the demo did not read the installed demo.yaml",
        config.output,
    )
    checkpoint = resolve_checkpoint(config.model.name, weights=config.model.weights)
    family = family_for(checkpoint)
    encoder = family.load_encoder(torch.device("cpu"), torch.float32)
    h, w = family.target_size(48, 64)
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    vectors = encoder.encode(family.preprocess(images))
    assert vectors.shape == (2, family.embedding_dim), vectors.shape
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-4)
    print(json.dumps({"presets": presets, "archs": archs}))
    """
)


def _expected_wheel_files() -> set[str]:
    """Every file of vlray/ and configs/ (as vlray/configs/), less caches."""
    expected = set()
    for src, dst in ((REPO / "vlray", "vlray"), (REPO / "configs", "vlray/configs")):
        for path in src.rglob("*"):
            rel = path.relative_to(src)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                expected.add(f"{dst}/{rel.as_posix()}")
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree (the repo's build/ and egg-info untouched, and
    no stale build/lib file in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("vlray", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=_SKIP)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    output = build.stdout + build.stderr
    assert not re.search(r"\w+Warning\b", output), output  # e.g. a deprecated pyproject field
    (found,) = dist.glob("vlray-*.whl")
    return found


def test_wheel_holds_every_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    missing = _expected_wheel_files() - names
    assert not missing, f"not in the wheel (a package missing from pyproject.toml?): {missing}"
    assert "vlray/configs/demo.yaml" in names
    assert "vlray/configs/arch/siglip2-base-patch16-naflex/config.json" in names


def _fresh_venv(root: Path) -> Path:
    """A new virtual environment (no pip, no project on its path) whose only view of the
    dependencies is this environment's site-packages, read through a .pth file: what the wheel
    brings is all it has of vlray."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_deps.pth").write_text("\n".join(deps) + "\n")
    return venv


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """(fresh venv with the wheel installed, environment to run it in, a folder without
    configs/ to run from)."""
    root = tmp_path_factory.mktemp("installed")
    venv = _fresh_venv(root)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(VLRAY_HOME=str(root / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # Ray's workers use it
    return venv, env, elsewhere


def test_installed_wheel(installed: tuple[Path, dict, Path]) -> None:
    venv, env, elsewhere = installed
    (site,) = venv.glob("lib/python*/site-packages")
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _CHECK, str(site)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["archs"] == sorted(p.name for p in (REPO / "configs" / "arch").iterdir())
    assert found["presets"] == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_the_demo_runs_from_the_wheel_in_a_fresh_venv(installed: tuple[Path, dict, Path]) -> None:
    venv, env, elsewhere = installed
    # the README's demo, as the console script the wheel installs: its own Ray, no flags
    run = subprocess.run(
        [str(venv / "bin" / "vlray-embed")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = elsewhere / "vlray-demo-output"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["accounted"] and summary["embedded"] == summary["rows_in"] > 0, summary
    query = subprocess.run(
        [str(venv / "bin" / "vlray-query"), "--index", str(out / "index"), "--text", "a cat"]
        + ["-k", "3", "--json"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert query.returncode == 0, query.stdout[-2000:] + query.stderr[-3000:]
    hits = json.loads(query.stdout)
    assert len(hits) == 3 and all(isinstance(h["score"], float) for h in hits)
