"""Spatial feature-map tokens of a frozen CNN as a target: MindEye2's ConvNeXt teacher for the
low-level branch's auxiliary tokens (docs/methods/mindeye2.md §2, §4).

The image is resized to ``image_size`` (224), normalised (ImageNet statistics), and the activation
of one graph ``node`` — a ``(C, h, w)`` feature map — becomes ``h·w`` tokens of width ``C``
(``(n, h·w, C)``, 7×7 = 49 tokens at stride 32). The decoder's auxiliary token head is built with
width ``C``, so any teacher fits: MindEye2 distilled a ConvNeXt-XL checkpoint of its own into
49 × 512 tokens; ``torchvision:convnext_base`` ``features.7`` gives 49 × 1024. Architectures and
weights are resolved like the metric networks' (:mod:`braindecode_fw.metrics.features`): a
torchvision/timm name, and a local file, a torchvision weights tag or ``random[:seed]``.

Not reproduced: MindEye2's teacher also encodes a kornia-augmented copy of every image at every
step; a cached target sees the clean image only, so the soft distillation
(:func:`~braindecode_fw.losses.soft_token_contrast`) uses the clean teacher tokens on both sides.
"""

from __future__ import annotations

from typing import Any

import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.features import NORMALIZATIONS, ExtractorSpec, FeatureExtractor
from braindecode_fw.targets.encoders import ImageEncoder, Preprocess, _weights_fingerprint


class FeatureMapTokenEncoder(ImageEncoder):
    """uint8 images -> ``(n, h·w, C)`` tokens of a CNN feature map."""

    def __init__(self, arch: str, node: str, *, weights: str = "random", feature_name: str = "convnext_tokens",
                 image_size: int = 224, normalize: str = "imagenet", arch_kwargs: dict[str, Any] | None = None,
                 batch_size: int = 64, device: str = "cpu"):
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"target.normalize: one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
        mean, std = NORMALIZATIONS[normalize]
        pre = Preprocess(image_size=image_size, mean=list(mean), std=list(std), interpolation="bicubic")
        super().__init__(feature_name, "tokens", pre, batch_size, device, outputs=("tokens",))
        self.arch, self.node, self.weights_ref, self.arch_kwargs = arch, node, weights, dict(arch_kwargs or {})
        spec = ExtractorSpec(arch=arch, weights=weights, resize=image_size, normalize="none",
                             arch_kwargs=self.arch_kwargs, name=f"target ({feature_name})")
        # the extractor's graph gives the node's activation with its spatial shape; the
        # preprocessing above replaces the extractor's own (targets share one Preprocess)
        self.body = FeatureExtractor(spec, [node], device=device).body

    def identity(self) -> dict[str, Any]:
        return {"backend": "feature-map", "arch": self.arch, "node": self.node,
                "weights": _weights_fingerprint(self.weights_ref), "arch_kwargs": self.arch_kwargs}

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.body(pixels)[self.node]
        if fmap.ndim != 4:
            raise ConfigError(f"target.node: {self.node!r} of {self.arch} gives shape {tuple(fmap.shape)}, "
                             f"expected a (C, h, w) feature map")
        return fmap.flatten(2).transpose(1, 2)
