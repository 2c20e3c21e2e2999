"""The shared denoising loop against the stock diffusers pipelines' own loops (same seeds, same
components): txt2img, img2img, Stable unCLIP and ControlNet; plus strength validation."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from braindecode_fw.generation.controlnet import ControlNetModulatedReconstructor
from braindecode_fw.generation.diffusion import EmbedsConditionedReconstructor, UnClipReconstructor
from braindecode_fw.generation.loading import load_pipeline
from braindecode_fw.generation.sampling import seeded_generators, start_timesteps
from braindecode_fw.generation.tiny import build_tiny_pipeline

SEEDS = [3, 11]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {kind: build_tiny_pipeline(kind, root / kind, image_size=32, cross_attention_dim=24, embed_dim=20)
            for kind in ("embeds", "unclip", "controlnet")}


def _tokens(n: int = 2, length: int = 5, width: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, length, width, generator=torch.Generator().manual_seed(seed))


def test_txt2img_matches_stable_diffusion_pipeline(folders):
    gen = EmbedsConditionedReconstructor("t", str(folders["embeds"]), condition="tokens", steps=4, guidance_scale=3.0)
    tokens = _tokens()
    ours = gen.reconstruct({"tokens": tokens}, SEEDS)["final"]
    pipe = StableDiffusionPipeline(**gen.pipe.components)
    ref = pipe(prompt_embeds=tokens, negative_prompt_embeds=torch.zeros_like(tokens), num_inference_steps=4,
               guidance_scale=3.0, generator=seeded_generators(SEEDS, "cpu"), output_type="pt").images
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_img2img_matches_stable_diffusion_img2img_pipeline(folders):
    gen = EmbedsConditionedReconstructor("t", str(folders["embeds"]), condition="tokens", steps=5, guidance_scale=2.0,
                                         lowlevel_target="low", lowlevel_kind="image", strength=0.6)
    tokens, low = _tokens(), torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    out = gen.reconstruct({"tokens": tokens, "low": low}, SEEDS)
    assert torch.equal(out["lowlevel"], low)
    pipe = StableDiffusionImg2ImgPipeline(**gen.pipe.components, requires_safety_checker=False)
    # 4-channel input is taken as latents by the pipeline: give it our VAE-encoded start point
    ref = pipe(image=gen.encode_images(low), strength=0.6, prompt_embeds=tokens,
               negative_prompt_embeds=torch.zeros_like(tokens), num_inference_steps=5, guidance_scale=2.0,
               generator=seeded_generators(SEEDS, "cpu"), output_type="pt").images
    assert torch.allclose(out["final"], ref.float(), atol=1e-5)
    full = EmbedsConditionedReconstructor("t", str(folders["embeds"]), condition="tokens", steps=5,
                                          guidance_scale=2.0, lowlevel_target="low", lowlevel_kind="image")
    assert not torch.allclose(full.reconstruct({"tokens": tokens, "low": low}, SEEDS)["final"], out["final"])


def test_unclip_matches_stable_unclip_pipeline(folders):
    gen = UnClipReconstructor("u", str(folders["unclip"]), steps=4, guidance_scale=4.0, noise_level=50)
    emb = torch.randn(2, 20, generator=torch.Generator().manual_seed(2))
    ours = gen.reconstruct({"clip_image_pooled": emb}, SEEDS)["final"]
    assert gen.pipe.image_encoder is None  # predicted embeddings: the image tower is not loaded
    zeros = torch.zeros(2, 1, 24)
    ref = load_pipeline("StableUnCLIPImg2ImgPipeline", folders["unclip"])(image_embeds=emb, noise_level=50, prompt_embeds=zeros, negative_prompt_embeds=zeros,
                   num_inference_steps=4, guidance_scale=4.0, generator=seeded_generators(SEEDS, "cpu"),
                   output_type="pt").images
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_controlnet_hint_matches_controlnet_pipeline(folders):
    gen = ControlNetModulatedReconstructor("c", str(folders["controlnet"]), condition="tokens", control="hint",
                                           injection="hint", control_scale=0.7, steps=3, guidance_scale=2.5)
    assert gen.needs() == {"tokens": (None, 24), "hint": (3, 32, 32)}
    tokens, hint = _tokens(), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ours = gen.reconstruct({"tokens": tokens, "hint": hint}, SEEDS)["final"]
    pipe = StableDiffusionControlNetPipeline(**gen.pipe.components, requires_safety_checker=False)
    ref = pipe(image=hint, prompt_embeds=tokens, negative_prompt_embeds=torch.zeros_like(tokens),
               controlnet_conditioning_scale=0.7, num_inference_steps=3, guidance_scale=2.5,
               generator=seeded_generators(SEEDS, "cpu"), output_type="pt").images
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_strength_bounds_and_kept_steps(folders):
    gen = EmbedsConditionedReconstructor("t", str(folders["embeds"]), condition="tokens", steps=20)
    assert len(start_timesteps(gen.pipe.scheduler, 20, 0.85, "cpu")) == 17  # MindEye1's int(20·0.85)
    assert len(start_timesteps(gen.pipe.scheduler, 20, 1.0, "cpu")) == 20
    # Brain-IT's unCLIP starts at step index 14 of 50 (36 steps run, docs/methods/brainit.md §6): strength 0.72
    brainit = start_timesteps(gen.pipe.scheduler, 50, 0.72, "cpu")
    gen.pipe.scheduler.set_timesteps(50)
    assert len(brainit) == 36 and torch.equal(brainit, gen.pipe.scheduler.timesteps[14:])
    with pytest.raises(ValueError, match=r"generator.strength: must be in \(0, 1\], got 1.5"):
        start_timesteps(gen.pipe.scheduler, 20, 1.5, "cpu")
    with pytest.raises(ValueError, match="leaves no denoising step"):
        start_timesteps(gen.pipe.scheduler, 4, 0.1, "cpu")
