"""bdf-train -> bdf-reconstruct -> evaluation on the tiny world: files, manifest, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli
from tests.tasks.test_cli import _assert_one_line_error
from tests.tasks.test_evaluate import FAST_METRICS

TINY_GENERATOR = ["generator=tiny_random", "generator.build_tiny.cross_attention_dim=32", "generator.build_tiny.image_size=32",
                  "generator.steps=3", "progress=false"]


@pytest.mark.slow
def test_reconstruct_resume_and_evaluate(tiny_train_run, tmp_path):
    train, _ = tiny_train_run  # bdf-train [*TINY_WORLD, *TINY_MODEL, "logger=csv"], shared with test_cli
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = train.stdout.split("checkpoint    :")[1].split()[0]
    out = tmp_path / "recons"
    args = [f"ckpt={ckpt}", f"out={out}", *TINY_GENERATOR, "limit=6", "n_samples=2"]
    first = run_cli("bdf-reconstruct", [*args, "subjects=[subj02]"], tmp_path)
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
    second = run_cli("bdf-reconstruct", [*args, "evaluate=true", *FAST_METRICS], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "12 new images, 24 in total" in second.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    table = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert [r["subject"] for r in table["rows"]] == ["subj01", "subj02", "mean"]
    assert table["rows"][0]["n_images"] == 6 and 0 <= table["rows"][0]["ssim"] <= 1
    assert "| Subject | n | PixCorr↑ | SSIM↑" in second.stdout

    again = run_cli("bdf-evaluate", [f"run={out}", *FAST_METRICS, "sample=1"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]

    bad = run_cli("bdf-reconstruct", [f"ckpt={ckpt}", "generator=sd21_unclip", f"generator.model={tmp_path}"], tmp_path)
    _assert_one_line_error(bad, "is not a diffusers pipeline folder")
    mismatch = run_cli("bdf-reconstruct", [f"ckpt={ckpt}", *TINY_GENERATOR, "generator.build_tiny.cross_attention_dim=48",
                                        f"generator.model={tmp_path}/tiny48"], tmp_path)
    _assert_one_line_error(mismatch, "generator tiny_random needs clip_image_tokens (*×48); decoder provides "
                                     "clip_image_tokens 16×32")
    assert Path(tmp_path / "tiny48" / "model_index.json").exists()


def test_meg_generation_reads_the_calibrated_regression_head():
    """MEG decoders feed generators from their MSE head, de-standardised to the training targets."""
    from braindecode_fw.models.decoder import build_decoder
    from braindecode_fw.models.meg import build_meg_decoder
    from braindecode_fw.pipeline.generation import calibrate_to_targets, conditioning_sources

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


# Brain-IT's low-level stage (docs/methods/brainit.md §6): a decoder with a `vgg_tokens` output (a head on the
# multi-scale VGG target at 32 px, random weights: 565 × 512 per image, cached), inverted by a tiny DIP
VGG_TARGET = ["+target@extra_targets.vgg=vgg_multiscale", "extra_targets.vgg.weights=random:0",
              "extra_targets.vgg.image_size=32"]
IMG2IMG = ["generator.lowlevel_target=lowlevel_image", "generator.lowlevel_kind=image", "generator.strength=0.5"]


def _dip(node: str) -> list[str]:
    return [f"{node}.iterations=3", f"{node}.output_size=32", f"{node}.feature_size=32",
            f"{node}.vgg_weights=random:0", f"{node}.channels=16", f"{node}.batch_size=2"]


@pytest.mark.slow
def test_reconstruct_from_the_dip_lowlevel_image(tmp_path):
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    train = run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, *VGG_TARGET, *IMG2IMG, "logger=csv", "data.subjects=[subj01]",
                               "trainer.max_epochs=1", "lowlevel@reconstruction.lowlevel=dip",
                               *_dip("reconstruction.lowlevel"), "reconstruction.n_images=2",
                               "reconstruction.n_metric_images=0"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = train.stdout.split("checkpoint    :")[1].split()[0]
    # bdf-train's preview grid has the low-level column: ground truth | low-level | final
    grid = Image.open(Path(ckpt).parents[1] / "reconstructions_grid.png")
    assert grid.size[0] == 3 * (96 + 2) + 2

    common = [f"ckpt={ckpt}", *TINY_GENERATOR, *IMG2IMG, "limit=3"]
    low_dir, plain_dir = tmp_path / "low", tmp_path / "plain"
    low = run_cli("bdf-reconstruct", [*common, "lowlevel=dip", *_dip("lowlevel"), f"out={low_dir}"], tmp_path)
    assert low.returncode == 0, low.stderr[-3000:]
    assert "3 new images, 3 in total" in low.stdout
    assert "inverted 3 low-level images of subj01" in low.stdout + low.stderr  # the one batch of 3 to generate
    plain = run_cli("bdf-reconstruct", [*common, f"out={plain_dir}"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]

    manifest = json.loads((low_dir / "manifest.json").read_text())
    items = sorted(manifest["items"], key=lambda i: i["image_index"])
    assert len(items) == 3 and all(i["lowlevel_path"] for i in items)
    stored = np.stack([np.asarray(Image.open(low_dir / i["lowlevel_path"])) for i in items])
    assert stored.shape == (3, 32, 32, 3)
    plain_items = sorted(json.loads((plain_dir / "manifest.json").read_text())["items"], key=lambda i: i["image_index"])
    assert [i["image_index"] for i in plain_items] == [i["image_index"] for i in items]
    assert all(i["lowlevel_path"] is None for i in plain_items)
    finals = [np.asarray(Image.open(d / i["path"]), dtype=np.int16) for d, its in ((low_dir, items),
                                                                                   (plain_dir, plain_items)) for i in its]
    assert all(np.abs(a - b).max() > 10 for a, b in zip(finals[:3], finals[3:], strict=True))  # img2img from it
    assert Image.open(low_dir / "grid.png").size[0] == 3 * (96 + 2) + 2

    # the stored images are the DIP inversion of the decoder's predicted tokens, seed lowlevel.seed + image index
    from braindecode_fw.generation.feature_inversion import FeatureInverter
    from braindecode_fw.lit import predict
    from braindecode_fw.pipeline.build import build_datamodule, build_model
    from braindecode_fw.pipeline.checkpoint import load_checkpoint

    extra = load_checkpoint(ckpt)["braindecode_fw"]
    train_cfg = OmegaConf.create(extra["config"])
    dm = build_datamodule(train_cfg)
    decoder = build_model(train_cfg, extra["n_features"], {k: tuple(v) for k, v in extra["target_shapes"].items()})
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in load_checkpoint(ckpt)["state_dict"].items()
                             if k.startswith("decoder.")})
    p = predict(decoder, dm.test_dataloader(), "clip_image_tokens", outputs=["vgg_tokens"])["subj01"]
    idx = [i["image_index"] for i in items]
    rows = [int(np.flatnonzero(p["image_index"] == i)[0]) for i in idx]
    inverter = FeatureInverter.from_config(manifest["config"]["reconstruct"]["lowlevel"])
    ref = inverter(torch.from_numpy(p["outputs"]["vgg_tokens"][rows]), seeds=[inverter.seed + i for i in idx])
    ref_u8 = (ref.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(ref_u8 - stored).max() <= 1

    # resuming inverts nothing: every item is done
    again = run_cli("bdf-reconstruct", [*common, "lowlevel=dip", *_dip("lowlevel"), f"out={low_dir}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 new images, 3 in total" in again.stdout and "inverted" not in again.stdout + again.stderr

    # config errors, before any data work, naming the key
    missing = run_cli("bdf-reconstruct", [*common, "lowlevel=dip", "lowlevel.source=pixels"], tmp_path)
    _assert_one_line_error(missing, "lowlevel.source: the decoder has no output 'pixels' to invert",
                           "vgg_tokens 565×512")
    size = run_cli("bdf-reconstruct", [*common, "lowlevel=dip", "lowlevel.feature_size=64"], tmp_path)
    _assert_one_line_error(size, "lowlevel.feature_size: 64 px gives 2321 VGG tokens × 512 per image, but the "
                                 "decoder's 'vgg_tokens' is 565×512: the tokens of a 32 px image, so set "
                                 "lowlevel.feature_size=32")


def test_lowlevel_stage_fits_the_generator(tmp_path):
    """The generator must read the low-level image as an image; errors name the key to set."""
    from braindecode_fw.generation.diffusion import EmbedsConditionedReconstructor
    from braindecode_fw.generation.tiny import build_tiny_pipeline
    from braindecode_fw.pipeline.generation import check_generation

    folder = build_tiny_pipeline("embeds", tmp_path / "tiny", image_size=32, cross_attention_dim=24)
    provides = {"clip_image_tokens": (6, 24), "vgg_tokens": (565, 512)}
    dip = {"feature_size": 32, "output_size": 32, "vgg_weights": "random:0"}

    def gen(**kw):
        return EmbedsConditionedReconstructor("g", str(folder), condition="clip_image_tokens", **kw)

    inverter, seen = check_generation(gen(lowlevel_target="lowlevel_image", lowlevel_kind="image"), provides, dip)
    assert inverter.output == "lowlevel_image" and seen == {**provides, "lowlevel_image": (3, 32, 32)}
    assert check_generation(gen(), provides, None) == (None, provides)
    with pytest.raises(ValueError, match=r"lowlevel.output: generator g does not read 'lowlevel_image' \(its inputs: "
                                         r"\['clip_image_tokens'\]\), .* set generator.lowlevel_target=lowlevel_image "
                                         r"generator.lowlevel_kind=image"):
        check_generation(gen(), provides, dip)
    with pytest.raises(ValueError, match=r"generator.lowlevel_kind: generator g reads 'lowlevel_image' as 4×\*×\*, "
                                         r"the low-level stage gives images 3×32×32; set generator.lowlevel_kind=image"):
        check_generation(gen(lowlevel_target="lowlevel_image"), provides, dip)
    with pytest.raises(ValueError, match=r"lowlevel.output: 'vgg_tokens' is already a decoder output"):
        check_generation(gen(), provides, {**dip, "output": "vgg_tokens"})
    required = gen(lowlevel_target="lowlevel_image", lowlevel_kind="image", require_lowlevel=True)
    with pytest.raises(ValueError, match=r"generator g needs lowlevel_image \(3×\*×\*\)"):
        check_generation(required, provides, None)  # without the stage the required image is missing
    check_generation(required, provides, dip)


def test_lowlevel_stage_warns_about_other_vgg_weights(caplog):
    from omegaconf import OmegaConf

    from braindecode_fw.generation.feature_inversion import FeatureInverter
    from braindecode_fw.pipeline.generation import _warn_other_vgg_weights

    train_cfg = OmegaConf.create({"target": {"feature_name": "clip_image_tokens"},
                                  "extra_targets": {"vgg": {"feature_name": "vgg_tokens", "weights": "random:0"}}})
    with caplog.at_level("WARNING"):
        _warn_other_vgg_weights(FeatureInverter(vgg_weights="random:0"), train_cfg)
        assert not caplog.records
        _warn_other_vgg_weights(FeatureInverter(), train_cfg)
    assert "lowlevel.vgg_weights is 'VGG16_BN_Weights.IMAGENET1K_V1', but the decoder's 'vgg_tokens' target was " \
           "computed with 'random:0'" in caplog.text
