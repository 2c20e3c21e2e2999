"""Every `braindecode_fw/conf/generator/*.yaml` composes, builds its tiny pipeline from the config's `build_tiny`
spec (saved with save_pretrained), loads it through the user's loader and generates images; the
synthetic world's `tiny` loads the trained pipeline shipped with the package."""

from __future__ import annotations

import pytest
import torch

from braindecode_fw.generation.controlnet import ControlNetModulatedReconstructor
from braindecode_fw.generation.diffusion import EmbedsConditionedReconstructor, UnClipReconstructor
from braindecode_fw.generation.versatile import VersatileDualReconstructor
from braindecode_fw.pipeline.generation import build_generator
from tests.conftest import CONF, compose_config

# config -> (tiny kind, class, decoder outputs it is fed)
CASES = {
    "tiny_random": ("embeds", EmbedsConditionedReconstructor, {"clip_image_tokens": (6, 24)}),
    "sd_embeds": ("embeds", EmbedsConditionedReconstructor, {"clip_text_tokens": (7, 24)}),
    "sd_img2img": ("embeds", EmbedsConditionedReconstructor, {"clip_text_tokens": (7, 24), "vae_latent": (4, 8, 8)}),
    "sd21_unclip": ("unclip", UnClipReconstructor, {"clip_image_pooled": (12,)}),  # embed_dim
    "versatile_dual": ("versatile", VersatileDualReconstructor,
                       {"clip_image_tokens": (9, 24), "clip_text_tokens": (7, 24)}),
    "controlnet_modulated": ("controlnet", ControlNetModulatedReconstructor,
                             {"clip_text_tokens": (7, 24), "control_map": (32, 8, 8)}),
}


def test_every_generator_config_is_covered():
    assert sorted(p.stem for p in (CONF / "generator").glob("*.yaml")) == sorted([*CASES, "tiny"])


def test_default_tiny_generator_is_the_shipped_unclip_pipeline():
    from braindecode_fw.demo.retrain import GENERATOR_FOLDER, package_weights_dir

    cfg = compose_config("train", ["generator.steps=2", "generator.device=cpu"])
    assert cfg.generator.model == str(package_weights_dir() / GENERATOR_FOLDER)
    gen = build_generator(cfg.generator)
    assert type(gen) is UnClipReconstructor and gen.condition_norm == 1.0
    gen.check({"tiny_clip_image": (128,)})  # the default target: the tiny CLIP's image embedding
    out = gen.reconstruct({"tiny_clip_image": torch.randn(2, 128)}, [0, 1])
    assert out["final"].shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generator_config_builds_tiny_and_generates(name, tmp_path):
    kind, cls, provides = CASES[name]
    spec = f"{{kind:{kind},image_size:32,cross_attention_dim:24,embed_dim:12,seed:1}}"
    overrides = [f"generator={name}", f"generator.build_tiny={spec}", f"generator.model={tmp_path / name}",
                 "generator.steps=2", "generator.device=cpu"]
    if name == "controlnet_modulated":
        overrides.append("generator.negative=zeros")  # the tiny pipeline has no text tower
    cfg = compose_config("reconstruct", overrides)
    gen = build_generator(cfg.generator)
    assert type(gen) is cls and (tmp_path / name / "model_index.json").is_file()
    gen.check(provides)
    outputs = {k: torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)) for k, shape in provides.items()}
    out = gen.reconstruct(outputs, [0, 1])
    assert out["final"].shape == (2, 3, 32, 32) and 0 <= out["final"].min() and out["final"].max() <= 1
    assert ("lowlevel" in out) == ("vae_latent" in provides)
    again = build_generator(cfg.generator)  # the folder exists now: loaded, not rebuilt
    assert torch.equal(again.reconstruct(outputs, [0, 1])["final"], out["final"])
