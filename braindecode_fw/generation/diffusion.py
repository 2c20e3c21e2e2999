"""Reconstructors over diffusers pipelines (methods.md §3.6, §4.6; ecosystem.md §5).

- :class:`UnClipReconstructor` (``generator=sd21_unclip``): Stable unCLIP conditioned on a predicted
  CLIP image embedding through ``image_embeds`` (``stabilityai/stable-diffusion-2-1-unclip``: 1024-d
  OpenCLIP ViT-H/14 pooled embeddings), empty prompt, classifier-free guidance.
- :class:`EmbedsConditionedReconstructor` (``generator=sd_embeds`` and the synthetic world's
  ``tiny``): a Stable Diffusion UNet whose cross-attention context is a predicted token sequence
  (``prompt_embeds``), with zero unconditional embeddings as MindBridge's Versatile Diffusion
  call; with a low-level image it runs img2img from that image at ``strength``.

Every pipeline comes from :func:`braindecode_fw.generation.loading.load_pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from braindecode_fw.generation.loading import load_pipeline
from braindecode_fw.generation.reconstructor import Reconstructor


def _generators(seeds: Sequence[int], device: str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _to_tensor(images: Any) -> torch.Tensor:
    """diffusers ``output_type="pt"`` images -> float32 CPU ``(n, 3, H, W)`` in [0, 1]."""
    return torch.as_tensor(images).float().cpu().clamp(0, 1)


class _DiffusersReconstructor(Reconstructor):
    pipeline_class = "DiffusionPipeline"

    def __init__(self, name: str, model: str, *, steps: int = 50, guidance_scale: float = 7.5,
                 image_size: int | None = None, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 8, lowlevel_target: str | None = None, lowlevel_scale: float | None = None,
                 revision: str | None = None, scheduler: dict[str, Any] | None = None,
                 components: dict[str, Any] | None = None):
        self.name = name
        self.model = str(model)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = dtype if self.device.startswith("cuda") else "float32"  # half precision only on GPU
        self.pipe = load_pipeline(self.pipeline_class, model, config_key=f"generator ({name}).model", dtype=dtype,
                                  device=self.device, revision=revision, components=components)
        if scheduler:
            import diffusers

            cls = getattr(diffusers, scheduler["class"])
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config,
                                                  **{k: v for k, v in scheduler.items() if k != "class"})
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.image_size = image_size or self.pipe.unet.config.sample_size * vae_scale
        self.batch_size = batch_size
        self.lowlevel_target = lowlevel_target
        self.lowlevel_scale = lowlevel_scale if lowlevel_scale is not None else self.pipe.vae.config.scaling_factor

    def optional(self) -> dict[str, tuple[int | None, ...] | None]:
        if not self.lowlevel_target:
            return {}
        c = self.pipe.vae.config.latent_channels
        return {self.lowlevel_target: (c, None, None)}

    @torch.no_grad()
    def decode_lowlevel(self, latents: torch.Tensor) -> torch.Tensor:
        """Predicted VAE latents ``(n, c, h, w)`` -> blurry images ``(n, 3, 8h, 8w)`` in [0, 1]
        (MindEye2's low-level branch: latents are stored multiplied by the VAE scaling factor)."""
        vae = self.pipe.vae
        x = vae.decode(latents.to(self.device, vae.dtype) / self.lowlevel_scale).sample
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)


class UnClipReconstructor(_DiffusersReconstructor):
    """Stable unCLIP (``StableUnCLIPImg2ImgPipeline``) from predicted ``image_embeds``."""

    pipeline_class = "StableUnCLIPImg2ImgPipeline"

    def __init__(self, name: str, model: str, *, condition: str = "clip_image_pooled", noise_level: int = 0,
                 prompt: str = "", **kwargs: Any):
        super().__init__(name, model, **kwargs)
        self.condition = condition
        self.noise_level = noise_level
        self.prompt = prompt
        self.embed_dim = self.pipe.unet.config.projection_class_embeddings_input_dim // 2

    def needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {self.condition: (self.embed_dim,)}

    @torch.no_grad()
    def reconstruct(self, outputs: dict[str, torch.Tensor], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        emb = outputs[self.condition].float()
        images = []
        for start in range(0, len(emb), self.batch_size):
            chunk = emb[start : start + self.batch_size].to(self.device, self.pipe.unet.dtype)
            kw: dict[str, Any] = {}
            if self.pipe.text_encoder is None:  # no text tower saved: an empty prompt as zero embeddings
                width = self.pipe.unet.config.cross_attention_dim
                kw["prompt_embeds"] = torch.zeros(len(chunk), 1, width, device=self.device, dtype=chunk.dtype)
                kw["negative_prompt_embeds"] = kw["prompt_embeds"]
            else:
                kw["prompt"] = [self.prompt] * len(chunk)
            out = self.pipe(image_embeds=chunk, noise_level=self.noise_level, num_inference_steps=self.steps,
                            guidance_scale=self.guidance_scale, height=self.image_size, width=self.image_size,
                            generator=_generators(seeds[start : start + len(chunk)], self.device),
                            output_type="pt", **kw)
            images.append(_to_tensor(out.images))
        return {"final": torch.cat(images)}


class EmbedsConditionedReconstructor(_DiffusersReconstructor):
    """Stable Diffusion with predicted token embeddings as the cross-attention context; img2img
    from the decoded low-level image when the decoder provides one and ``strength`` < 1."""

    pipeline_class = "StableDiffusionPipeline"

    def __init__(self, name: str, model: str, *, condition: str = "clip_image_tokens", strength: float = 0.85,
                 **kwargs: Any):
        kwargs.setdefault("components", {"text_encoder": None, "tokenizer": None, "safety_checker": None,
                                         "feature_extractor": None, "image_encoder": None})
        super().__init__(name, model, **kwargs)
        self.condition = condition
        self.strength = strength
        self.width = self.pipe.unet.config.cross_attention_dim

    def needs(self) -> dict[str, tuple[int | None, ...] | None]:
        return {self.condition: (None, self.width)}

    @torch.no_grad()
    def reconstruct(self, outputs: dict[str, torch.Tensor], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        from diffusers import StableDiffusionImg2ImgPipeline

        tokens = outputs[self.condition].float()
        lowlevel = None
        if self.lowlevel_target and self.lowlevel_target in outputs:
            lowlevel = self.decode_lowlevel(outputs[self.lowlevel_target].float())
        img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False) \
            if lowlevel is not None else None
        images = []
        for start in range(0, len(tokens), self.batch_size):
            chunk = tokens[start : start + self.batch_size].to(self.device, self.pipe.unet.dtype)
            common = {"prompt_embeds": chunk, "negative_prompt_embeds": torch.zeros_like(chunk),
                      "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                      "generator": _generators(seeds[start : start + len(chunk)], self.device), "output_type": "pt"}
            if img2img is not None:
                init = lowlevel[start : start + len(chunk)]
                init = torch.nn.functional.interpolate(init, size=(self.image_size,) * 2, mode="bilinear")
                out = img2img(image=init.to(self.device), strength=self.strength, **common)
            else:
                out = self.pipe(height=self.image_size, width=self.image_size, **common)
            images.append(_to_tensor(out.images))
        result = {"final": torch.cat(images)}
        if lowlevel is not None:
            result["lowlevel"] = lowlevel
        return result
