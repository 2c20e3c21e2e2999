"""PixCorr and SSIM against independent numpy/skimage computations (docs/evaluation.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from skimage.transform import resize as sk_resize

from braindecode_fw.metrics.pixel import pixcorr, ssim


def _pairs(n=5, size=64, seed=0):
    g = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    r = (0.6 * g + 0.4 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)))
    return r, g


def _sk_ssim(rec, gt, legacy=False):
    """ME2's call on skimage>=0.20 (2-D) or what skimage<=0.19 did with multichannel=True on a
    2-D gray image (channel_axis=-1: every column a channel)."""
    a = rgb2gray(rec.permute(1, 2, 0).numpy())
    b = rgb2gray(gt.permute(1, 2, 0).numpy())
    kw = {"channel_axis": -1} if legacy else {}
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, **kw)


def test_pixcorr_matches_numpy_corrcoef():
    r, g = _pairs(size=425)  # at 425 already: no resize, the flattened Pearson alone
    ours = pixcorr(r, g)
    ref = [np.corrcoef(g[i].numpy().ravel().astype(np.float64), r[i].numpy().ravel().astype(np.float64))[0, 1]
           for i in range(len(r))]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)
    assert ours.dtype == torch.float64 and ours.shape == (5,)


def test_pixcorr_resizes_bilinear_to_425():
    r, g = _pairs(n=2, size=256)
    ours = pixcorr(r, g)
    # skimage bilinear (order=1) with half-pixel centres and no antialias is torchvision's upsampling
    up = lambda x: sk_resize(x.permute(1, 2, 0).numpy(), (425, 425), order=1, anti_aliasing=False, mode="edge")  # noqa: E731
    ref = [np.corrcoef(up(g[i]).ravel(), up(r[i]).ravel())[0, 1] for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_pixcorr_edge_cases():
    r, g = _pairs(n=2, size=32)
    assert torch.allclose(pixcorr(g, g, size=32), torch.ones(2, dtype=torch.float64))
    blank = torch.full_like(r, 0.5)
    out = pixcorr(blank, g, size=32)
    assert torch.equal(out, torch.zeros(2, dtype=torch.float64))  # constant image: defined as 0, not NaN
    with pytest.raises(ValueError, match="differ in shape"):
        pixcorr(r[:1], g)


@pytest.mark.parametrize("legacy", [False, True])
def test_ssim_matches_skimage(legacy):
    r, g = _pairs(n=4, size=64)
    ours = ssim(r, g, size=64, legacy_skimage_multichannel=legacy)
    ref = [_sk_ssim(r[i], g[i], legacy=legacy) for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_ssim_at_425_matches_skimage_after_resize():
    r, g = _pairs(n=2, size=256)
    ours = ssim(r, g)  # resized to 425 inside
    up = lambda x: torch.from_numpy(  # noqa: E731
        sk_resize(x.permute(1, 2, 0).numpy(), (425, 425), order=1, anti_aliasing=False, mode="edge")
    ).permute(2, 0, 1).float()
    ref = [_sk_ssim(up(r[i]), up(g[i])) for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_ssim_edge_cases():
    r, g = _pairs(n=2, size=32)
    np.testing.assert_allclose(ssim(g, g, size=32).numpy(), 1.0, atol=1e-12)
    flat_a, flat_b = torch.full_like(g, 0.2), torch.full_like(g, 0.7)
    out = ssim(flat_a, flat_b, size=32)  # constant images: luminance term only, finite
    mu_a, mu_b = 0.2, 0.7
    c1 = 0.01**2
    np.testing.assert_allclose(out.numpy(), (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1), atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the 11-px window"):
        ssim(r[:, :, :8, :8], g[:, :, :8, :8], size=8)


def _natural_images():
    """skimage's bundled photographs, RGB float in [0, 1] at 425×425."""
    imgs = []
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        im = getattr(skdata, name)()
        im = np.stack([im] * 3, -1) if im.ndim == 2 else im
        imgs.append(sk_resize(im, (425, 425), order=1, anti_aliasing=True))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()


def test_ssim_legacy_flag_reads_higher_on_natural_images():
    """docs/evaluation.md: column-as-channel SSIM (skimage<=0.19) reads +0.07-0.10 above 2-D SSIM on
    natural images with reconstruction-like degradations (here: a 28-px blurry version, as a
    VAE-latent low-level branch gives, plus mild noise; 2-D SSIM ~0.25-0.35 like published recons)."""
    gt = _natural_images()
    low = F.interpolate(F.interpolate(gt, size=(28, 28), mode="bilinear", antialias=True), size=(425, 425),
                        mode="bilinear")
    recon = (low + 0.05 * torch.randn(low.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    modern = ssim(recon, gt).numpy()
    legacy = ssim(recon, gt, legacy_skimage_multichannel=True).numpy()
    assert np.all((modern > 0.2) & (modern < 0.4)), modern
    shift = legacy - modern
    assert np.all((shift > 0.05) & (shift < 0.12)), shift
    assert 0.07 <= shift.mean() <= 0.10, shift
