"""bdf-train -> bdf-reconstruct -> evaluation on the tiny world: files, manifest, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY_MODEL, TINY_WORLD
from tests.tasks.test_cli import _assert_one_line_error, _run
from tests.tasks.test_evaluate import FAST_METRICS

TINY_GENERATOR = ["generator=tiny_random", "generator.build_tiny.cross_attention_dim=32", "generator.build_tiny.image_size=32",
                  "generator.steps=3", "progress=false"]


@pytest.mark.slow
def test_reconstruct_resume_and_evaluate(tmp_path):
    train = _run("bdf-train", [*TINY_WORLD, *TINY_MODEL, "logger=csv"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = train.stdout.split("checkpoint    :")[1].split()[0]
    out = tmp_path / "recons"
    args = [f"ckpt={ckpt}", f"out={out}", *TINY_GENERATOR, "limit=6", "n_samples=2"]
    first = _run("bdf-reconstruct", [*args, "subjects=[subj02]"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "12 new images, 12 in total" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "bdf-reconstructions" and manifest["generator"]["name"] == "tiny_random"
    items = manifest["items"]
    assert {(i["subject"], i["sample"]) for i in items} == {("subj02", 0), ("subj02", 1)}
    for i in items:
        assert i["seed"] == 1000 * i["image_index"] + i["sample"]
        assert Image.open(out / i["path"]).size == (32, 32)
    assert manifest["config"]["train"]["target"]["feature_name"] == "clip_image_tokens"
    assert (out / "grid.png").exists() and (out / "subj02" / "embeddings.safetensors").exists()
    before = {p: p.stat().st_mtime_ns for p in (out / "subj02" / "final").iterdir()}

    # resume: subj02 is skipped (its files are untouched), subj01 is added; then the metric table
    second = _run("bdf-reconstruct", [*args, "evaluate=true", *FAST_METRICS], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "12 new images, 24 in total" in second.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    table = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert [r["subject"] for r in table["rows"]] == ["subj01", "subj02", "mean"]
    assert table["rows"][0]["n_images"] == 6 and 0 <= table["rows"][0]["ssim"] <= 1
    assert "| Subject | n | PixCorr↑ | SSIM↑" in second.stdout

    again = _run("bdf-evaluate", [f"run={out}", *FAST_METRICS, "sample=1"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]

    bad = _run("bdf-reconstruct", [f"ckpt={ckpt}", "generator=sd21_unclip", f"generator.model={tmp_path}"], tmp_path)
    _assert_one_line_error(bad, "is not a diffusers pipeline folder")
    mismatch = _run("bdf-reconstruct", [f"ckpt={ckpt}", *TINY_GENERATOR, "generator.build_tiny.cross_attention_dim=48",
                                        f"generator.model={tmp_path}/tiny48"], tmp_path)
    _assert_one_line_error(mismatch, "generator tiny_random needs clip_image_tokens (*×48); decoder provides "
                                     "clip_image_tokens 16×32")
    assert Path(tmp_path / "tiny48" / "model_index.json").exists()


def test_meg_generation_reads_the_calibrated_regression_head():
    """MEG decoders feed generators from their MSE head, de-standardised to the training targets."""
    from braindecode_fw.models.decoder import build_decoder
    from braindecode_fw.models.meg import build_meg_decoder
    from braindecode_fw.tasks.reconstruct import calibrate_to_targets, conditioning_sources

    meg = build_meg_decoder({"s": 8}, {"clip_image": (4,)}, n_times=10, spatial_channels=4, n_harmonics=2,
                            hidden=4, depth=1, backbone_out=8)
    assert conditioning_sources(meg, ["clip_image"]) == {"clip_image": "regression/clip_image"}
    no_heads = build_meg_decoder({"s": 8}, {"clip_image": (4,)}, n_times=10, spatial_channels=4, n_harmonics=2,
                                 hidden=4, depth=1, backbone_out=8, regression_heads=False)
    assert conditioning_sources(no_heads, ["clip_image"]) == {"clip_image": "clip_image"}
    from functools import partial

    from braindecode_fw.models.adapters import SubjectLinearAdapter
    from braindecode_fw.models.encoders import ResidualMLP
    from braindecode_fw.models.heads import ProjectionHead

    fmri = build_decoder({"s": 8}, {"clip_image": (4,)}, adapter=SubjectLinearAdapter, encoder=partial(ResidualMLP, n_blocks=1),
                         head=ProjectionHead, hidden=8)
    assert conditioning_sources(fmri, ["clip_image"]) == {"clip_image": "clip_image"}

    import numpy as np

    rng = np.random.default_rng(0)
    pred = 0.1 * rng.standard_normal((50, 2, 3)) + 0.5  # shrunk towards the mean, as MSE heads are
    mean, std = rng.standard_normal((2, 3)), rng.uniform(1, 2, (2, 3))
    out = calibrate_to_targets(pred, mean, std)
    np.testing.assert_allclose(out.mean(0), mean, atol=1e-5)
    np.testing.assert_allclose(out.std(0), std, rtol=1e-5)
    # an affine map per feature: the ranking of the items along every feature is kept
    assert (np.argsort(out[:, 1, 2]) == np.argsort(pred[:, 1, 2])).all()
