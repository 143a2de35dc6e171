"""Defaults and first errors users see: thumbnails on (off with GPU decode), processor typos
refused, an unsupported model type named as such."""

from __future__ import annotations

import pytest

from vlray.config import ConfigError, build_config

BASE = {"input": {"uri": "/i"}, "model": {"name": "m"}}


def test_thumbnails_are_on_by_default_and_off_with_gpu_decode():
    assert build_config(None, BASE).output.thumbnails == 256
    gpu = build_config(None, {**BASE, "input": {"uri": "/i", "decode": "gpu"}})
    assert gpu.output.thumbnails == 0
    with pytest.raises(ConfigError, match="use output.thumbnails 0"):
        build_config(
            None, {**BASE, "input": {"uri": "/i", "decode": "gpu"}, "output": {"thumbnails": 64}}
        )


def test_unknown_processor_keys_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        build_config(
            None,
            {**BASE, "model": {"name": "m", "processor": {"max_num_patchs": 64, "size": {}}},
             "sam": {"processor": {"zzz": 1}}},
        )  # fmt: skip
    text = str(info.value)
    assert "model.processor.max_num_patchs: unknown key (did you mean max_num_patches?" in text
    assert "sam.processor.zzz: unknown key (known: " in text and "size:" not in text
    ok = {"max_num_patches": 64, "image_mean": [0.5] * 3, "pooling": "cls"}
    assert (
        build_config(None, {**BASE, "model": {"name": "m", "processor": ok}}).model.processor == ok
    )


def test_an_unsupported_model_type_is_named_before_missing_weights(tmp_path):
    import json

    from vlray.families import CheckpointError, resolve_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported \\(supported: "):
        resolve_checkpoint(str(tmp_path))
