"""bdf-train experiment=meg_synthetic end to end on a tiny synthetic MEG world: brain module training,
top-5 retrieval with the ridge baseline and the oracle, the geometry in the checkpoint, bdf-evaluate and
bdf-reconstruct from it (the generator fed by the calibrated MSE head)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

TINY_MEG = [
    "experiment=meg_synthetic",
    "dataset.world.sources_per_subject=[150,200]", "dataset.world.volume_shape=[10,12,10]",
    "dataset.world.image_size=32", "dataset.world.feature_resolution=8", "dataset.world.n_test_images=20",
    "dataset.world.test_repetitions=4", "dataset.world.n_train_images=48", "dataset.world.n_sessions=4",
    "dataset.world.runs_per_session=2", "dataset.world.snr=0.2", "dataset.world.oracle_subset_size=20",
    "dataset.world.oracle_n_subsets=1",
    *[f"{node}.{key}" for node in ("target", "extra_targets.tokens") for key in (
        "model_overrides.vision_cfg.image_size=32", "model_overrides.vision_cfg.width=32",
        "model_overrides.vision_cfg.layers=1", "model_overrides.embed_dim=16", "preprocess.image_size=32")],
    "generator=tiny_random",
    "model.spatial_channels=8", "model.n_harmonics=4", "model.hidden=8", "model.depth=2", "model.backbone_out=16",
    "data.batch_size=16", "evaluation.subset_size=20", "trainer.max_epochs=2",
    "generator.build_tiny.cross_attention_dim=32", "generator.build_tiny.image_size=32", "generator.steps=2",
    "callbacks.image_grid=null",
]


@pytest.mark.slow
def test_meg_synthetic_train_evaluate_reconstruct(tmp_path):
    proc = run_cli("bdf-train", TINY_MEG, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "brain→image top-5" in out and "linear b→i top-5" in out and "oracle b→i top-5" in out
    run_dir = Path(out.split("run directory : ")[1].split()[0])
    report = json.loads((run_dir / "retrieval.json").read_text())
    rows = {r["subject"]: r for r in report["rows"]}
    assert set(rows) == {"sub01", "sub02", "mean"}
    oracle = json.loads((tmp_path / "data" / "prepared" / "synthetic_meg" / "extras" / "oracle.json").read_text())
    for s in ("sub01", "sub02"):
        row = rows[s]
        assert row["n_test_images"] == 20 and row["chance_top5"] == pytest.approx(5 / 20)
        assert row["oracle_brain_to_image_top5"] == oracle["subjects"][s]["brain_to_image_top5"]
        for key in ("brain_to_image_top5", "linear_brain_to_image_top5", "linear_brain_to_image_top1"):
            assert 0 <= row[key] <= 1
    result = json.loads((run_dir / "result.json").read_text())
    assert result["optimized_metric"] == "test/brain_to_image_top5"
    assert result["value"] == pytest.approx(rows["mean"]["brain_to_image_top5"])
    assert (run_dir / "reconstructions_grid.png").exists()  # tiny generator fed by regression/clip_image_tokens

    # the checkpoint carries the sensor geometry of every subject
    ckpt = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    geometry = np.load(tmp_path / "data" / "prepared" / "synthetic_meg" / "subjects" / "sub02" / "geometry.npz")
    np.testing.assert_allclose(state["decoder.sensor_positions"][1].numpy(), geometry["sensor_positions"])
    assert state["decoder.sensor_valid"].all()

    ev = run_cli("bdf-evaluate", [f"ckpt={ckpt}", "retrieval.subset_size=20", "retrieval.n_subsets=1",
                               "plots.enabled=false"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-4000:]
    ev_dir = Path(ev.stdout.split("results: ")[1].split()[0])
    again = {r["subject"]: r for r in json.loads((ev_dir / "retrieval.json").read_text())["rows"]}
    for s in ("sub01", "sub02"):  # the checkpoint reproduces the training-time evaluation
        assert again[s]["brain_to_image_top1"] == rows[s]["brain_to_image_top1"]
        assert again[s]["brain_to_image_top5"] == rows[s]["brain_to_image_top5"]

    generator = [o for o in TINY_MEG if o.startswith(("generator.", "generator="))]
    rec = run_cli("bdf-reconstruct", [f"ckpt={ckpt}", "limit=3", "subjects=[sub01]", f"out={tmp_path}/recons",
                                   *generator], tmp_path)
    assert rec.returncode == 0, rec.stderr[-4000:]
    manifest = json.loads((tmp_path / "recons" / "manifest.json").read_text())
    assert len(manifest["items"]) == 3
