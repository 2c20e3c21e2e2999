"""The default bdf-train path of issue 10 on a tiny world: the shipped tiny CLIP as the target
encoder (pooled embedding), the shipped tiny generator for the post-training reconstructions, and
the image metrics (PixCorr, SSIM, tiny-CLIP two-way) in the summary, result.json and
reconstruction_metrics.json; and `bdf-prepare demo_models=retrain` end to end at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_WORLD, run_cli

DEFAULT_SMALL = [*TINY_WORLD, "model.hidden=32", "model.encoder.n_blocks=1", "data.batch_size=16",
                 "evaluation.subset_size=20", "evaluation.n_subsets=5", "trainer.max_epochs=2", "generator.steps=4"]


@pytest.mark.slow
def test_default_run_reconstructs_with_the_shipped_models(tmp_path):
    proc = run_cli("bdf-train", DEFAULT_SMALL, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    run_dir = Path(out.split("run directory : ")[1].split()[0])
    assert (run_dir / "reconstructions_grid.png").is_file()
    summary = json.loads((run_dir / "reconstruction_metrics.json").read_text())
    assert summary["subject"] == "subj01" and summary["n_images"] == 24  # all of the tiny world's test images
    assert set(summary["metrics"]) == {"pixcorr", "ssim", "clip_tiny"}
    assert summary["labels"]["clip_tiny"] == "CLIP (tiny)"
    assert 0 <= summary["metrics"]["clip_tiny"] <= 1 and -1 <= summary["metrics"]["pixcorr"] <= 1
    assert "Reconstructions of subj01's first 24 test images (tiny)" in out and "CLIP (tiny)" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"]["test/recon_clip_tiny"] == pytest.approx(summary["metrics"]["clip_tiny"])
    report = json.loads((run_dir / "retrieval.json").read_text())
    assert report["rows"][0]["n_test_images"] == 24


@pytest.mark.slow
def test_retrain_demo_models_from_bdf_prepare(tmp_path):
    out_dir = tmp_path / "demo"
    args = ["demo_models=retrain", f"demo_models.output_dir={out_dir}", "dataset.world.image_size=32",
            "demo_models.classifier_scenes=64", "demo_models.classifier_steps=5",
            "demo_models.clip.n_train_scenes=128", "demo_models.clip.n_heldout_scenes=100", "demo_models.clip.steps=3",
            "demo_models.clip.batch_size=16", "demo_models.clip.warmup_steps=1", "demo_models.clip.category_groups=1",
            "demo_models.generator.n_train_scenes=64", "demo_models.generator.n_heldout_scenes=4",
            "demo_models.generator.vae_steps=2", "demo_models.generator.vae_batch_size=8",
            "demo_models.generator.unet_steps=2", "demo_models.generator.unet_batch_size=8",
            "demo_models.generator.sample_steps=2"]
    proc = run_cli("bdf-prepare", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"use them with paths.demo_models={out_dir}" in proc.stdout
    clip_cfg = json.loads((out_dir / "tiny_clip" / "config.json").read_text())
    assert clip_cfg["model_overrides"]["vision_cfg"]["image_size"] == 32  # follows dataset.world.image_size
    for name in ("MODEL_CARD.md", "model_index.json", "samples_conditional.png", "samples_unconditional.png"):
        assert (out_dir / "tiny_generator" / name).is_file(), name
    assert "two-way identification" in (out_dir / "tiny_generator" / "MODEL_CARD.md").read_text()

    bad = run_cli("bdf-prepare", ["demo_models=retrain", f"demo_models.output_dir={tmp_path}/x",
                               "demo_models.stages=[generator]"], tmp_path)
    assert bad.returncode == 2 and "needs a tiny CLIP in" in bad.stderr
