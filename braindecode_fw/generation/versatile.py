"""Versatile Diffusion dual guidance from predicted image and text tokens (``generator=versatile_dual``;
MindBridge's generator, docs/methods/mindbridge.md §6).

``VersatileDiffusionDualGuidedPipeline`` encodes a prompt and an image itself; brain decoding has
predicted CLIP ViT-L/14 tokens instead (image 257×768, text 77×768 at real scale). This
reconstructor loads the same pipeline (hub id ``shi-labs/versatile-diffusion`` or a local folder;
the CLIP towers are not loaded, nothing encodes images or prompts), routes the text tokens to the
text UNet's transformers and the image tokens to the image UNet's inside each
``DualTransformer2DModel`` with ``mix_ratio = text_to_image_strength`` (the pipeline's
``set_transformer_params`` with the token counts of the predictions), and samples with zero
unconditional tokens for both streams, as MindBridge's ``recon.py`` does.

The pipeline lives in ``diffusers.pipelines.deprecated`` (still importable in the pinned diffusers);
the loader finds it through the top-level ``diffusers`` namespace.
"""

from __future__ import annotations

from typing import Any

import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.generation.diffusion import DiffusersReconstructor
from braindecode_fw.generation.loading import load_config, load_model

RENORMALIZE = ("token0", "none")


class DualStreamTransformer(torch.nn.Module):
    """Versatile Diffusion's dual guidance in one attention position: the same latent goes through
    the image UNet's transformer with the image tokens and the text UNet's transformer with the text
    tokens; their residuals are mixed, ``text_weight`` for text. Replaces diffusers'
    ``DualTransformer2DModel`` (same arithmetic), whose ``forward`` no longer accepts the
    arguments the current UNet blocks pass (``encoder_attention_mask``).

    ``encoder_hidden_states``: ``(n, L_txt + L_img, d)``, text first."""

    def __init__(self, image_transformer: torch.nn.Module, text_transformer: torch.nn.Module):
        super().__init__()
        self.transformers = torch.nn.ModuleList([image_transformer, text_transformer])
        self.text_weight = 0.5
        self.text_tokens = 77

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep=None,
                cross_attention_kwargs=None, return_dict: bool = True, **_: Any):
        from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput

        def residual(transformer, context):
            out = transformer(hidden_states, encoder_hidden_states=context, timestep=timestep,
                              cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            return out - hidden_states

        text = residual(self.transformers[1], encoder_hidden_states[:, : self.text_tokens])
        image = residual(self.transformers[0], encoder_hidden_states[:, self.text_tokens:])
        out = hidden_states + self.text_weight * text + (1 - self.text_weight) * image
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def use_dual_streams(image_unet: torch.nn.Module) -> list[DualStreamTransformer]:
    """Swap every ``DualTransformer2DModel`` in ``image_unet`` for a :class:`DualStreamTransformer`
    holding the same two transformers (weights shared, nothing copied)."""
    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

    swapped = []
    for name, module in list(image_unet.named_modules()):
        if isinstance(module, DualTransformer2DModel):
            parent, index = name.rsplit(".", 1)
            dual = DualStreamTransformer(module.transformers[0], module.transformers[1])
            image_unet.get_submodule(parent)[int(index)] = dual
            swapped.append(dual)
    return swapped


def renormalize_by_token0(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(n, L, d)`` -> each sample divided by the L2 norm of its token 0 (MindBridge's
    re-normalisation of predicted tokens; VD's own image encoder divides by the CLS norm)."""
    return tokens / (tokens[:, :1].norm(dim=-1, keepdim=True) + eps)


class VersatileDualReconstructor(DiffusersReconstructor):
    """Dual-guided Versatile Diffusion: ``image_condition`` ``(n, L_img, d)`` and
    ``text_condition`` ``(n, L_txt, d)`` -> images; ``text_to_image_strength`` is the weight of the
    text stream (MindBridge: 0.5)."""

    pipeline_class = "VersatileDiffusionDualGuidedPipeline"

    def __init__(self, name: str, model: str, *, image_condition: str = "clip_image_tokens",
                 text_condition: str = "clip_text_tokens", text_to_image_strength: float = 0.5,
                 renormalize: str = "token0", **kwargs: Any):
        if not 0 <= text_to_image_strength <= 1:
            raise ConfigError(f"generator ({name}).text_to_image_strength: must be in [0, 1], "
                             f"got {text_to_image_strength}")
        if renormalize not in RENORMALIZE:
            raise ConfigError(f"generator ({name}).renormalize: one of {RENORMALIZE}, got {renormalize!r}")
        super().__init__(name, model, **kwargs)
        self.image_condition, self.text_condition = image_condition, text_condition
        self.text_to_image_strength = text_to_image_strength
        self.renormalize = renormalize
        self.width = self.unet.config.cross_attention_dim
        self.streams = use_dual_streams(self.unet)
        if not self.streams:
            raise ConfigError(f"generator ({name}).model: {model}'s image UNet has no cross-attention transformers "
                             f"to pair with the text UNet's")

    def load(self, model: str, *, config_key: str, dtype: str, revision: str | None,
             components: dict[str, Any]) -> Any:
        """Component by component: diffusers' ``from_pretrained`` cannot resolve the text UNet's class
        from ``model_index.json`` since the pipeline moved to ``deprecated`` (the hub folder names it
        ``["versatile_diffusion", "UNetFlatConditionModel"]``), so each UNet, the VAE and the
        scheduler load from their subfolders of the same hub id or folder; building the
        dual-guided pipeline from them merges the two UNets' transformers."""
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
            UNetFlatConditionModel,
        )

        def part(cls, subfolder):
            if subfolder in components:
                return components[subfolder]
            return load_model(cls, model, subfolder=subfolder, config_key=config_key, dtype=dtype, revision=revision)

        scheduler = components.get("scheduler")
        if scheduler is None:
            config = load_config(model, subfolder="scheduler", config_key=config_key, revision=revision)
            scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        pipe = diffusers.VersatileDiffusionDualGuidedPipeline(
            tokenizer=None, image_feature_extractor=None, text_encoder=None, image_encoder=None,
            image_unet=part(UNet2DConditionModel, "image_unet"), text_unet=part(UNetFlatConditionModel, "text_unet"),
            vae=part(AutoencoderKL, "vae"), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def unet(self):
        return self.pipe.image_unet

    def condition_needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {self.image_condition: (None, self.width), self.text_condition: (None, self.width)}

    def reconstruct_batch(self, outputs, seeds, lowlevel):
        image = outputs[self.image_condition].to(self.device, self.dtype)
        text = outputs[self.text_condition].to(self.device, self.dtype)
        if self.renormalize == "token0":
            image, text = renormalize_by_token0(image), renormalize_by_token0(text)
        for stream in self.streams:
            stream.text_weight, stream.text_tokens = self.text_to_image_strength, text.shape[1]
        context = torch.cat([text, image], dim=1)

        def model(x, t, guided):
            ctx = torch.cat([torch.zeros_like(context), context]) if guided else context
            return self.unet(x, t, encoder_hidden_states=ctx).sample

        return self.sample(model, seeds, lowlevel)
