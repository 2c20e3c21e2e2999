"""Tiny diffusers pipelines with the real classes, built from small configs (tests, synthetic world).

``build_tiny_pipeline`` writes a pipeline folder with ``save_pretrained`` (atomically: a temporary
folder renamed when complete); reconstructors then load it through the same
:func:`~braindecode_fw.generation.loading.load_pipeline` a hub id goes through. Weights are
random (seeded) until a trained tiny generator ships; the pictures then show the plumbing only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

KINDS = ("embeds", "unclip")


def _unet(image_size: int, cross_attention_dim: int, **extra: Any):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, **extra)


def _vae(image_size: int):
    from diffusers import AutoencoderKL

    # 3 resolution levels: a factor-4 latent (4 × image_size/4²), SD's latent layout at small size
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=image_size)


def build_tiny_pipeline(kind: str, folder: str | Path, *, image_size: int = 64, cross_attention_dim: int = 128,
                        embed_dim: int = 128, seed: int = 0) -> Path:
    """Build and save a tiny ``StableDiffusionPipeline`` (``kind="embeds"``: token-conditioned) or
    ``StableUnCLIPImg2ImgPipeline`` (``kind="unclip"``: conditioned on an ``embed_dim`` image
    embedding). Returns the folder."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableUnCLIPImg2ImgPipeline,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    if kind not in KINDS:
        raise ValueError(f"generator.build_tiny.kind: one of {KINDS}, got {kind!r}")
    if image_size % 4:
        raise ValueError(f"generator.build_tiny.image_size: must be a multiple of 4, got {image_size}")
    folder = Path(folder)
    scheduler_kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "embeds":
            pipe = StableDiffusionPipeline(
                vae=_vae(image_size), text_encoder=None, tokenizer=None,
                unet=_unet(image_size, cross_attention_dim), scheduler=DDIMScheduler(**scheduler_kw),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            from transformers import (
                CLIPImageProcessor,
                CLIPVisionConfig,
                CLIPVisionModelWithProjection,
            )

            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=embed_dim))
            pipe = StableUnCLIPImg2ImgPipeline(
                feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                image_encoder=encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
                image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                tokenizer=None, text_encoder=None,
                unet=_unet(image_size, cross_attention_dim, class_embed_type="projection",
                           projection_class_embeddings_input_dim=2 * embed_dim),
                scheduler=DDIMScheduler(**scheduler_kw, prediction_type="v_prediction"), vae=_vae(image_size))
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
