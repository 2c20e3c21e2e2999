"""Frozen image encoders that define the target feature spaces (docs/architecture.md §4.3).

Every encoder has a stable ``encoder_id`` (backend + model + weights + output + preprocessing), so
the target cache is invalidated whenever any of these change, and declares its preprocessing in
config. Two backends:

- :class:`OpenClipImageEncoder`: any open_clip architecture; ``pretrained`` is an open_clip tag,
  a local ``.pt``/``.safetensors`` file, or ``None`` (random init from ``seed``, with optional
  ``model_overrides`` to shrink the architecture: the synthetic world's default).
- :class:`HFClipImageEncoder`: ``transformers`` ``CLIPVisionModelWithProjection`` from a hub id
  or a local folder (e.g. ``openai/clip-vit-large-patch14``: pooled 768, tokens 257×768).
- :class:`HFDinov2ImageEncoder`: ``transformers`` ``Dinov2Model`` (e.g. ``facebook/dinov2-giant``,
  the MEG image target of Benchetrit et al. 2023: pooled 1536, tokens 257×1536), with outputs
  ``pooled``/``mean``/``cls_mean``/``tokens``.

``output="pooled"`` gives ``(n, embed_dim)``; ``output="tokens"`` gives the last-layer token
sequence ``(n, n_tokens, width)`` (open_clip: patch tokens after ``ln_post``; transformers:
``last_hidden_state`` including the class token); transformers' ``output="tokens_vd"`` gives
Versatile Diffusion's normalised projected tokens (257×768 for ViT-L/14). Caption targets are in
:mod:`braindecode_fw.targets.text`, VAE latents in :mod:`braindecode_fw.targets.latents`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from braindecode_fw.contracts import StimulusStore
from braindecode_fw.errors import ConfigError

log = logging.getLogger(__name__)

OUTPUTS = ("pooled", "tokens")
DINOV2_OUTPUTS = ("pooled", "mean", "cls_mean", "tokens", "layer_tokens")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_LATER_OPTIONS = ("align_corners", "mindeye2_half_shift")


@dataclass
class Preprocess:
    """uint8 RGB -> normalised float tensor. Declared in config, part of the encoder id."""

    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = "bicubic"
    antialias: bool = True
    align_corners: bool = False
    # MindEye2's OpenCLIP embedder maps its input with (x+1)/2 although its images are already in
    # [0, 1], so bigG sees [0.5, 1] (docs/methods/mindeye2.md §1). Needed to match ME2's released checkpoints.
    mindeye2_half_shift: bool = False

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(n, h, w, 3)`` uint8 -> ``(n, 3, image_size, image_size)`` float32, normalised, on the
        device of ``images`` (a tensor stays where it is: online targets are preprocessed on the GPU)."""
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8:
                raise TypeError(f"Preprocess: expected uint8 (n, h, w, 3) images, got {images.dtype}")
            x = images.permute(0, 3, 1, 2).float() / 255.0
        else:
            x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.interpolation,
                              antialias=self.antialias, align_corners=self.align_corners).clamp(0, 1)
        if self.mindeye2_half_shift:
            x = (x + 1) / 2
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _weights_fingerprint(ref: str | None) -> Any:
    """Identify weights: a local path by (resolved path, size, mtime); anything else by name."""
    if ref is None:
        return None
    p = Path(str(ref)).expanduser()
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        return {"path": str(p.resolve()), "files": [(q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files]}
    return str(ref)


class TargetEncoder(torch.nn.Module):
    """A frozen encoder producing one named target feature for every stimulus of a store
    (images, or their captions). Subclasses give :meth:`identity` (part of the cache key),
    :meth:`n_items` and :meth:`encode_store`."""

    feature_name: str
    output: str

    def identity(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def id_blob(self) -> dict[str, Any]:
        return {"feature": self.feature_name, "output": self.output, **self.identity()}

    @property
    def encoder_id(self) -> str:
        return hashlib.sha256(json.dumps(self.id_blob(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def n_items(self, store: StimulusStore) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode_store(self, store: StimulusStore, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - overridden
        """Targets of stimuli ``start:stop`` of ``store``: ``(stop - start, *output_shape)``."""
        raise NotImplementedError


class ImageEncoder(TargetEncoder):
    """Base class: a frozen image encoder producing one named target feature."""

    def __init__(self, feature_name: str, output: str, preprocess: Preprocess | dict, batch_size: int = 128,
                 device: str = "cpu", outputs: tuple[str, ...] = OUTPUTS):
        super().__init__()
        if output not in outputs:
            raise ConfigError(f"target.output must be one of {outputs}, got {output!r}")
        self.feature_name = feature_name
        self.output = output
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess(**dict(preprocess))
        self.batch_size = batch_size
        self.device_name = device

    def id_blob(self) -> dict[str, Any]:
        # options added later enter the id only when set, so existing cache keys stay valid
        pre = {k: v for k, v in self.preprocess.__dict__.items() if not (k in _LATER_OPTIONS and v is False)}
        return {**super().id_blob(), "preprocess": pre}

    def n_items(self, store) -> int:
        return int(store.images.shape[0])

    def encode_store(self, store, start: int, stop: int) -> torch.Tensor:
        return self.encode(np.asarray(store.images[start:stop]))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``(n, h, w, 3)`` -> float32 ``(n, *output_shape)`` on CPU, in batches."""
        self.eval()
        outs = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device_name)
            outs.append(self.forward_features(pixels).float().cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def encode_on_device(self, images: torch.Tensor) -> torch.Tensor:
        """Online targets: uint8 ``(n, h, w, 3)`` images already on a device -> float32
        ``(n, *output_shape)`` on that device, in batches of ``batch_size``; the encoder moves to that
        device on first use (so a GPU training step encodes on the GPU)."""
        self.eval()
        first = next(iter(self.parameters()), None)
        if first is not None and first.device != images.device:
            self.to(images.device)
        return torch.cat([self.forward_features(self.preprocess(images[start : start + self.batch_size])).float()
                          for start in range(0, len(images), self.batch_size)])

    @property
    def output_shape(self) -> tuple[int, ...]:
        probe = np.zeros((1, self.preprocess.image_size, self.preprocess.image_size, 3), dtype=np.uint8)
        return tuple(self.encode(probe).shape[1:])


class OpenClipImageEncoder(ImageEncoder):
    """open_clip vision tower (MindEye2 uses ``ViT-bigG-14``/``laion2b_s39b_b160k`` tokens)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        feature_name: str = "clip_image",
        output: str = "pooled",
        seed: int = 0,
        model_overrides: dict[str, Any] | None = None,
        preprocess: Preprocess | dict | None = None,
        batch_size: int = 128,
        device: str = "cpu",
        cache_dir: str | None = None,
    ):
        super().__init__(feature_name, output, preprocess or Preprocess(), batch_size, device)
        import open_clip

        self.model_name = model_name
        self.pretrained = pretrained
        self.seed = seed
        self.model_overrides = _plain(model_overrides or {})
        if model_name not in open_clip.list_models():
            raise ConfigError(f"target.model_name: unknown open_clip model {model_name!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(
                model_name, pretrained=pretrained, cache_dir=cache_dir, **self.model_overrides
            )
        if output == "tokens" and not hasattr(model.visual, "output_tokens"):
            raise ConfigError(f"target.output: tokens needs a vision tower with a token sequence (a ViT); "
                             f"{model_name} has {type(model.visual).__name__}, use output: pooled")
        self.visual = model.visual.to(device).eval().requires_grad_(False)
        self.visual.output_tokens = output == "tokens"

    def identity(self) -> dict[str, Any]:
        return {"backend": "open_clip", "model": self.model_name, "weights": _weights_fingerprint(self.pretrained),
                "seed": self.seed if self.pretrained is None else None, "overrides": self.model_overrides}

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixels)
        return out[1] if self.output == "tokens" else out


class HFClipImageEncoder(ImageEncoder):
    """transformers ``CLIPVisionModelWithProjection`` from a hub id or local folder."""

    def __init__(
        self,
        model_id: str,
        *,
        feature_name: str = "clip_image",
        output: str = "pooled",
        revision: str | None = None,
        local_files_only: bool = False,
        preprocess: Preprocess | dict | None = None,
        batch_size: int = 64,
        device: str = "cpu",
    ):
        super().__init__(feature_name, output, preprocess or Preprocess(), batch_size, device,
                         outputs=(*OUTPUTS, "tokens_vd"))
        from transformers import CLIPVisionModelWithProjection

        self.model_id = model_id
        self.revision = revision
        self.model = CLIPVisionModelWithProjection.from_pretrained(
            model_id, revision=revision, local_files_only=local_files_only
        ).to(device).eval().requires_grad_(False)

    def identity(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": _weights_fingerprint(self.model_id), "revision": self.revision}

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if self.output == "tokens_vd":
            # Versatile Diffusion's image context (MindBridge/STTM targets, docs/methods/mindbridge.md §1): every
            # token through post_layernorm + visual_projection, divided by the class token's norm
            tokens = self.model.visual_projection(self.model.vision_model.post_layernorm(out.last_hidden_state))
            return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)
        return out.last_hidden_state if self.output == "tokens" else out.image_embeds


def dinov2_preprocess(image_size: int = 224) -> Preprocess:
    """DINOv2's evaluation preprocessing: ImageNet mean/std, bicubic, ``image_size`` square (224 →
    16×16 patches of 14). transformers' ``BitImageProcessor`` resizes the short side to 256 and
    centre-crops 224; for square stimuli a direct resize to 224 keeps the whole image instead."""
    return Preprocess(image_size=image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                      interpolation="bicubic", antialias=True)


class HFDinov2ImageEncoder(ImageEncoder):
    """transformers ``Dinov2Model`` (``AutoModel``) from a hub id or a local folder.

    Outputs (``hidden`` = 1536 for ``facebook/dinov2-giant``; all after the final layernorm):

    - ``pooled``: the class token = ``pooler_output``, ``(n, hidden)``;
    - ``mean``: mean of the patch tokens, ``(n, hidden)``;
    - ``cls_mean``: ``[pooled, mean]`` concatenated, ``(n, 2*hidden)`` (DINOv2's linear probes);
    - ``tokens``: ``last_hidden_state``, ``(n, 1 + n_patches, hidden)`` (257 at 224 px, patch 14);
    - ``layer_tokens``: the outputs of the transformer blocks ``layers`` (1-based, before the final
      layernorm), register tokens dropped, ``(n, len(layers), 1 + n_patches, hidden)``: Brain-IT's
      universal-encoder input (docs/methods/brainit.md §2: ViT-L/14-reg blocks [1, 6, 12, 18, 24] -> 5 × 257 × 1024).

    Models with register tokens (``dinov2_with_registers``) are accepted too: ``mean`` then
    averages the patch tokens only, and ``tokens`` keeps the registers after the class token.
    """

    MODEL_TYPES = ("dinov2", "dinov2_with_registers")

    def __init__(
        self,
        model_id: str,
        *,
        feature_name: str = "dinov2_image",
        output: str = "pooled",
        revision: str | None = None,
        local_files_only: bool = False,
        preprocess: Preprocess | dict | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        layers: list[int] | None = None,
    ):
        super().__init__(feature_name, output, preprocess or dinov2_preprocess(), batch_size, device,
                         outputs=DINOV2_OUTPUTS)
        from transformers import AutoConfig, AutoModel

        self.layers = [int(v) for v in layers] if layers is not None else None
        if (output == "layer_tokens") != bool(self.layers):
            raise ConfigError("target.layers: give the 1-based block indices (e.g. [1, 6, 12, 18, 24]) with "
                             f"output: layer_tokens, and only then; got output={output!r}, layers={layers}")

        self.model_id = model_id
        self.revision = revision
        try:
            config = AutoConfig.from_pretrained(model_id, revision=revision, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise OSError(f"target.model_id {model_id!r}: cannot load a transformers config "
                          f"(revision={revision!r}, local_files_only={local_files_only}): {e}") from e
        if config.model_type not in self.MODEL_TYPES:
            raise ConfigError(f"target.model_id {model_id!r} is not a DINOv2 model: its config has "
                             f"model_type={config.model_type!r}, expected one of {self.MODEL_TYPES}")
        self.n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        if self.layers and not all(1 <= v <= config.num_hidden_layers for v in self.layers):
            raise ConfigError(f"target.layers: {self.layers} must lie in [1, {config.num_hidden_layers}] (the blocks "
                             f"of {model_id!r})")
        patch = int(config.patch_size)
        if self.preprocess.image_size % patch:
            log.warning("target.preprocess.image_size=%d is not a multiple of the patch size %d: DINOv2 "
                        "drops the border pixels", self.preprocess.image_size, patch)
        self.model = AutoModel.from_pretrained(
            model_id, revision=revision, local_files_only=local_files_only
        ).to(device).eval().requires_grad_(False)

    def identity(self) -> dict[str, Any]:
        blob = {"backend": "transformers-dinov2", "model": _weights_fingerprint(self.model_id),
                "revision": self.revision}
        return {**blob, "layers": self.layers} if self.layers else blob

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=self.output == "layer_tokens")
        if self.output == "layer_tokens":
            # hidden_states[i] is block i's output (0: the embeddings); keep the class token and
            # the patches, drop the registers between them
            stacked = torch.stack([out.hidden_states[i] for i in self.layers], dim=1)
            return torch.cat([stacked[:, :, :1], stacked[:, :, self.n_prefix:]], dim=2)
        tokens = out.last_hidden_state  # already through the final layernorm
        if self.output == "tokens":
            return tokens
        cls = out.pooler_output
        if self.output == "pooled":
            return cls
        mean = tokens[:, self.n_prefix :].mean(dim=1)
        return mean if self.output == "mean" else torch.cat([cls, mean], dim=-1)


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain Python (open_clip/transformers check isinstance dict/list)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
