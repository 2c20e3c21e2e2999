"""Frozen feature extractors for the image metrics (docs/evaluation.md).

An :class:`ExtractorSpec` names an architecture, its weights (see :mod:`.weights`) and the exact
preprocessing the reference evaluation applies to the 256×256 [0, 1] images; a
:class:`FeatureExtractor` returns the flattened activations of one or more graph nodes in a single
pass (AlexNet(2) and AlexNet(5) share one forward). Architectures:

- ``torchvision:<name>``: any torchvision classification model; nodes are torch.fx node names
  (``features.4``, ``avgpool``) as in ``torchvision.models.feature_extraction``;
- ``timm:<name>``: any timm model (nodes likewise);
- ``open_clip:<name>``: an open_clip model; node ``image_embedding`` is ``encode_image`` (the
  projected embedding MindEye2's CLIP column uses), ``pooled``/``tokens`` the vision tower outputs.

Real-scale feature sizes (256×256 input): AlexNet ``features.4`` 192×31×31 = 184,512,
``features.11`` 256×15×15 = 57,600; InceptionV3 ``avgpool`` at 342: 2,048; EfficientNet-B1
``avgpool`` at 255: 1,280; SwAV ResNet-50 ``avgpool`` at 224: 2,048; CLIP ViT-L/14 at 224: 768.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.metrics.images import resize
from braindecode_fw.metrics.weights import (
    is_random,
    load_into,
    random_seed,
    resolve_state_dict,
)

log = logging.getLogger(__name__)

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass
class ExtractorSpec:
    """One metric network: architecture, weights and preprocessing (all from config)."""

    arch: str
    weights: str = "random"
    resize: int = 256
    interpolation: str = "bilinear"
    antialias: bool = False
    normalize: str = "imagenet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    strip_prefix: str | None = None
    allowed_missing: list[str] = field(default_factory=list)
    cuda_dtype: str = "float32"
    batch_size: int = 32
    download: bool = True
    # open_clip only: the activation the weights were trained with. None = from the tag (OpenAI's
    # CLIP weights need QuickGELU); set true for a local file holding OpenAI weights
    quick_gelu: bool | None = None
    name: str = "extractor"

    def __post_init__(self) -> None:
        backend = self.arch.split(":", 1)[0]
        if backend not in ("torchvision", "timm", "open_clip") or ":" not in self.arch:
            raise ConfigError(f"metrics.extractors.{self.name}.arch: expected torchvision:<name>, timm:<name> or "
                             f"open_clip:<name>, got {self.arch!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"metrics.extractors.{self.name}.normalize: one of {sorted(NORMALIZATIONS)}, "
                             f"got {self.normalize!r}")

    @property
    def backend(self) -> str:
        return self.arch.split(":", 1)[0]

    @property
    def model_name(self) -> str:
        return self.arch.split(":", 1)[1]


def _build_torchvision(spec: ExtractorSpec) -> torch.nn.Module:
    from torchvision.models import get_model

    kwargs = dict(spec.arch_kwargs)
    if spec.model_name == "inception_v3":
        # torchvision forces transform_input=True whenever ImageNet weights are requested; we load
        # weights ourselves, so say it explicitly (and skip the slow truncated-normal init)
        kwargs.setdefault("transform_input", True)
        kwargs.setdefault("aux_logits", True)
        kwargs.setdefault("init_weights", is_random(spec.weights))
    return get_model(spec.model_name, weights=None, **kwargs)


def _build_timm(spec: ExtractorSpec) -> torch.nn.Module:
    import timm

    return timm.create_model(spec.model_name, pretrained=False, **spec.arch_kwargs)


def _tag_quick_gelu(model_name: str, tag: str) -> bool | None:
    """Activation an open_clip pretrained tag was trained with: True (QuickGELU), False (GELU),
    None (not a known tag, e.g. a local file). OpenAI's tags are QuickGELU under every open_clip
    (open_clip < 3 rebuilt them from the state dict with QuickGELU; >= 3 builds the named config and
    only warns on a mismatch, hence this check)."""
    import open_clip

    if tag.lower() == "openai":
        return True
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None
    return bool(cfg.get("quick_gelu", model_name.endswith("-quickgelu")))


def openclip_needs_quick_gelu(spec: ExtractorSpec) -> bool:
    """Whether ``force_quick_gelu`` must be passed so the tower matches its weights; refuses a
    mismatch between the architecture (``arch``, ``arch_kwargs``, ``quick_gelu``) and the weights."""
    import open_clip

    cfg = open_clip.get_model_config(spec.model_name) or {}
    arch_quick = bool(cfg.get("quick_gelu", False)) or bool(spec.arch_kwargs.get("force_quick_gelu", False))
    wanted = None if is_random(spec.weights) else _tag_quick_gelu(spec.model_name, spec.weights)
    key = f"metrics.extractors.{spec.name}"
    if spec.quick_gelu is not None:
        if wanted is not None and spec.quick_gelu != wanted:
            raise ConfigError(f"{key}.quick_gelu: weights {spec.weights!r} were trained with "
                             f"{'QuickGELU' if wanted else 'GELU'}; expected quick_gelu={wanted} (or null), "
                             f"got {spec.quick_gelu}")
        wanted = spec.quick_gelu
    if wanted is None:
        return False
    if wanted and not arch_quick:
        if spec.arch_kwargs.get("force_quick_gelu") is False:
            raise ConfigError(f"{key}.arch_kwargs.force_quick_gelu: weights {spec.weights!r} need QuickGELU; "
                             f"expected true or unset, got false")
        return True
    if not wanted and arch_quick:
        raise ConfigError(f"{key}.arch: {spec.arch!r} builds QuickGELU but weights {spec.weights!r} were "
                         f"trained with GELU; expected the model name without -quickgelu and no "
                         f"force_quick_gelu")
    return False


class _OpenClipImage(torch.nn.Module):
    """open_clip model exposing ``image_embedding`` (encode_image), ``pooled`` and, for a ViT tower,
    ``tokens`` (a modified-ResNet tower, e.g. the synthetic world's tiny CLIP, has no token sequence)."""

    def __init__(self, spec: ExtractorSpec):
        super().__init__()
        import open_clip

        if spec.model_name not in open_clip.list_models():
            raise ConfigError(f"metrics.extractors.{spec.name}.arch: unknown open_clip model {spec.model_name!r}")
        pretrained = None if is_random(spec.weights) else spec.weights
        kwargs = dict(spec.arch_kwargs)
        if openclip_needs_quick_gelu(spec):
            kwargs["force_quick_gelu"] = True
        try:
            model = open_clip.create_model(spec.model_name, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            raise MissingFileError(
                f"metrics.extractors.{spec.name}.weights: open_clip could not load {pretrained!r} for "
                f"{spec.model_name} ({e}); give a local .pt/.safetensors file or a cached open_clip tag") from None
        self.visual = model.visual

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not hasattr(self.visual, "output_tokens"):
            pooled = self.visual(x)
            return {"image_embedding": pooled, "pooled": pooled}
        self.visual.output_tokens = True
        pooled, tokens = self.visual(x)
        return {"image_embedding": pooled, "pooled": pooled, "tokens": tokens}


class FeatureExtractor(torch.nn.Module):
    """``(n, 3, h, w)`` [0, 1] images -> ``{node: (n, d) float32}`` on CPU, in batches."""

    def __init__(self, spec: ExtractorSpec, nodes: Sequence[str], device: str = "cpu"):
        super().__init__()
        self.spec = spec
        self.nodes = list(dict.fromkeys(nodes))
        self.device_name = device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed(spec.weights))
            if spec.backend == "open_clip":
                self.body: torch.nn.Module = _OpenClipImage(spec)
                unknown = [n for n in self.nodes if n not in ("image_embedding", "pooled", "tokens")]
                if unknown:
                    raise ConfigError(f"metrics.extractors.{spec.name}: open_clip nodes are image_embedding, pooled, "
                                     f"tokens; got {unknown}")
            else:
                model = _build_torchvision(spec) if spec.backend == "torchvision" else _build_timm(spec)
                if not is_random(spec.weights):
                    state = resolve_state_dict(spec.weights, arch=spec.arch, what=f"{spec.arch} ({spec.name})",
                                               config_key=f"metrics.extractors.{spec.name}.weights",
                                               download=spec.download)
                    load_into(model, state, what=f"{spec.arch} weights {spec.weights}",
                              strip_prefix=spec.strip_prefix, allowed_missing=tuple(spec.allowed_missing))
                self.body = self._feature_graph(model)
        self.body.eval().requires_grad_(False).to(device)
        self.dtype = getattr(torch, spec.cuda_dtype) if device.startswith("cuda") else torch.float32
        self.body.to(self.dtype)
        mean, std = NORMALIZATIONS[spec.normalize]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _feature_graph(self, model: torch.nn.Module) -> torch.nn.Module:
        from torchvision.models.feature_extraction import (
            create_feature_extractor,
            get_graph_node_names,
        )

        model.eval()
        try:
            with warnings.catch_warnings():  # "eval-mode nodes are a subsequence of train-mode nodes"
                warnings.simplefilter("ignore", UserWarning)
                return create_feature_extractor(model, return_nodes=self.nodes)
        except (ValueError, KeyError, AssertionError) as e:
            _, names = get_graph_node_names(model)
            raise ConfigError(f"metrics.extractors.{self.spec.name}: node(s) {self.nodes} not in {self.spec.arch} "
                             f"({e}); nodes include {[n for n in names if '.' not in n][:30]}") from None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize(images.float(), self.spec.resize, mode=self.spec.interpolation, antialias=self.spec.antialias)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in self.nodes}
        for start in range(0, len(images), self.spec.batch_size):
            x = self.preprocess(images[start : start + self.spec.batch_size].to(self.device_name))
            feats = self.body(x.to(self.dtype))
            for n in self.nodes:
                outs[n].append(feats[n].float().flatten(1).cpu())
        return {n: torch.cat(v) for n, v in outs.items()}
