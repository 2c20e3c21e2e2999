"""Brain-IT's multi-scale VGG16-BN tokens (docs/methods/brainit.md §3, §6): token counts at real size, the
tokenisation against an independent reshape, the fold round trip and overlap averaging, and the
encoder against torchvision's VGG16-BN layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from braindecode_fw.metrics.weights import MissingWeightsError
from braindecode_fw.targets.multiscale import (
    VggMultiScaleTokenEncoder,
    fold_tokens,
    multiscale_layout,
    scale_sizes,
    tokenise_maps,
)
from tests.conftest import CONF


def _random_maps(size: int, n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, size // 2**i, size // 2**i, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))]


def _reference_tokens(maps: list[torch.Tensor]) -> torch.Tensor:
    """Brain-IT's layout built with reshapes/shifted views instead of F.unfold."""
    a, b, c, d, e = maps
    n, ca, h, _ = a.shape
    ta = a.reshape(n, ca, h // 2, 2, h // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) ** 2, ca * 4)
    hb = b.shape[-1]
    views = torch.stack([b[:, :, ki : ki + hb - 1, kj : kj + hb - 1] for ki in (0, 1) for kj in (0, 1)], dim=2)
    tb = views.reshape(n, b.shape[1] * 4, (hb - 1) ** 2).transpose(1, 2)
    tc = c.reshape(n, 256, -1).transpose(1, 2)
    td, te = d.reshape(n, 512, -1).transpose(1, 2), e.reshape(n, 512, -1).transpose(1, 2)
    return torch.cat([torch.cat([ta, ta], -1), tb, torch.cat([tc, tc], -1), td, te], dim=1)


def test_token_counts_at_real_size():
    assert scale_sizes(112) == [56 * 56, 55 * 55, 28 * 28, 14 * 14, 7 * 7]
    assert sum(scale_sizes(112)) == 7190  # not the "2029" of Brain-IT's comment
    layout = multiscale_layout(112)
    assert layout.map_sizes == (112, 56, 28, 14, 7) and layout.n_tokens == 7190
    assert layout.slices[1] == slice(3136, 3136 + 3025) and layout.slices[4] == slice(7141, 7190)
    assert torch.equal(torch.bincount(layout.scale_of_token()), torch.tensor([3136, 3025, 784, 196, 49]))
    assert scale_sizes(64) == [1024, 961, 256, 64, 16]
    with pytest.raises(ValueError, match=r"target.image_size: .* even size >= 16.*got 63"):
        scale_sizes(63)


@pytest.mark.parametrize("size", [112, 64])
def test_tokenise_matches_reference_and_folds_back(size):
    maps = _random_maps(size)
    tokens = tokenise_maps(maps)
    assert tokens.shape == (2, sum(scale_sizes(size)), 512)
    torch.testing.assert_close(tokens, _reference_tokens(maps), rtol=0, atol=0)
    for got, want in zip(fold_tokens(tokens, size), maps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fold_averages_duplicate_halves_and_overlaps():
    """Predicted tokens are not consistent: the fold averages the halves of scales (a), (c) and the up to
    four stride-1 tokens covering a position of scale (b) (checked with explicit loops)."""
    size = 32
    layout = multiscale_layout(size)
    tokens = torch.randn(1, layout.n_tokens, 512, generator=torch.Generator().manual_seed(3))
    a, b, c, _, _ = fold_tokens(tokens, size)
    ta, tb, tc = (tokens[0, s].numpy().astype(np.float64) for s in layout.slices[:3])
    # scale (a): pixel (y, x) of channel ch is entry ch*4 + (y%2)*2 + x%2 of token (y//2, x//2)
    y, x, ch = 5, 10, 7
    tok = (y // 2) * (size // 2) + x // 2
    k = ch * 4 + (y % 2) * 2 + x % 2
    assert float(a[0, ch, y, x]) == pytest.approx((ta[tok, k] + ta[tok, 256 + k]) / 2, abs=1e-6)
    # scale (b): mean over the tokens (i, j) with i <= y <= i+1, j <= x <= j+1
    hb = size // 2
    for y, x in [(0, 0), (0, 7), (6, 9), (hb - 1, hb - 1)]:
        vals = [tb[i * (hb - 1) + j, ch * 4 + (y - i) * 2 + (x - j)]
                for i in (y - 1, y) for j in (x - 1, x) if 0 <= i < hb - 1 and 0 <= j < hb - 1]
        assert len(vals) == (1 if (y, x) in [(0, 0), (hb - 1, hb - 1)] else 2 if y == 0 else 4)
        assert float(b[0, ch, y, x]) == pytest.approx(np.mean(vals), abs=1e-5)
    assert float(c[0, 200, 3, 4]) == pytest.approx((tc[3 * 8 + 4, 200] + tc[3 * 8 + 4, 456]) / 2, abs=1e-6)


def test_shape_errors_name_what_was_expected():
    maps = _random_maps(64)
    with pytest.raises(ValueError, match=r"expected 5 VGG16-BN feature maps .* got 4"):
        tokenise_maps(maps[:4])
    bad = list(maps)
    bad[2] = bad[2][:, :128]
    with pytest.raises(ValueError, match=r"map 2 has shape \(2, 128, 16, 16\), expected \(2, 256, 16, 16\)"):
        tokenise_maps(bad)
    with pytest.raises(ValueError, match=r"expected \(n, 2321, 512\) for image_size 64"):
        fold_tokens(torch.zeros(1, 7190, 512), 64)


def _torchvision_features():
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    feats = make_layers(cfgs["D"], batch_norm=True).eval()  # torchvision's vgg16_bn().features
    with torch.no_grad():
        for m in feats.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running statistics must load too
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return feats


def test_encoder_matches_torchvision_vgg16_bn_layers(tmp_path):
    feats = _torchvision_features()
    path = tmp_path / "vgg16_bn.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    enc = VggMultiScaleTokenEncoder(weights=str(path), image_size=112, batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 80, 80, 3), dtype=np.uint8)
    tokens = enc.encode(images)
    assert tokens.shape == (3, 7190, 512) and enc.output_shape == (7190, 512)
    # reference: torchvision's modules, hooked after the ReLUs at features.5/12/22/32/42
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(112, 112), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    maps = []
    for i in (5, 12, 22, 32, 42):
        assert isinstance(feats[i], torch.nn.ReLU)
        feats[i].register_forward_hook(lambda m, inp, out: maps.append(out.clone()))
    with torch.no_grad():
        feats(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]
    torch.testing.assert_close(tokens, _reference_tokens(maps), atol=1e-4, rtol=1e-4)
    # identity: the weights file is part of the cache key
    assert enc.encoder_id != VggMultiScaleTokenEncoder(weights="random:0", image_size=112).encoder_id


def test_random_weights_and_weight_tags(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    a = VggMultiScaleTokenEncoder(weights="random:0", image_size=64).encode(images)
    b = VggMultiScaleTokenEncoder(weights="random:0", image_size=64).encode(images)
    c = VggMultiScaleTokenEncoder(weights="random:1", image_size=64).encode(images)
    assert a.shape == (2, 2321, 512) and torch.equal(a, b) and not torch.allclose(a, c)
    # the torchvision tag resolves to vgg16_bn's checkpoint in the hub cache; offline, nothing downloads
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("BDF_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"vgg16_bn-6c64b313\.pth.*target\.weights"):
        VggMultiScaleTokenEncoder()
    with pytest.raises(ValueError, match=r"target.weights: 'VGG16_Weights.IMAGENET1K_V1' is a weights tag of another"):
        VggMultiScaleTokenEncoder(weights="VGG16_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"target.image_size: .*got 99"):
        VggMultiScaleTokenEncoder(weights="random:0", image_size=99)


def test_conf_node_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "target" / "vgg_multiscale.yaml")
    assert cfg.weights == "VGG16_BN_Weights.IMAGENET1K_V1" and cfg.image_size == 112
    enc = instantiate(cfg, weights="random:0", image_size=64)
    assert isinstance(enc, VggMultiScaleTokenEncoder) and enc.feature_name == "vgg_tokens"
    assert enc.output_shape == (2321, 512)
