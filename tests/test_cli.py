"""The embed summary says what happened: the right next query, only folders written, why no masks;
``--help`` answers without loading torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from vlray.cli import masks_note, next_steps, print_summary
from vlray.config import build_config
from vlray.pipeline.job import written_folders

REPO = Path(__file__).resolve().parents[1]


def _summary(**changes):
    summary = {
        "output": "/o",
        "model": "m",
        "family": "f",
        "weights": "pretrained",
        "device": "cpu",
        "input": "/i",
        "rows_in": 4,
        "embedded": 4,
        "segmented": 0,
        "masks": 0,
        "errors": 0,
        "accounted": True,
        "images_per_second": 1.0,
        "job_seconds": 4.0,
        "wall_seconds": 5.0,
        "buckets": {"groups_per_batch": 1.0, "mean_group_size": 4.0},
        "index": {"factory": "Flat", "count": 4},
        "written": ["embeddings", "thumbnails", "index"],
        "text_queries": True,
    }
    return {**summary, **changes}


def _config(**sam):
    base = {"input": {"uri": "/i"}, "model": {"name": "x"}, "sam": sam}
    return build_config(None, base)


def test_next_query_follows_the_models_text_tower():
    assert '--index /o/index --text "a photo of a cat"' in next_steps(_summary())[0]
    no_text = next_steps(_summary(text_queries=False))[0]
    assert "--image" in no_text and "--text" not in no_text and "no text tower" in no_text
    assert next_steps(_summary(index=None)) == []  # SAM alone: nothing to query


def test_summary_lists_written_folders_and_labels_random_weights(capsys):
    print_summary(_summary(weights="random"), _config())
    printed = capsys.readouterr().out
    assert "  written    /o/embeddings/  /o/thumbnails/  /o/index/  /o/_summary.json\n" in printed
    assert "errors/" not in printed
    assert "[random weights: results are not meaningful]" in printed and "demo" not in printed
    print_summary(_summary(errors=3, errors_by_stage={"decode": 2, "encode": 1}), _config())
    printed = capsys.readouterr().out
    assert "  errors     2 decode, 1 encode  (one line each in /o/errors/)\n" in printed


def test_written_folders_come_from_this_runs_counts():
    totals = {"embedded": 3.0, "errors": 1.0, "thumbnails": 3.0, "masks": 0.0}
    assert written_folders(totals, index=True) == ["embeddings", "thumbnails", "errors", "index"]
    sam_only = {"segmented": 2.0, "masks": 5.0}
    assert written_folders(sam_only, index=False) == ["segmented", "masks"]
    assert written_folders({"embedded": 2.0}, False, tokens=True) == ["embeddings", "tokens"]


def test_zero_masks_says_which_thresholds_filtered_them(capsys):
    config = _config(pred_iou_thresh=0.9, stability_score_thresh=0.97)
    summary = _summary(embedded=0, segmented=3, masks=0, index=None, weights="random")
    note = masks_note(summary, config)
    assert "sam.pred_iou_thresh 0.9" in note and "sam.stability_score_thresh 0.97" in note
    assert "random weights" in note and "--set sam.pred_iou_thresh=" in note
    print_summary(summary, config)
    assert "0 masks over 3 images\n" in capsys.readouterr().out
    assert masks_note(_summary(segmented=3, masks=7), config) == ""


def test_help_is_fast_and_loads_no_torch():
    code = "import sys, runpy; sys.argv = ['embed.py', '--help']\n" + (
        "try:\n runpy.run_path('jobs/embed.py', run_name='__main__')\n"
        "except SystemExit: pass\nprint('torch' in sys.modules)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--verbose" in done.stdout and done.stdout.strip().endswith("False")
    assert time.perf_counter() - start < 3.0


def test_text_queries_are_offered_only_for_models_with_a_text_tower(siglip2_checkpoint, tmp_path):
    from vlray.families import family_for, resolve_checkpoint
    from vlray.pipeline.job import can_embed_text
    from vlray.testing.checkpoints import save_tiny_qwen2_vl

    qwen = save_tiny_qwen2_vl(tmp_path / "qwen")
    assert can_embed_text(family_for(resolve_checkpoint(str(siglip2_checkpoint))))
    assert not can_embed_text(family_for(resolve_checkpoint(str(qwen))))
