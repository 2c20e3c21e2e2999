"""Reconstructors over diffusers pipelines (docs/methods/{mindeye2,mindbridge,brainit}.md §6; docs/reconstruction.md).

- :class:`DiffusersReconstructor`: what every pipeline-backed generator shares: one loader for a
  hub id or a local folder, the scheduler/steps/guidance/dtype/batching options, and the
  low-level branch (a predicted VAE latent decoded to the blurry image, or a predicted low-level
  image, optionally the img2img start at ``strength``) and the optional output contrast compression
  (``contrast``, Brain-IT's ×0.8).
- :class:`UnClipReconstructor` (``generator=sd21_unclip``): Stable unCLIP conditioned on a predicted
  CLIP image embedding (``image_embeds``; ``stabilityai/stable-diffusion-2-1-unclip``: 1024-d
  OpenCLIP ViT-H/14 pooled), empty prompt, zero unconditional class embedding as the pipeline
  does; with a low-level image and ``strength`` < 1 it starts from that image (Brain-IT, docs/methods/brainit.md
  §6, starts its unCLIP from the VAE-encoded low-level image).
- :class:`EmbedsConditionedReconstructor` (``generator=sd_embeds``, ``sd_img2img`` and the synthetic
  world's ``tiny``): a Stable Diffusion UNet whose cross-attention context is a predicted token
  sequence (``prompt_embeds``), zero unconditional embeddings; img2img from the decoded low-level
  image when there is one (MindEye1/MindBridge's ``strength`` 0.85 path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from braindecode_fw.contracts import GENERATED_FINAL, GENERATED_LOWLEVEL
from braindecode_fw.errors import ConfigError
from braindecode_fw.generation.loading import load_pipeline
from braindecode_fw.generation.reconstructor import ProgressSink, Reconstructor
from braindecode_fw.generation.sampling import denoise, seeded_generators

LOWLEVEL_KINDS = ("latent", "image")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def effective_dtype(dtype: str, device: str) -> str:
    """The configured dtype on GPU; CPU always runs float32 (half precision is slow or missing there)."""
    return dtype if resolve_device(device).startswith("cuda") else "float32"


def compress_contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Images ``(n, 3, H, W)`` in [0, 1] -> ``clamp((s − 0.5)·factor + 0.5, 0, 1)``: Brain-IT's output
    contrast compression with ``factor`` 0.8 (docs/methods/brainit.md §6 step 2); ``factor`` 1 returns them as they are."""
    if factor == 1:
        return images
    return ((images - 0.5) * factor + 0.5).clamp(0, 1)


