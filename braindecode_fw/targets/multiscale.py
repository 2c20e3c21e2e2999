"""Brain-IT's multi-scale VGG16-BN feature tokens: the low-level branch's target (docs/methods/brainit.md §3,
"Low-level (VGG)" branch) and their inverse, the folding back into feature maps that the Deep Image
Prior inversion starts from (docs/methods/brainit.md §6 step 1).

The image (``image_size`` = 112 in Brain-IT) goes through torchvision ``vgg16_bn().features`` with
ImageNet normalisation; the activations after the ReLUs at indices 5, 12, 22, 32, 42 are five maps
(at 112 px: 64@112, 128@56, 256@28, 512@14, 512@7), and each becomes tokens of width 512:

====  ==========  =====================================================  ===============
scale map         tokenisation                                           tokens at 112
====  ==========  =====================================================  ===============
(a)   64@s        unfold 2×2, stride 2 -> 256 wide, duplicated to 512    56² = 3136
(b)   128@s/2     unfold 2×2, stride 1 -> 512 wide                       55² = 3025
(c)   256@s/4     one token per position, 256 wide, duplicated to 512    28² = 784
(d)   512@s/8     one token per position                                 14² = 196
(e)   512@s/16    one token per position                                 7² = 49
====  ==========  =====================================================  ===============

Concatenated in this order: ``(n, 7190, 512)`` at 112 px (the "2029" of Brain-IT's code comment is
wrong). Any even ``image_size`` ≥ 16 works (token counts follow the map sizes, e.g. 2321 at the
synthetic world's 64 px); an odd size is refused because the stride-2 unfolding of scale (a) would
drop the last row and column, so the tokens could not be folded back exactly.

Unfolded channel order is ``F.unfold``'s: channel-major, then the 2×2 kernel position row-major.
The duplicated scales put the same 256 values in both halves ``[x, x]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.weights import is_random, load_into, random_seed, resolve_state_dict
from braindecode_fw.targets.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    Preprocess,
    _weights_fingerprint,
)

#: indices into ``vgg16_bn().features`` of the ReLUs whose outputs are the five maps
VGG_LAYERS = (5, 12, 22, 32, 42)
#: channels of those maps
VGG_CHANNELS = (64, 128, 256, 512, 512)
TOKEN_WIDTH = 512
#: torchvision's VGG "D" configuration (VGG16): conv widths, "M" = 2×2 max pool
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                     512, 512, 512, "M")
_TV_WEIGHTS_ENUM = "VGG16_BN_Weights"


@dataclass(frozen=True)
class MultiScaleLayout:
    """Where each scale's tokens sit in the concatenated token axis, for one ``image_size``.

    ``map_sizes[i]`` is the side of map ``i`` (``s, s/2, s/4, s/8, s/16`` with floor division, as
    VGG's max pools give), ``token_counts[i]`` its number of tokens, ``slices[i]`` their range.
    """

    image_size: int
    map_sizes: tuple[int, ...]
    token_counts: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for c in self.token_counts:
            out.append(acc)
            acc += c
        return tuple(out)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + c) for o, c in zip(self.offsets, self.token_counts, strict=True))

    def scale_of_token(self) -> torch.Tensor:
        """``(n_tokens,)`` long: the scale (0–4) of every token of the concatenated axis."""
        return torch.repeat_interleave(torch.arange(len(self.token_counts)), torch.tensor(self.token_counts))


def multiscale_layout(image_size: int) -> MultiScaleLayout:
    """The token layout of a ``image_size``×``image_size`` input (see the module docstring)."""
    image_size = int(image_size)
    if image_size < 16 or image_size % 2:
        raise ConfigError(f"target.image_size: the VGG multi-scale tokens need an even size >= 16 (four 2×2 "
                         f"max pools, and scale (a) unfolds with stride 2), got {image_size}")
    sizes = (image_size, image_size // 2, image_size // 4, image_size // 8, image_size // 16)
    counts = ((sizes[0] // 2) ** 2, (sizes[1] - 1) ** 2, sizes[2] ** 2, sizes[3] ** 2, sizes[4] ** 2)
    return MultiScaleLayout(image_size, sizes, counts)


def scale_sizes(image_size: int) -> list[int]:
    """Tokens per scale, e.g. ``[3136, 3025, 784, 196, 49]`` (7190 in all) at 112 px."""
    return list(multiscale_layout(image_size).token_counts)


def _check_maps(maps: list[torch.Tensor] | tuple[torch.Tensor, ...], what: str) -> MultiScaleLayout:
    if len(maps) != len(VGG_CHANNELS):
        raise ConfigError(f"{what}: expected {len(VGG_CHANNELS)} VGG16-BN feature maps (after the ReLUs at "
                         f"features.{list(VGG_LAYERS)}), got {len(maps)}")
    layout = multiscale_layout(maps[0].shape[-1])
    n = maps[0].shape[0]
    for i, (m, c, s) in enumerate(zip(maps, VGG_CHANNELS, layout.map_sizes, strict=True)):
        if m.ndim != 4 or tuple(m.shape[1:]) != (c, s, s) or m.shape[0] != n:
            raise ConfigError(f"{what}: map {i} has shape {tuple(m.shape)}, expected ({n}, {c}, {s}, {s}) "
                             f"(channels {list(VGG_CHANNELS)}, sizes {list(layout.map_sizes)} for a "
                             f"{layout.image_size} px input)")
    return layout


def tokenise_maps(maps: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Five VGG16-BN maps ``(n, C_i, h_i, h_i)`` -> tokens ``(n, T, 512)`` (docs/methods/brainit.md §3).

    ``T = sum(scale_sizes(h_0))``: 7190 at 112 px. The image size is read off the first map.
    """
    _check_maps(maps, "tokenise_maps")
    a, b, c, d, e = maps
    ta = F.unfold(a, kernel_size=2, stride=2).transpose(1, 2)  # (n, (h/2)², 256)
    tb = F.unfold(b, kernel_size=2, stride=1).transpose(1, 2)  # (n, (h-1)², 512)
    tc = c.flatten(2).transpose(1, 2)  # (n, h², 256)
    td, te = d.flatten(2).transpose(1, 2), e.flatten(2).transpose(1, 2)
    return torch.cat([torch.cat([ta, ta], -1), tb, torch.cat([tc, tc], -1), td, te], dim=1)


def fold_tokens(tokens: torch.Tensor, image_size: int) -> list[torch.Tensor]:
    """Tokens ``(n, T, 512)`` -> the five maps ``(n, C_i, h_i, h_i)`` (docs/methods/brainit.md §6 step 1).

    Exact inverse of :func:`tokenise_maps` on its image; for predicted tokens: scale (a) averages the
    two 256-wide halves and folds 2×2/stride 2, scale (b) folds 2×2/stride 1 and divides by the number
    of tokens covering each position (the overlaps are averaged), scale (c) averages the halves, and
    (d), (e) are reshaped.
    """
    layout = multiscale_layout(image_size)
    if tokens.ndim != 3 or tokens.shape[1:] != (layout.n_tokens, TOKEN_WIDTH):
        raise ConfigError(f"fold_tokens: tokens of shape {tuple(tokens.shape)}, expected (n, {layout.n_tokens}, "
                         f"{TOKEN_WIDTH}) for image_size {image_size} (scales {list(layout.token_counts)})")
    ta, tb, tc, td, te = (tokens[:, s] for s in layout.slices)
    s0, s1, s2, s3, s4 = layout.map_sizes
    half = TOKEN_WIDTH // 2
    a = F.fold(((ta[..., :half] + ta[..., half:]) / 2).transpose(1, 2), output_size=(s0, s0), kernel_size=2, stride=2)
    tb = tb.transpose(1, 2)
    # fold sums the up-to-4 tokens covering each position; the fold of ones counts them
    count = F.fold(torch.ones_like(tb[:1]), output_size=(s1, s1), kernel_size=2, stride=1)
    b = F.fold(tb, output_size=(s1, s1), kernel_size=2, stride=1) / count
    n = tokens.shape[0]
    c = ((tc[..., :half] + tc[..., half:]) / 2).transpose(1, 2).reshape(n, VGG_CHANNELS[2], s2, s2)
    d = td.transpose(1, 2).reshape(n, VGG_CHANNELS[3], s3, s3)
    e = te.transpose(1, 2).reshape(n, VGG_CHANNELS[4], s4, s4)
    return [a, b, c, d, e]


def _vgg16_bn_features() -> nn.Sequential:
    """torchvision ``vgg16_bn().features`` up to the last ReLU (index 42), without the classifier's
    120M parameters; module indices match torchvision's, so its state dict keys load."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG[:-1]:  # the last max pool (index 43) feeds only the classifier
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            in_ch = int(v)
    return nn.Sequential(*layers)


def _weights_ref(weights: str, config_key: str) -> str:
    """A torchvision weights-enum tag (``VGG16_BN_Weights.IMAGENET1K_V1``) -> the resolver's
    ``torchvision:IMAGENET1K_V1``; anything else (``random[:seed]``, a path, a URL) unchanged."""
    ref = str(weights)
    head, dot, name = ref.partition(".")
    if dot and head.endswith("_Weights") and "/" not in ref:
        if head != _TV_WEIGHTS_ENUM:
            raise ConfigError(f"{config_key}: {ref!r} is a weights tag of another architecture; expected "
                             f"{_TV_WEIGHTS_ENUM}.<NAME> (e.g. {_TV_WEIGHTS_ENUM}.IMAGENET1K_V1), random[:seed] "
                             f"or a local state dict")
        return f"torchvision:{name}"
    return ref


class VggTaps(nn.Module):
    """``vgg16_bn().features`` returning the maps after the ReLUs at :data:`VGG_LAYERS`.

    ``(n, 3, s, s)`` normalised pixels -> five maps ``(n, C_i, s/2^i, s/2^i)``. Frozen (eval mode,
    no parameter gradients); gradients still flow to the input, which the inversion needs.
    """

    def __init__(self, weights: str = "random", *, config_key: str = "target.weights", download: bool = True):
        super().__init__()
        ref = _weights_ref(weights, config_key)
        # seeded construction, so "random:<seed>" is reproducible without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed(ref))
            features = _vgg16_bn_features()
            for m in features.modules():  # torchvision's VGG initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        if not is_random(ref):
            state = resolve_state_dict(ref, arch="torchvision:vgg16_bn", what=f"VGG16-BN weights {weights!r}",
                                       config_key=config_key, download=download)
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            load_into(features, state, what=f"VGG16-BN weights {weights!r}")
        self.features = features.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> VggTaps:  # always frozen: BatchNorm keeps its running statistics
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                maps.append(x)
        return maps


class VggImageFeatures(nn.Module):
    """``(n, 3, s, s)`` images in [0, 1] -> the five VGG16-BN maps, ImageNet-normalised first (the
    ``feature_fn`` of :func:`braindecode_fw.generation.feature_inversion.invert_features`)."""

    def __init__(self, taps: VggTaps):
        super().__init__()
        self.taps = taps
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.taps((images - self.mean) / self.std)


class VggMultiScaleTokenEncoder(ImageEncoder):
    """uint8 images -> Brain-IT's multi-scale VGG16-BN tokens ``(n, T, 512)`` (docs/methods/brainit.md §3).

    Preprocessing: bicubic antialiased resize to ``image_size`` (112), ImageNet normalisation.
    ``weights``: the torchvision tag ``VGG16_BN_Weights.IMAGENET1K_V1`` (read from the torch hub
    cache, ``$TORCH_HOME/hub/checkpoints/vgg16_bn-6c64b313.pth``; downloaded only when allowed, see
    :mod:`braindecode_fw.metrics.weights`), ``torchvision:<NAME>``, a local state dict of
    ``vgg16_bn`` (``features.*`` keys are used), or ``random[:seed]``.

    Storage: 7190 × 512 values per image at 112 px, i.e. 7.4 MB per image as a float16 cache (14.7
    MB float32): about 540 GB for NSD's 73k images. At NSD scale compute the tokens on the GPU in the
    training step (:meth:`image_features` + :func:`tokenise_maps`, or :meth:`forward_features` on
    normalised pixels) instead of caching them; caching suits the synthetic world (64 px: 2321 tokens).
    """

    def __init__(self, *, weights: str = "VGG16_BN_Weights.IMAGENET1K_V1", feature_name: str = "vgg_tokens",
                 image_size: int = 112, batch_size: int = 32, device: str = "cpu", download: bool = True):
        layout = multiscale_layout(image_size)
        pre = Preprocess(image_size=image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                         interpolation="bicubic", antialias=True)
        super().__init__(feature_name, "tokens", pre, batch_size, device, outputs=("tokens",))
        self.layout = layout
        self.weights_ref = weights
        self.body = VggTaps(weights, config_key="target.weights", download=download).to(device)

    def identity(self) -> dict[str, Any]:
        return {"backend": "vgg16_bn-multiscale", "layers": list(VGG_LAYERS), "layout": "brain-it",
                "weights": _weights_fingerprint(self.weights_ref)}

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(n, 3, image_size, image_size)`` float images in [0, 1] -> the five maps (differentiable
        in the images)."""
        return VggImageFeatures(self.body).to(images.device)(images)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return tokenise_maps(self.body(pixels))
