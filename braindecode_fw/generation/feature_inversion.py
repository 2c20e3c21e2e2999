"""Deep-Image-Prior inversion of (predicted) multi-scale VGG16-BN features into an image: Brain-IT's
low-level image (docs/methods/brainit.md §6 step 1).

A randomly initialised "skip" encoder-decoder (Ulyanov et al.'s Deep Image Prior, written here in
plain torch) maps a fixed noise image to an RGB image; its weights are optimised with Adam so that
the VGG16-BN features of its output (bicubically resized with antialias to ``feature_size``) match
the target maps, folded back from the predicted tokens with
:func:`braindecode_fw.targets.multiscale.fold_tokens`. The returned image is the exponential moving
average of the outputs over the iterations.

Brain-IT's settings (the defaults): input depth 32, 3 scales of 128 channels (4 skip channels, the
DIP default), reflection padding, bilinear upsampling, BatchNorm + LeakyReLU(0.2), sigmoid output;
noise input ``U[0, 1) × 0.1`` of size 224 (DIP's ``get_noise(..., var=1/10)``: the "variance" is a
scale of uniform noise), plus fresh Gaussian noise of std 1/30 each iteration; 1800 Adam iterations
at lr 1e-3; loss = mean over the 5 layers of the MSE; EMA weight 0.99.

One DIP net per image, as in the paper, computed batched: the ``n`` nets are one grouped network
(every convolution has ``groups=n``, BatchNorm statistics are per channel of each image, one Adam
over all parameters; the summed per-image losses give every net the gradient of its own loss), which
is exactly ``n`` independent nets. Image ``i`` uses seed ``seeds[i]`` for its net's initialisation
and its noise, so its result does not depend on the other images of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.generation.reconstructor import format_shape
from braindecode_fw.targets.multiscale import (
    TOKEN_WIDTH,
    VGG_CHANNELS,
    VggImageFeatures,
    VggTaps,
    fold_tokens,
    multiscale_layout,
)

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


# --- the grouped "skip" network ----------------------------------------------------------------------


class _GConv(nn.Module):
    """``n`` independent convolutions (reflection-padded, DIP's ``conv(..., pad='reflection')``) as
    one grouped conv on ``(1, n·C_in, h, w)``."""

    def __init__(self, n: int, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.pad = nn.ReflectionPad2d((kernel - 1) // 2) if kernel > 1 else nn.Identity()
        self.conv = nn.Conv2d(n * c_in, n * c_out, kernel, stride=stride, groups=n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def _block(n: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [_GConv(n, c_in, c_out, kernel, stride), nn.BatchNorm2d(n * c_out), nn.LeakyReLU(0.2, inplace=True)]


class _GConcat(nn.Module):
    """DIP's ``Concat`` of the skip and deeper branches along channels, per image: the grouped layout
    ``(1, n·C, h, w)`` is interleaved so image ``g`` gets ``[skip_g, deeper_g]``; a branch that came back
    larger (odd sizes) is centre-cropped to the smaller one."""

    def __init__(self, n: int, *branches: nn.Module):
        super().__init__()
        self.n = n
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        h, w = min(o.shape[-2] for o in outs), min(o.shape[-1] for o in outs)
        crops = []
        for o in outs:
            dh, dw = (o.shape[-2] - h) // 2, (o.shape[-1] - w) // 2
            o = o[..., dh : dh + h, dw : dw + w]
            crops.append(o.reshape(1, self.n, -1, h, w))
        return torch.cat(crops, dim=2).reshape(1, -1, h, w)


class SkipDIP(nn.Module):
    """Deep Image Prior's "skip" network, ``n_nets`` independent copies computed as one grouped net.

    ``(n_nets, input_depth, H, W)`` -> ``(n_nets, out_channels, H, W)`` in (0, 1). Per scale ``i``
    (``len(channels_down)`` of them): a skip branch (1×1 conv to ``channels_skip[i]``) and a deeper
    branch (3×3 stride-2 conv, 3×3 conv, the next scale, bilinear ×2 upsampling), concatenated, then
    BatchNorm, a 3×3 conv to ``channels_up[i]`` and a 1×1 conv; every conv is followed by BatchNorm and
    LeakyReLU(0.2); a final 1×1 conv and a sigmoid. ``H``, ``W`` should be multiples of
    ``2^len(channels_down)``. Net ``g`` is initialised from ``seeds[g]`` with PyTorch's default
    conv initialisation (uniform ±1/√fan_in for weights and biases).
    """

    def __init__(self, n_nets: int = 1, *, input_depth: int = 32, out_channels: int = 3,
                 channels_down: Sequence[int] = (128, 128, 128), channels_up: Sequence[int] = (128, 128, 128),
                 channels_skip: Sequence[int] = (4, 4, 4), seeds: Sequence[int] | None = None):
        super().__init__()
        if not len(channels_down) == len(channels_up) == len(channels_skip):
            raise ConfigError(f"lowlevel: channels_down/up/skip need one entry per scale, got {list(channels_down)}, "
                             f"{list(channels_up)}, {list(channels_skip)}")
        self.n, self.input_depth, self.out_channels = n_nets, input_depth, out_channels
        n, last = n_nets, len(channels_down) - 1

        def level(i: int, c_in: int) -> list[nn.Module]:
            deeper = _block(n, c_in, channels_down[i], 3, stride=2) + _block(n, channels_down[i], channels_down[i], 3)
            if i < last:
                deeper += level(i + 1, channels_down[i])
            c_deep = channels_up[i + 1] if i < last else channels_down[i]
            deeper.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            c_skip = channels_skip[i]
            if c_skip > 0:
                layers: list[nn.Module] = [_GConcat(n, nn.Sequential(*_block(n, c_in, c_skip, 1)), nn.Sequential(*deeper))]
            else:
                layers = [nn.Sequential(*deeper)]
            layers.append(nn.BatchNorm2d(n * (c_skip + c_deep)))
            return layers + _block(n, c_skip + c_deep, channels_up[i], 3) + _block(n, channels_up[i], channels_up[i], 1)

        self.body = nn.Sequential(*level(0, input_depth), _GConv(n, channels_up[0], out_channels, 1))
        self.reset_parameters([0] * n if seeds is None else list(seeds))

    @torch.no_grad()
    def reset_parameters(self, seeds: Sequence[int]) -> None:
        if len(seeds) != self.n:
            raise ConfigError(f"SkipDIP: {self.n} nets need {self.n} seeds, got {len(seeds)}")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()  # per group: (C_in/n)·k·k
                bound = fan_in ** -0.5
                out = m.out_channels // self.n
                for g, gen in enumerate(gens):  # each net's slice from its own stream
                    sl = slice(g * out, (g + 1) * out)
                    w = (torch.rand(m.weight[sl].shape, generator=gen) * 2 - 1) * bound
                    b = (torch.rand(out, generator=gen) * 2 - 1) * bound
                    m.weight[sl] = w.to(m.weight)
                    m.bias[sl] = b.to(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[:2] != (self.n, self.input_depth):
            raise ConfigError(f"SkipDIP: input of shape {tuple(x.shape)}, expected ({self.n}, {self.input_depth}, H, W)")
        h, w = x.shape[-2:]
        y = self.body(x.reshape(1, -1, h, w))
        return torch.sigmoid(y).reshape(self.n, self.out_channels, *y.shape[-2:])


# --- the inversion -------------------------------------------------------------------------------------


def _check_targets(target_maps: Sequence[torch.Tensor], feature_size: int,
                   channels: Sequence[int] | None) -> None:
    if channels is None:
        return
    if len(target_maps) != len(channels):
        raise ConfigError(f"invert_features: target_maps must be the {len(channels)} VGG16-BN maps (channels "
                         f"{list(channels)}), got {len(target_maps)}")
    n = target_maps[0].shape[0]
    sizes = multiscale_layout(feature_size).map_sizes if tuple(channels) == VGG_CHANNELS else None
    for i, (m, c) in enumerate(zip(target_maps, channels, strict=True)):
        want = (n, c, sizes[i], sizes[i]) if sizes else (n, c, *m.shape[2:])
        if m.ndim != 4 or tuple(m.shape) != want:
            raise ConfigError(f"invert_features: target map {i} has shape {tuple(m.shape)}, expected {want} "
                             f"(channels {list(channels)} at feature_size {feature_size})")


@torch.enable_grad()  # an optimisation: also when called under no_grad (e.g. inside lit.predict's loop)
def invert_features(
    target_maps: Sequence[torch.Tensor],
    feature_fn: FeatureFn,
    *,
    iterations: int = 1800,
    lr: float = 1e-3,
    output_size: int = 224,
    feature_size: int = 112,
    input_depth: int = 32,
    input_noise_var: float = 0.1,
    reg_noise_std: float = 1 / 30,
    ema: float = 0.99,
    seed: int | Sequence[int] = 0,
    channels: int = 128,
    scales: int = 3,
    skip_channels: int = 4,
    expected_channels: Sequence[int] | None = VGG_CHANNELS,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images whose features match ``target_maps`` (docs/methods/brainit.md §6 step 1).

    ``target_maps``: the feature maps ``(n, C_i, h_i, w_i)`` of ``n`` images (for VGG16-BN at
    ``feature_size`` = 112: 64@112, 128@56, 256@28, 512@14, 512@7; checked against
    ``expected_channels``, ``None`` skips the check for another ``feature_fn``). ``feature_fn``: maps
    ``(n, 3, feature_size, feature_size)`` images in [0, 1] to the list of maps, differentiably
    (e.g. :func:`vgg_feature_fn`). ``seed``: image ``i`` uses ``seed + i`` (or ``seed[i]``).
    ``callback(iteration, output (n, 3, S, S), loss (n,))`` sees every iteration's output and
    per-image loss before the optimiser step. Returns ``(n, 3, output_size, output_size)`` in
    [0, 1] on the maps' device: the EMA (weight ``ema``) of the outputs; with ``iterations=0``, the
    untrained net's output on the noise input.
    """
    _check_targets(target_maps, feature_size, expected_channels)
    n = target_maps[0].shape[0]
    device = target_maps[0].device
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ConfigError(f"invert_features: {n} images need {n} seeds, got {len(seeds)}")
    if output_size % 2**scales:
        raise ConfigError(f"lowlevel.output_size: a multiple of 2^scales = {2**scales}, got {output_size}")
    net = SkipDIP(n, input_depth=input_depth, channels_down=[channels] * scales, channels_up=[channels] * scales,
                  channels_skip=[skip_channels] * scales, seeds=seeds).to(device).train()
    # DIP's get_noise(input_depth, "noise", size, var=0.1): uniform noise scaled by 0.1
    base = torch.stack([torch.rand(input_depth, output_size, output_size, generator=torch.Generator().manual_seed(s))
                        for s in seeds]).mul_(input_noise_var).to(device)
    if iterations <= 0:
        with torch.no_grad():
            return net(base)
    reg_gens = [torch.Generator(device=device).manual_seed(s + 1) for s in seeds]
    targets = [t.detach().float() for t in target_maps]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    avg: torch.Tensor | None = None
    for it in range(iterations):
        x = base
        if reg_noise_std > 0:
            x = base + torch.stack([torch.randn(base.shape[1:], generator=g, device=device) for g in reg_gens]) * reg_noise_std
        out = net(x)
        small = F.interpolate(out, size=(feature_size, feature_size), mode="bicubic", antialias=True,
                              align_corners=False)
        feats = list(feature_fn(small))
        if it == 0 and [tuple(f.shape) for f in feats] != [tuple(t.shape) for t in targets]:
            raise ConfigError(f"invert_features: feature_fn gives maps {[tuple(f.shape) for f in feats]}, the targets "
                             f"are {[tuple(t.shape) for t in targets]}")
        # per image: mean over layers of that image's MSE; summed, so each net gets its own gradient
        loss = torch.stack([(f.float() - t).pow(2).flatten(1).mean(1) for f, t in zip(feats, targets, strict=True)])
        loss = loss.mean(0)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        out = out.detach()
        avg = out.clone() if avg is None else avg.mul_(ema).add_(out, alpha=1 - ema)
        if callback is not None:
            callback(it, out, loss.detach())
        opt.step()
    assert avg is not None
    return avg


def vgg_feature_fn(weights: str = "VGG16_BN_Weights.IMAGENET1K_V1", *, device: str | torch.device = "cpu",
                   download: bool = True, config_key: str = "lowlevel.vgg_weights") -> VggImageFeatures:
    """The VGG16-BN ``feature_fn``: ``(n, 3, s, s)`` in [0, 1] -> the five maps, ImageNet-normalised
    (the same body as :class:`~braindecode_fw.targets.multiscale.VggMultiScaleTokenEncoder`)."""
    return VggImageFeatures(VggTaps(weights, config_key=config_key, download=download)).to(device)


@dataclass
class FeatureInverter:
    """Low-level images from predicted multi-scale VGG tokens (docs/methods/brainit.md §6 step 1), configured
    from a dict or the Hydra node ``braindecode_fw/conf/lowlevel/dip.yaml`` (keys documented there).

    ``inverter(tokens)`` with tokens ``(n, T, 512)`` (``T = 7190`` at ``feature_size`` 112), or
    :meth:`invert_maps` with the five maps, -> ``(n, 3, output_size, output_size)`` in [0, 1] on
    CPU. Images are inverted ``batch_size`` at a time; image ``k`` of the call uses seed
    ``seed + start + k`` (pass ``start`` when calling per chunk, for results independent of chunking),
    or ``seeds[k]`` when given.

    In reconstruction (``bdf-reconstruct lowlevel=dip``, docs/methods/brainit.md §6 step 1 -> step 2) it inverts
    the decoder output ``source`` and hands the images to the generator as the input ``output``
    (:meth:`check_source`, :meth:`invert_outputs`).
    """

    iterations: int = 1800
    lr: float = 1e-3
    output_size: int = 224
    feature_size: int = 112
    input_depth: int = 32
    input_noise_var: float = 0.1
    reg_noise_std: float = 1 / 30
    ema: float = 0.99
    channels: int = 128
    scales: int = 3
    skip_channels: int = 4
    seed: int = 0
    vgg_weights: str = "VGG16_BN_Weights.IMAGENET1K_V1"
    download: bool = True
    batch_size: int = 8
    device: str = "cpu"
    source: str = "vgg_tokens"
    output: str = "lowlevel_image"

    def __post_init__(self) -> None:
        multiscale_layout(self.feature_size)  # even and >= 16
        for key in ("iterations", "output_size", "input_depth", "channels", "scales", "batch_size"):
            if int(getattr(self, key)) < (0 if key == "iterations" else 1):
                raise ConfigError(f"lowlevel.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"lowlevel.ema: expected a weight in [0, 1), got {self.ema}")
        if self.output_size % 2**self.scales:
            raise ConfigError(f"lowlevel.output_size: a multiple of 2^scales = {2**self.scales}, got {self.output_size}")
        self._feature_fn: VggImageFeatures | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | Any) -> FeatureInverter:
        """From a dict or DictConfig; ``_target_`` is ignored, unknown keys are an error."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        cfg = {k: v for k, v in dict(cfg).items() if k != "_target_"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"lowlevel: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**cfg)

    def config(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def feature_fn(self) -> VggImageFeatures:
        if self._feature_fn is None:  # built on first use: the reconstruction stage may never need it
            self._feature_fn = vgg_feature_fn(self.vgg_weights, device=self.device, download=self.download)
        return self._feature_fn

    def invert_maps(self, maps: Sequence[torch.Tensor], *, start: int = 0,
                    seeds: Sequence[int] | None = None) -> torch.Tensor:
        _check_targets(maps, self.feature_size, VGG_CHANNELS)
        n = maps[0].shape[0]
        seeds = [self.seed + start + k for k in range(n)] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ConfigError(f"FeatureInverter: {n} images need {n} seeds, got {len(seeds)}")
        outs = []
        for lo in range(0, n, self.batch_size):
            chunk = [m[lo : lo + self.batch_size].to(self.device) for m in maps]
            outs.append(invert_features(
                chunk, self.feature_fn, iterations=self.iterations, lr=self.lr, output_size=self.output_size,
                feature_size=self.feature_size, input_depth=self.input_depth, input_noise_var=self.input_noise_var,
                reg_noise_std=self.reg_noise_std, ema=self.ema, seed=seeds[lo : lo + self.batch_size],
                channels=self.channels, scales=self.scales, skip_channels=self.skip_channels).cpu())
        return torch.cat(outs)

    def __call__(self, tokens: torch.Tensor, *, start: int = 0, seeds: Sequence[int] | None = None) -> torch.Tensor:
        return self.invert_maps(fold_tokens(tokens.float(), self.feature_size), start=start, seeds=seeds)

    # --- as a reconstruction stage (docs/methods/brainit.md §6 step 1 -> step 2) ---------------------------------

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one image of :attr:`output`: ``(3, output_size, output_size)``."""
        return (3, self.output_size, self.output_size)

    def check_source(self, provides: Mapping[str, Sequence[int]]) -> None:
        """Raise a ValueError naming the config key unless the decoder outputs (``provides``: name ->
        shape per item, e.g. a checkpoint's ``target_shapes``) hold :attr:`source` as multi-scale VGG
        tokens ``(T, 512)`` of a ``feature_size`` image (``T`` = 7190 at 112, 2321 at 64, 565 at 32)."""
        shapes = {k: tuple(int(d) for d in v) for k, v in provides.items()}
        if self.source not in shapes:
            have = ", ".join(f"{k} {format_shape(v)}" for k, v in sorted(shapes.items())) or "nothing"
            raise ConfigError(f"lowlevel.source: the decoder has no output {self.source!r} to invert (it provides "
                             f"{have}); train it with the multi-scale VGG target (braindecode_fw/conf/target/vgg_multiscale.yaml) "
                             f"or set lowlevel.source to the output holding those tokens")
        got = shapes[self.source]
        layout = multiscale_layout(self.feature_size)
        if got == (layout.n_tokens, TOKEN_WIDTH):
            return
        size = _image_size_of(got[0]) if len(got) == 2 and got[1] == TOKEN_WIDTH else None
        hint = (f": the tokens of a {size} px image, so set lowlevel.feature_size={size} (the target's image_size)"
                if size else f"; expected ({layout.n_tokens}, {TOKEN_WIDTH})")
        raise ConfigError(f"lowlevel.feature_size: {self.feature_size} px gives {layout.n_tokens} VGG tokens × "
                         f"{TOKEN_WIDTH} per image, but the decoder's {self.source!r} is "
                         f"{format_shape(got)}{hint}")

    def invert_outputs(self, outputs: Mapping[str, torch.Tensor], image_index: Sequence[int] | torch.Tensor
                       ) -> torch.Tensor:
        """Decoder outputs of a batch (``outputs[source]``: ``(n, T, 512)``) -> the low-level images
        ``(n, 3, output_size, output_size)`` in [0, 1] on CPU. The item showing image ``image_index[k]``
        uses seed ``seed + image_index[k]``: fixed per image, so a result does not depend on batching,
        on the other items inverted with it, or on resuming."""
        if self.source not in outputs:
            raise UnknownNameError(f"lowlevel.source: the decoder outputs {sorted(outputs)}, not {self.source!r}")
        return self(outputs[self.source], seeds=[self.seed + int(i) for i in image_index])


def _image_size_of(n_tokens: int) -> int | None:
    """The even image size whose multi-scale layout has ``n_tokens`` tokens, or None (the count grows
    with the size, so there is at most one)."""
    size = 16
    while multiscale_layout(size).n_tokens < n_tokens:
        size += 2
    return size if multiscale_layout(size).n_tokens == n_tokens else None
