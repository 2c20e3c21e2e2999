"""NeuroPictor end to end on the tiny world (docs/methods/neuropictor.md §2–5): bdf-train with the diffusion term
(a tiny locked UNet + trainable ControlNet) exports the trained ControlNet to ``<run dir>/controlnet``,
and bdf-reconstruct with ``generator=controlnet_modulated`` samples from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf.errors import InterpolationResolutionError
from PIL import Image

from tests.conftest import TINY_WORLD, compose_config, run_cli

IMAGE_SIZE = 32  # the world's images; the tiny VAE's latents are 4 × 8 × 8
WIDTH = 32  # the tiny CLIP's token width = the tiny UNet's cross_attention_dim


def _neuropictor_tiny(sd_folder: Path) -> list[str]:
    """experiment=neuropictor_synthetic shrunk, with the diffusion term switched on: the tiny CLIP's
    image tokens (16 × 32) as the semantic target and conditioning, VAE latents of the tiny pipeline
    as ``vae_latent``, the ControlNet's first block (32 channels) fed the 32 × 8 × 8 control map."""
    return [
        *TINY_WORLD, "experiment=neuropictor_synthetic",
        f"target.model_overrides.vision_cfg.image_size={IMAGE_SIZE}", f"target.model_overrides.vision_cfg.width={WIDTH}",
        "target.model_overrides.vision_cfg.layers=1", "target.model_overrides.embed_dim=16",
        f"target.preprocess.image_size={IMAGE_SIZE}",
        "+target@extra_targets.latent=sd_vae_latent", f"extra_targets.latent.model={sd_folder}",
        f"extra_targets.latent.image_size={IMAGE_SIZE}",
        "model.map_size=16", "model.patch=4", "model.dim=32", "model.depth=1", "model.heads=4", "model.text_tokens=null",
        "model.control_channels=32", "model.control_size=null", f"model.diffusion={{model:{sd_folder}}}",
        "loss.terms.diffusion={kind:aux,weight:1.0}",
        "data.batch_size=16", "evaluation.subset_size=20", "evaluation.n_subsets=5",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "callbacks.image_grid=null", "reconstruction.enabled=false", "logger=csv",
    ]


def _exported_weights(net) -> dict[str, torch.Tensor]:
    # the conditioning embedding is the identity in training and at sampling: not part of the export
    return {k: v for k, v in net.state_dict().items() if not k.startswith("controlnet_cond_embedding.")}


@pytest.mark.slow
def test_trained_controlnet_is_exported_and_reconstructs(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from braindecode_fw.generation.tiny import build_tiny_pipeline

    sd_folder = build_tiny_pipeline("controlnet", tmp_path / "tiny_sd", image_size=IMAGE_SIZE,
                                    cross_attention_dim=WIDTH)
    train = run_cli("bdf-train", _neuropictor_tiny(sd_folder), tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = train.stdout.split("checkpoint    :")[1].split()[0]
    run_dir = Path(ckpt).parents[1]
    export = run_dir / "controlnet"
    assert f"controlnet    : {export}" in train.stdout
    assert json.loads((run_dir / "result.json").read_text())["exports"] == {"controlnet": str(export)}
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(run_dir.glob(".controlnet*"))  # no temporary folder left

    # the export holds the trained ControlNet of the reloaded (best) checkpoint ...
    exported = _exported_weights(ControlNetModel.from_pretrained(export))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["braindecode_fw"]["auxiliary_output_shapes"]["control_map"] == [32, 8, 8]
    trained = {k.removeprefix("decoder.diffusion.controlnet."): v for k, v in state["state_dict"].items()
               if k.startswith("decoder.diffusion.controlnet.")}
    assert exported.keys() == trained.keys()
    for k, v in exported.items():
        assert torch.equal(v, trained[k]), k
    # ... not the copy of the UNet encoder it started from (zero output convolutions, UNet weights)
    initial = _exported_weights(ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(sd_folder / "unet")))
    assert torch.equal(initial["controlnet_mid_block.weight"], torch.zeros_like(initial["controlnet_mid_block.weight"]))
    for k in ("controlnet_mid_block.weight", "controlnet_down_blocks.0.weight", "conv_in.weight"):
        assert not torch.equal(exported[k], initial[k]), f"{k} did not train"

    # bdf-reconstruct with the run's export: the decoder's image tokens condition, control_map modulates
    out = tmp_path / "recons"
    recon = run_cli("bdf-reconstruct", [
        f"ckpt={ckpt}", "generator=controlnet_modulated", f"generator.model={sd_folder}",
        "generator.controlnet=${bdf_run_dir:}/controlnet", "generator.condition=clip_image_tokens",
        "generator.negative=zeros", "generator.steps=2", "limit=3", "subjects=[subj01]", "progress=false",
        f"out={out}"], tmp_path)
    assert recon.returncode == 0, recon.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["reconstruct"]["generator"]["controlnet"] == str(export)
    assert len(manifest["items"]) == 3
    for item in manifest["items"]:
        with Image.open(out / item["path"]) as img:
            assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"

    # per-subject refining after multi-subject pretraining (docs/methods/neuropictor.md §4): a new run on subj01
    # with the extra semantic branch starts from the pretrained weights (init_from)
    refine = run_cli("bdf-train", [*_neuropictor_tiny(sd_folder), f"init_from={ckpt}", "model.extra_branch=true",
                                "data.subjects=[subj01]"], tmp_path)
    assert refine.returncode == 0, refine.stderr[-3000:]
    refine_ckpt = refine.stdout.split("checkpoint    :")[1].split()[0]
    warm = json.loads((Path(refine_ckpt).parents[1] / "init_from.json").read_text())
    assert warm["checkpoint"] == ckpt and any(k.startswith("encoder.") for k in warm["loaded"])
    assert warm["not_in_checkpoint"] and all("extra" in k for k in warm["not_in_checkpoint"])
    assert not any(k.startswith("diffusion.unet.") for k in warm["loaded"])  # the locked UNet is not stored


def test_run_dir_resolver_names_the_checkpoints_run(tmp_path):
    cfg = compose_config("reconstruct", [f"ckpt={tmp_path}/run/checkpoints/best-epoch003.ckpt",
                                         "generator=controlnet_modulated",
                                         "generator.controlnet=${bdf_run_dir:}/controlnet"])
    assert cfg.generator.controlnet == f"{tmp_path}/run/controlnet"
    bad = compose_config("reconstruct", [f"ckpt={tmp_path}/model.ckpt", "generator=controlnet_modulated",
                                         "generator.controlnet=${bdf_run_dir:}/controlnet"])
    with pytest.raises(InterpolationResolutionError, match="is not a bdf-train checkpoint"):
        _ = bad.generator.controlnet
