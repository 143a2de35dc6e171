"""Config: every preset loads, precedence defaults < YAML < flags, all problems reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlray.cli import embed_config
from vlray.config import ConfigError, build_config, parse_assignments, to_dict
from vlray.families import family_for, resolve_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    config = build_config(path, {"input": {"uri": "x.parquet"}, "model": {"name": "m"}})
    assert config.input.uri == "x.parquet"


@pytest.mark.parametrize("arch", sorted(p.name for p in (CONFIGS / "arch").iterdir()))
def test_architecture_presets_resolve_to_a_family(arch):
    checkpoint = resolve_checkpoint(arch, weights="random")
    family = family_for(checkpoint)
    h, w = family.target_size(480, 640)
    assert h > 0 and w > 0


def test_precedence_defaults_yaml_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "compute:\n  encode_batch_size: 7\n  decode_batch_size: 5\nmodel:\n  name: a\n"
    )
    config = build_config(
        preset, parse_assignments(["compute.encode_batch_size=9", "input.uri=in"])
    )
    assert config.compute.encode_batch_size == 9  # flag beats YAML
    assert config.compute.decode_batch_size == 5  # YAML beats default
    assert config.output.rows_per_file == 2048  # default
    assert config.model.name == "a"


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        build_config(
            None,
            parse_assignments(["compute.encode_batch_size=x", "model.nope=1", "model.weights=w"]),
        )
    text = str(info.value)
    assert (
        "encode_batch_size" in text
        and "model.nope" in text
        and "model.weights" in text
        and "input.uri" in text
    )


def test_cli_flags_override_preset(tmp_path):
    config = embed_config(
        [
            "--config",
            str(CONFIGS / "siglip2-base-naflex.yaml"),
            "--input",
            "in.parquet",
            "--output",
            "o",
            "--set",
            "model.processor={max_num_patches: 64}",
            "--set",
            "s3.secret=topsecret",
        ]
    )
    assert config.input.uri == "in.parquet" and config.output.uri == "o"
    assert config.model.name == "google/siglip2-base-patch16-naflex"
    assert config.model.processor == {"max_num_patches": 64}
    assert "topsecret" not in repr(config) and "topsecret" not in str(to_dict(config))


def test_random_arch_preset_builds_processor_overrides():
    checkpoint = resolve_checkpoint(
        "siglip2-base-patch16-naflex", weights="random", processor_overrides={"max_num_patches": 64}
    )
    family = family_for(checkpoint)
    assert family.max_num_patches == 64 and checkpoint.random_weights


def test_thumbnails_setting():
    assert (
        build_config(None, {"input": {"uri": "x"}, "model": {"name": "m"}}).output.thumbnails == 256
    )
    config = build_config(
        None, parse_assignments(["output.thumbnails=256", "input.uri=x", "model.name=m"])
    )
    assert config.output.thumbnails == 256
    for bad in ("-1", "5000"):
        with pytest.raises(ConfigError, match="output.thumbnails"):
            build_config(
                None, parse_assignments([f"output.thumbnails={bad}", "input.uri=x", "model.name=m"])
            )


def test_gpu_decode_is_a_choice_without_thumbnails():
    base = ["input.uri=x", "model.name=m"]
    assert build_config(None, parse_assignments([*base, "input.decode=gpu"])).input.decode == "gpu"
    with pytest.raises(ConfigError, match="input.decode: 'nvjpeg' is not exact, draft or gpu"):
        build_config(None, parse_assignments([*base, "input.decode=nvjpeg"]))
    with pytest.raises(ConfigError, match="thumbnails are made by the CPU decode"):
        build_config(None, parse_assignments([*base, "input.decode=gpu", "output.thumbnails=64"]))
