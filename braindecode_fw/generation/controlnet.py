"""ControlNet-modulated Stable Diffusion: a predicted low-level control map injected into the UNet
encoder, predicted high-level tokens in place of the text context (``generator=controlnet_modulated``;
NeuroPictor, docs/methods/neuropictor.md §2, §5).

NeuroPictor keeps SD 2.1 locked and trains a ControlNet copy of its encoder whose image-hint CNN is
unused: the fMRI low-level map ``(320, 64, 64)`` is *added* to the output of the ControlNet's first
block (``conv_in``), and the 13 zero-conv outputs are added to the locked UNet's skip connections
and middle block. ``injection="first_block"`` does exactly that by replacing diffusers'
``controlnet_cond_embedding`` with the identity, so the map is added to ``conv_in(x)`` as is;
``injection="hint"`` keeps the standard ControlNet hint encoder (a ``(3, H, W)`` control image).
The unconditional branch keeps the same control (NeuroPictor's CFG) with zeros or the empty-prompt
embedding as context.
"""

from __future__ import annotations

from typing import Any

import torch

from braindecode_fw.contracts import CONTROL_MAP
from braindecode_fw.errors import ConfigError
from braindecode_fw.generation.diffusion import DiffusersReconstructor, effective_dtype
from braindecode_fw.generation.loading import load_model

INJECTIONS = ("first_block", "hint")
NEGATIVES = ("zeros", "empty_prompt")


class ControlNetModulatedReconstructor(DiffusersReconstructor):
    """``condition`` ``(n, L, width)`` tokens + ``control`` map -> images. ``controlnet`` names a
    ``ControlNetModel`` (hub id or folder) when the pipeline folder does not hold one, or
    ``"from_unet"`` for a fresh copy of the pipeline UNet's encoder (zero output convolutions)."""

    pipeline_class = "StableDiffusionControlNetPipeline"
    default_components = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}

    def __init__(self, name: str, model: str, *, condition: str = "clip_text_tokens", control: str = CONTROL_MAP,
                 controlnet: str | None = None, injection: str = "first_block", control_scale: float = 1.0,
                 negative: str = "zeros", **kwargs: Any):
        if injection not in INJECTIONS:
            raise ConfigError(f"generator ({name}).injection: one of {INJECTIONS}, got {injection!r}")
        if negative not in NEGATIVES:
            raise ConfigError(f"generator ({name}).negative: one of {NEGATIVES}, got {negative!r}")
        components = dict(kwargs.pop("components", None) or {})
        dtype = effective_dtype(kwargs.get("dtype", "float32"), kwargs.get("device", "cpu"))
        if controlnet == "from_unet":
            # ControlNet's own initialisation: a copy of the UNet encoder with zero output convolutions
            # (NeuroPictor's starting point; outputs equal the UNet alone until it is trained)
            from diffusers import ControlNetModel

            unet = load_model("UNet2DConditionModel", model, subfolder="unet", config_key=f"generator ({name}).model",
                              dtype=dtype)
            components.update(unet=unet, controlnet=ControlNetModel.from_unet(unet).to(unet.dtype))
        elif controlnet:
            components["controlnet"] = load_model("ControlNetModel", controlnet,
                                                  config_key=f"generator ({name}).controlnet", dtype=dtype)
        if negative == "zeros":
            components.setdefault("text_encoder", None)
            components.setdefault("tokenizer", None)
        super().__init__(name, model, components=components, **kwargs)
        if negative == "empty_prompt" and self.pipe.text_encoder is None:
            raise ConfigError(f"generator ({name}).negative: empty_prompt needs the pipeline's text encoder; "
                             f"{model} has none (use negative: zeros)")
        self.controlnet = self.pipe.controlnet
        if injection == "first_block":
            self.controlnet.controlnet_cond_embedding = torch.nn.Identity()
        self.condition, self.control = condition, control
        self.injection, self.control_scale, self.negative = injection, control_scale, negative
        self.width = self.unet.config.cross_attention_dim

    def condition_needs(self) -> dict[str, tuple[int | None, ...] | None]:
        if self.injection == "first_block":
            side = self.image_size // self.vae_scale
            control = (self.controlnet.config.block_out_channels[0], side, side)
        else:
            control = (self.controlnet.config.conditioning_channels, self.image_size, self.image_size)
        return {self.condition: (None, self.width), self.control: control}

    def unconditional_context(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.negative == "zeros":
            return torch.zeros_like(tokens)
        empty = self.pipe.encode_prompt("", self.device, 1, False)[0]
        return empty.expand(len(tokens), -1, -1).to(tokens.dtype)

    def reconstruct_batch(self, outputs, seeds, lowlevel):
        tokens = outputs[self.condition].to(self.device, self.dtype)
        control = outputs[self.control].to(self.device, self.dtype)
        uncond = self.unconditional_context(tokens)

        def model(x, t, guided):
            ctx = torch.cat([uncond, tokens]) if guided else tokens
            ctl = torch.cat([control, control]) if guided else control  # same control in both branches
            down, mid = self.controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=ctl,
                                        conditioning_scale=self.control_scale, return_dict=False)
            return self.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample

        return self.sample(model, seeds, lowlevel)
