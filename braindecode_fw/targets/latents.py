"""SD-VAE latents as a target (MindEye2's low-level branch, docs/methods/mindeye2.md §1): images resized to
``image_size`` (224 -> 4×28×28), mapped to [-1, 1], encoded with a diffusers ``AutoencoderKL``
(hub id or local folder, optional ``subfolder``), the latent distribution's mode times the scaling
factor (0.18215 for SD-1.x VAEs)."""

from __future__ import annotations

from typing import Any

import torch

from braindecode_fw.targets.encoders import ImageEncoder, Preprocess, _weights_fingerprint


class VaeLatentEncoder(ImageEncoder):
    def __init__(self, model: str, *, subfolder: str | None = "vae", feature_name: str = "vae_latent",
                 image_size: int = 224, scaling_factor: float | None = None, revision: str | None = None,
                 local_files_only: bool = False, batch_size: int = 32, device: str = "cpu"):
        # mean/std 0.5 turn [0, 1] pixels into the VAE's [-1, 1]
        pre = Preprocess(image_size=image_size, mean=[0.5] * 3, std=[0.5] * 3)
        super().__init__(feature_name, "latent", pre, batch_size, device, outputs=("latent",))
        from diffusers import AutoencoderKL

        self.model_ref, self.subfolder, self.revision = model, subfolder, revision
        self.vae = AutoencoderKL.from_pretrained(model, subfolder=subfolder, revision=revision,
                                                 local_files_only=local_files_only).to(device).eval()
        self.vae.requires_grad_(False)
        self.scaling_factor = scaling_factor if scaling_factor is not None else self.vae.config.scaling_factor

    def identity(self) -> dict[str, Any]:
        return {"backend": "diffusers-vae", "model": _weights_fingerprint(self.model_ref), "subfolder": self.subfolder,
                "revision": self.revision, "scaling_factor": self.scaling_factor}

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.mode() * self.scaling_factor
