"""Low-level image metrics: PixCorr and SSIM (docs/evaluation.md, MindEye2 ``final_evaluations``).

Both take reconstructions and ground truths as float ``(n, 3, h, w)`` in [0, 1] at the evaluation
resolution and resize them to 425×425 (bilinear, the NSD stimulus size) first. They return one
value per image; the metric is the mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from braindecode_fw.errors import ConfigError
from braindecode_fw.metrics.correlation import paired_pearson
from braindecode_fw.metrics.images import resize, rgb_to_gray

NSD_STIMULUS_SIZE = 425


def pixcorr(recons: torch.Tensor, gts: torch.Tensor, *, size: int = NSD_STIMULUS_SIZE,
            antialias: bool = False) -> torch.Tensor:
    """Pearson correlation of the flattened ``3·size·size`` pixel vectors, per image -> ``(n,)`` float64.

    A constant reconstruction or ground truth has no defined correlation; it scores 0.
    """
    _check_pair(recons, gts)
    r = resize(recons, size, antialias=antialias).reshape(len(recons), -1)
    g = resize(gts, size, antialias=antialias).reshape(len(gts), -1)
    return paired_pearson(g, r)


def _gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """scipy.ndimage's normalised Gaussian: radius ``int(truncate·sigma + 0.5)`` taps each side."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter(x: torch.Tensor, kernel: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Separable Gaussian filtering of ``(n, 1, h, w)`` along the given spatial axes (2 = rows of
    the image, i.e. vertical; 3 = horizontal) with reflect padding (skimage's ``mode='reflect'``;
    the border crop below makes the padding mode irrelevant to the result)."""
    r = len(kernel) // 2
    for axis in axes:
        if axis == 2:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
        else:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return x


def ssim(
    recons: torch.Tensor,
    gts: torch.Tensor,
    *,
    size: int = NSD_STIMULUS_SIZE,
    sigma: float = 1.5,
    truncate: float = 3.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
    legacy_skimage_multichannel: bool = False,
    antialias: bool = False,
    batch_size: int = 32,
) -> torch.Tensor:
    """Gaussian-weighted SSIM on the luminance images, per image -> ``(n,)`` float64.

    Exactly what MindEye2/MindBridge/NeuroPictor compute with ``structural_similarity(rec, gt,
    multichannel=True, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1.0)`` on ``rgb2gray`` images with scikit-image ≥ 0.20: a 2-D SSIM with an 11-tap
    Gaussian window (σ 1.5, truncate 3.5), population covariance, C1 = (0.01·R)², C2 = (0.03·R)²,
    and the map's 5-px border cropped before the mean.

    ``legacy_skimage_multichannel=True`` reproduces scikit-image ≤ 0.19, where ``multichannel=True``
    on a 2-D grayscale image made each *column* a channel: a 1-D vertical SSIM per column, then the
    mean over columns. It reads 0.07–0.10 higher on natural images (docs/evaluation.md); use it only
    to compare with numbers produced that way.
    """
    _check_pair(recons, gts)
    kernel = _gaussian_kernel(sigma, truncate).to(recons.device)
    pad = len(kernel) // 2
    axes = (2,) if legacy_skimage_multichannel else (2, 3)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    out = []
    for start in range(0, len(recons), batch_size):
        # grayscale in float32 as the reference (rgb2gray of a float32 tensor), statistics in float64
        x = rgb_to_gray(resize(recons[start : start + batch_size].float(), size, antialias=antialias))
        y = rgb_to_gray(resize(gts[start : start + batch_size].float(), size, antialias=antialias))
        x, y = x.double()[:, None], y.double()[:, None]
        if min(x.shape[-2:]) < len(kernel):
            raise ConfigError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {len(kernel)}-px window")
        ux, uy = _filter(x, kernel, axes), _filter(y, kernel, axes)
        vx = _filter(x * x, kernel, axes) - ux * ux
        vy = _filter(y * y, kernel, axes) - uy * uy
        vxy = _filter(x * y, kernel, axes) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        s = s[..., pad:-pad, :] if legacy_skimage_multichannel else s[..., pad:-pad, pad:-pad]
        out.append(s.flatten(1).mean(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _check_pair(recons: torch.Tensor, gts: torch.Tensor) -> None:
    if recons.shape != gts.shape:
        raise ConfigError(f"reconstructions {tuple(recons.shape)} and ground truths {tuple(gts.shape)} differ in shape")
    if recons.ndim != 4 or recons.shape[1] != 3:
        raise ConfigError(f"expected (n, 3, h, w) images, got {tuple(recons.shape)}")
    if len(recons) == 0:
        raise ConfigError("no images to evaluate")
    for name, x in (("reconstructions", recons), ("ground truths", gts)):
        if not math.isfinite(float(x.sum())):
            raise ConfigError(f"{name} contain non-finite pixel values")
