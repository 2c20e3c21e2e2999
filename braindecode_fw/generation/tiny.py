"""Tiny diffusers pipelines with the real classes, built from small configs (tests, synthetic world).

``build_tiny_pipeline`` writes a pipeline folder with ``save_pretrained`` (atomically: a temporary
folder renamed when complete); reconstructors then load it through the same
:func:`~braindecode_fw.generation.loading.load_pipeline` a hub id goes through. Weights are
random (seeded) until a trained tiny generator ships; the pictures then show the plumbing only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.io import remove_dead_temporaries
from braindecode_fw.ops.faults import fault_point

KINDS = ("embeds", "unclip", "versatile", "controlnet")


_UNET = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), attention_head_dim=8,
             norm_num_groups=8)


def _unet(image_size: int, cross_attention_dim: int, **extra: Any):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        **_UNET, **extra)


def _text_unet(image_size: int, cross_attention_dim: int):
    """Versatile Diffusion's text UNet: the image UNet's layout with flat (1×1) blocks, so every
    cross-attention transformer has a partner at the same module path."""
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
        UNetFlatConditionModel,
    )

    return UNetFlatConditionModel(
        sample_size=image_size // 4, down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
        up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"), mid_block_type="UNetMidBlockFlatCrossAttn",
        cross_attention_dim=cross_attention_dim, **_UNET)


def _controlnet(unet):
    """A ControlNet copy of ``unet``'s encoder. diffusers zero-initialises its output convolutions
    (a fresh ControlNet changes nothing); the tiny one gets small random ones instead so that the
    control map visibly modulates the images, as a trained one does."""
    from diffusers import ControlNetModel

    # the hint encoder downsamples by 4 like the tiny VAE (SD: 8, with four levels)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.2)
    return net


def _vae(image_size: int):
    from diffusers import AutoencoderKL

    # 3 resolution levels: a factor-4 latent (4 × image_size/4²), SD's latent layout at small size
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=image_size)


def build_tiny_pipeline(kind: str, folder: str | Path, *, image_size: int = 64, cross_attention_dim: int = 128,
                        embed_dim: int = 128, seed: int = 0) -> Path:
    """Build and save a tiny pipeline of the real class: ``kind="embeds"``: ``StableDiffusionPipeline``
    (token-conditioned); ``"unclip"``: ``StableUnCLIPImg2ImgPipeline`` (conditioned on an
    ``embed_dim`` image embedding); ``"versatile"``: ``VersatileDiffusionPipeline`` (image + text
    UNets, saved as the universal checkpoint the hub holds); ``"controlnet"``:
    ``StableDiffusionControlNetPipeline``. Returns the folder."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableUnCLIPImg2ImgPipeline,
        VersatileDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    if kind not in KINDS:
        raise ConfigError(f"generator.build_tiny.kind: one of {KINDS}, got {kind!r}")
    if image_size % 4:
        raise ConfigError(f"generator.build_tiny.image_size: must be a multiple of 4, got {image_size}")
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
        elif kind == "versatile":
            pipe = VersatileDiffusionPipeline(
                tokenizer=None, image_feature_extractor=None, text_encoder=None, image_encoder=None,
                image_unet=_unet(image_size, cross_attention_dim), text_unet=_text_unet(image_size, cross_attention_dim),
                vae=_vae(image_size), scheduler=DDIMScheduler(**scheduler_kw))
        elif kind == "controlnet":
            unet = _unet(image_size, cross_attention_dim)
            pipe = StableDiffusionControlNetPipeline(
                vae=_vae(image_size), text_encoder=None, tokenizer=None, unet=unet, controlnet=_controlnet(unet),
                scheduler=DDIMScheduler(**scheduler_kw), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
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
    # a private temporary name per process: parallel jobs of a sweep may build the same cache folder
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    remove_dead_temporaries(folder.parent, folder.name)  # killed builds' (this pid's included), not live ones'
    pipe.save_pretrained(tmp)
    fault_point("tiny.written", folder)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published it meanwhile
    return folder