class DiffusersReconstructor(Reconstructor):
    """Base for pipeline-backed generators. ``lowlevel_target`` names a decoder output used for the
    low-level branch: ``lowlevel_kind="latent"`` (``(c, h, w)`` VAE latents stored multiplied by
    ``lowlevel_scale``, default the VAE's scaling factor) or ``"image"`` (``(3, H, W)`` in [0, 1],
    e.g. Brain-IT's Deep-Image-Prior image). ``require_lowlevel`` makes it a need instead of an
    option; ``strength`` < 1 starts sampling from the VAE-encoded low-level image (the last
    ``int(steps·strength)`` steps run: Brain-IT's unCLIP starts at step index 14 of 50, i.e.
    ``strength`` 0.72). ``contrast`` < 1 compresses the final images around mid-grey,
    ``clamp((s − 0.5)·contrast + 0.5, 0, 1)`` (Brain-IT's 0.8, docs/methods/brainit.md §6 step 2); 1 leaves them."""

    pipeline_class = "DiffusionPipeline"
    default_components: dict[str, Any] = {}

    def __init__(self, name: str, model: str, *, steps: int = 50, guidance_scale: float = 7.5,
                 image_size: int | None = None, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 8, lowlevel_target: str | None = None, lowlevel_kind: str = "latent",
                 lowlevel_scale: float | None = None, require_lowlevel: bool = False, strength: float = 1.0,
                 contrast: float = 1.0, revision: str | None = None, scheduler: dict[str, Any] | None = None,
                 components: dict[str, Any] | None = None):
        if lowlevel_kind not in LOWLEVEL_KINDS:
            raise ConfigError(f"generator ({name}).lowlevel_kind: one of {LOWLEVEL_KINDS}, got {lowlevel_kind!r}")
        if require_lowlevel and not lowlevel_target:
            raise ConfigError(f"generator ({name}).require_lowlevel: set lowlevel_target to the decoder output "
                             f"holding the low-level latent or image")
        if not contrast > 0:
            raise ConfigError(f"generator ({name}).contrast: a factor > 0 (1 = unchanged, Brain-IT 0.8), got {contrast}")
        self.name = name
        self.model = str(model)
        self.steps, self.guidance_scale, self.strength = steps, guidance_scale, strength
        self.contrast = float(contrast)
        self.device = resolve_device(device)
        dtype = effective_dtype(dtype, device)
        self.pipe = self.load(model, config_key=f"generator ({name}).model", dtype=dtype, revision=revision,
                              components={**self.default_components, **(components or {})}).to(self.device)
        if scheduler:
            import diffusers

            cls = getattr(diffusers, scheduler["class"])
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config,
                                                  **{k: v for k, v in scheduler.items() if k != "class"})
        self.vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.image_size = image_size or self.unet.config.sample_size * self.vae_scale
        self.batch_size = batch_size
        self.lowlevel_target, self.lowlevel_kind = lowlevel_target, lowlevel_kind
        self.require_lowlevel = require_lowlevel
        self.lowlevel_scale = lowlevel_scale if lowlevel_scale is not None else self.pipe.vae.config.scaling_factor

    def load(self, model: str, *, config_key: str, dtype: str, revision: str | None,
             components: dict[str, Any]) -> Any:
        """The pipeline, through the one loader (a hub id or a ``save_pretrained`` folder)."""
        return load_pipeline(self.pipeline_class, model, config_key=config_key, dtype=dtype, revision=revision,
                             components=components)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _lowlevel_shape(self) -> dict[str, tuple[int | None, ...]]:
        if not self.lowlevel_target:
            return {}
        c = self.pipe.vae.config.latent_channels if self.lowlevel_kind == "latent" else 3
        return {self.lowlevel_target: (c, None, None)}

    def needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {**self.condition_needs(), **(self._lowlevel_shape() if self.require_lowlevel else {})}

    def optional(self) -> dict[str, tuple[int | None, ...] | None]:
        return {} if self.require_lowlevel else self._lowlevel_shape()

    def condition_needs(self) -> dict[str, tuple[int | None, ...] | None]:
        raise NotImplementedError

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """VAE latents ``(n, c, h, w)`` stored multiplied by ``scale`` (default: the VAE's scaling
        factor) -> images ``(n, 3, f·h, f·w)`` in [0, 1] (MindEye2's blurry image for predicted latents)."""
        vae = self.pipe.vae
        scale = vae.config.scaling_factor if scale is None else scale
        x = vae.decode(latents.to(self.device, vae.dtype) / scale).sample
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` in [0, 1] -> ``(n, c, h, w)`` latents × scaling factor at ``image_size``
        (the latent distribution's mean: the start point does not depend on a seed)."""
        vae = self.pipe.vae
        x = torch.nn.functional.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear",
                                            align_corners=False)
        x = (x * 2 - 1).to(self.device, vae.dtype)
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def lowlevel_images(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The low-level image ``(n, 3, H, W)`` in [0, 1], or None when the decoder has none."""
        if not self.lowlevel_target or self.lowlevel_target not in outputs:
            return None
        value = outputs[self.lowlevel_target].float()
        if self.lowlevel_kind == "latent":
            return self.decode_latents(value, scale=self.lowlevel_scale)
        return value.clamp(0, 1)

    def latent_shape(self, n: int) -> tuple[int, int, int, int]:
        side = self.image_size // self.vae_scale
        return (n, self.unet.config.in_channels, side, side)

    def sample(self, model, seeds: Sequence[int], init: torch.Tensor | None, noise_before=None) -> torch.Tensor:
        """The shared loop (generation/sampling.py) -> images ``(n, 3, H, W)`` in [0, 1]."""
        generators = seeded_generators(seeds, self.device)
        init_latents = self.encode_images(init) if init is not None and self.strength < 1 else None
        latents = denoise(model, self.pipe.scheduler, shape=self.latent_shape(len(seeds)), generators=generators,
                          steps=self.steps, guidance_scale=self.guidance_scale, device=self.device, dtype=self.dtype,
                          init_latents=init_latents, strength=self.strength,
                          noise_before=None if noise_before is None else lambda: noise_before(generators))
        return self.decode_latents(latents)

    def reconstruct(self, outputs: dict[str, torch.Tensor], seeds: Sequence[int], *,
                    progress: ProgressSink | None = None) -> dict[str, torch.Tensor]:
        lowlevel = self.lowlevel_images(outputs)
        n = len(seeds)
        finals = []
        for start in range(0, n, self.batch_size):
            part = slice(start, min(start + self.batch_size, n))
            chunk = {k: v[part] for k, v in outputs.items()}
            finals.append(self.reconstruct_batch(chunk, seeds[part], None if lowlevel is None else lowlevel[part]))
            if progress is not None:
                progress.update(len(finals[-1]))
        result = {GENERATED_FINAL: compress_contrast(torch.cat(finals), self.contrast)}
        if lowlevel is not None:
            result[GENERATED_LOWLEVEL] = lowlevel
        return result

    def reconstruct_batch(self, outputs: dict[str, torch.Tensor], seeds: Sequence[int],
                          lowlevel: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnClipReconstructor(DiffusersReconstructor):
    """Stable unCLIP (``StableUnCLIPImg2ImgPipeline`` components) from predicted ``image_embeds``
    ``(n, d)``: the embedding is noised to ``noise_level`` and appended with its timestep embedding
    as the UNet's class label (the pipeline's ``noise_image_embeddings``); the unconditional class
    label is zeros; the text context is the empty prompt (zeros when no text tower is saved).
    ``condition_norm``: rescale every predicted embedding to this L2 norm first (the synthetic
    world's tiny generator was trained on unit-norm embeddings, and a contrastively trained decoder
    predicts directions only); None (real Stable unCLIP) passes the prediction as it is."""

    pipeline_class = "StableUnCLIPImg2ImgPipeline"
    # the embedding is predicted: the CLIP image tower (ViT-H, ~0.63 B parameters) is not loaded
    default_components = {"image_encoder": None, "feature_extractor": None}

    def __init__(self, name: str, model: str, *, condition: str = "clip_image_pooled", noise_level: int = 0,
                 prompt: str = "", condition_norm: float | None = None, **kwargs: Any):
        super().__init__(name, model, **kwargs)
        if condition_norm is not None and condition_norm <= 0:
            raise ConfigError(f"generator ({name}).condition_norm: must be > 0 or null, got {condition_norm}")
        self.condition = condition
        self.condition_norm = condition_norm
        self.noise_level = noise_level
        self.prompt = prompt
        self.embed_dim = self.unet.config.projection_class_embeddings_input_dim // 2
        self._contexts: tuple[torch.Tensor, torch.Tensor] | None = None

    def condition_needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {self.condition: (self.embed_dim,)}

    def text_contexts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) encoder states ``(1, L, width)``: the empty prompt and
        ``prompt`` as the pipeline encodes them; zeros ``(1, 1, width)`` without a text tower."""
        if self._contexts is None:
            if self.pipe.text_encoder is None:
                zeros = torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
                self._contexts = (zeros, zeros)
            else:
                cond, uncond = self.pipe.encode_prompt(self.prompt, self.device, 1, True)
                self._contexts = (uncond, cond)
        return self._contexts

    def reconstruct_batch(self, outputs, seeds, lowlevel):
        emb = outputs[self.condition].to(self.device, self.dtype)
        if self.condition_norm is not None:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).to(self.dtype) * self.condition_norm
        labels: dict[str, torch.Tensor] = {}

        def noise_embeddings(generators):  # drawn before the latents, from the same generators
            labels["cond"] = self.pipe.noise_image_embeddings(emb, self.noise_level, generator=generators)

        uncond_ctx, cond_ctx = self.text_contexts()

        def model(x, t, guided):
            label, ctx = labels["cond"], cond_ctx.expand(len(emb), -1, -1)
            if guided:
                label = torch.cat([torch.zeros_like(label), label])
                ctx = torch.cat([uncond_ctx.expand(len(emb), -1, -1), ctx])
            return self.unet(x, t, encoder_hidden_states=ctx, class_labels=label).sample

        return self.sample(model, seeds, lowlevel, noise_before=noise_embeddings)


class EmbedsConditionedReconstructor(DiffusersReconstructor):
    """Stable Diffusion with predicted token embeddings ``(n, L, width)`` as the cross-attention
    context and zero unconditional embeddings (MindBridge's zero negatives); img2img from the
    low-level image at ``strength``."""

    pipeline_class = "StableDiffusionPipeline"
    default_components = {"text_encoder": None, "tokenizer": None, "safety_checker": None,
                          "feature_extractor": None, "image_encoder": None}

    def __init__(self, name: str, model: str, *, condition: str = "clip_image_tokens", **kwargs: Any):
        super().__init__(name, model, **kwargs)
        self.condition = condition
        self.width = self.unet.config.cross_attention_dim

    def condition_needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {self.condition: (None, self.width)}

    def reconstruct_batch(self, outputs, seeds, lowlevel):
        tokens = outputs[self.condition].to(self.device, self.dtype)

        def model(x, t, guided):
            ctx = torch.cat([torch.zeros_like(tokens), tokens]) if guided else tokens
            return self.unet(x, t, encoder_hidden_states=ctx).sample

        return self.sample(model, seeds, lowlevel)
