"""MindEye2 parts: parameter counts at real scale against docs/methods/mindeye2.md §2 (meta device), the low-level
head's shapes, the diffusion prior's schedule, loss and DDIM sampler against manual references."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from braindecode_fw.models.adapters import SubjectLinearAdapter
from braindecode_fw.models.decoder import build_token_decoder
from braindecode_fw.models.encoders import MindEye2Trunk
from braindecode_fw.models.heads import LowLevelHead, TokenProjector
from braindecode_fw.models.prior import DiffusionPrior, cosine_alphas_cumprod


def _build(n_features, target_shapes, hidden, lowlevel=True, prior=True, **prior_kw):
    return build_token_decoder(
        n_features, target_shapes, hidden=hidden,
        adapter=SubjectLinearAdapter, encoder=functools.partial(MindEye2Trunk, n_blocks=4),
        projector=TokenProjector, lowlevel=LowLevelHead if lowlevel else None,
        prior=functools.partial(DiffusionPrior, **prior_kw) if prior else None)


def _m(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_parameter_counts_at_real_scale():
    # ME2's ConvNeXt teacher tokens are 49 × 512; the auxiliary head's width follows the teacher
    shapes = {"clip_image_tokens": (256, 1664), "vae_latent": (4, 28, 28), "convnext_tokens": (49, 512)}
    with torch.device("meta"):
        big = _build({"subj01": 15724}, shapes, hidden=4096)
        small = _build({"subj01": 15724}, {"clip_image_tokens": (256, 1664)}, hidden=1024)
    # docs/methods/mindeye2.md §2: h=4096: ridge 64.4 M, backbone incl. heads 1,903.0 M, prior 259.9 M,
    # total 2,227.3 M; h=1024 without the low-level head: 16.1 M, 453.4 M, 259.9 M, 729.3 M
    assert _m(big.adapter) == pytest.approx(64.4, abs=0.05)
    assert _m(big.prior) == pytest.approx(259.9, abs=0.5)
    backbone = _m(big) - _m(big.adapter) - _m(big.prior)
    assert backbone == pytest.approx(1903.0, abs=1.0)
    assert _m(big) == pytest.approx(2227.3, abs=1.5)
    assert _m(small.adapter) == pytest.approx(16.1, abs=0.05)
    assert _m(small) - _m(small.adapter) - _m(small.prior) == pytest.approx(453.4, abs=0.5)
    assert big.heads["tokens"].out_features == 256 * 1664


def test_forward_shapes_and_prior_loss():
    torch.manual_seed(0)
    shapes = {"clip_image_tokens": (8, 16), "vae_latent": (4, 8, 8), "convnext_tokens": (4, 24)}
    dec = _build({"a": 30, "b": 20}, shapes, hidden=32, depth=1, heads=2, dim_head=8)
    x = torch.randn(3, 30)
    out = dec(x, ["a", "b", "a"], targets={"clip_image_tokens": torch.randn(3, 8, 16)})
    assert out["clip_image_tokens"].shape == (3, 8, 16) and out["clip_image_tokens/backbone"].shape == (3, 8, 16)
    assert out["vae_latent"].shape == (3, 4, 8, 8) and out["lowlevel_aux_tokens"].shape == (3, 4, 24)
    no_teacher = _build({"a": 30}, {k: v for k, v in shapes.items() if k != "convnext_tokens"}, hidden=32,
                        prior=False)
    assert "lowlevel_aux_tokens" not in no_teacher(x, ["a", "a", "a"])  # the aux head needs a teacher
    with pytest.raises(ValueError, match=r"the auxiliary head makes 4 tokens \(2×2\); the teacher 'convnext_tokens' has 9"):
        _build({"a": 30}, {**shapes, "convnext_tokens": (9, 24)}, hidden=32, prior=False)
    assert out["loss/prior"].ndim == 0 and out["loss/prior"] > 0
    out["loss/prior"].backward()
    assert dec.heads["tokens"].weight.grad is not None  # the prior loss trains the backbone too
    assert "loss/prior" not in dec(x, ["a", "b", "a"])
    with pytest.raises(ValueError, match="model.lowlevel.latent_shape: a square latent divisible by 4"):
        LowLevelHead(32, latent_shape=(4, 6, 6))


def test_cosine_schedule_matches_formula():
    a = cosine_alphas_cumprod(100)
    f = [math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(101)]
    ref = 1.0
    for t in range(100):
        ref *= 1 - min(1 - f[t + 1] / f[t], 0.999)
        assert float(a[t]) == pytest.approx(ref, rel=1e-9)
    assert float(a[-1]) < 1e-3 < float(a[0])


def test_prior_loss_is_x0_mse_and_ddim_recovers_a_perfect_prediction():
    torch.manual_seed(1)
    prior = DiffusionPrior(16, 8, depth=1, heads=2, dim_head=8, cond_drop_prob=0.0).eval()
    brain, target = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    torch.manual_seed(5)
    loss = prior.loss(brain, target)
    torch.manual_seed(5)
    t = torch.randint(0, 100, (2,))
    noise = torch.randn_like(target)
    a = prior.alphas_cumprod[t].view(-1, 1, 1)
    noised = a.sqrt() * target + (1 - a).sqrt() * noise
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prior.net(brain, noised, t), target))
    # an oracle network that always predicts x0 makes DDIM (any eta) land exactly on it
    prior.net.forward = lambda b, x, t, *a, **k: target  # noqa: ARG005
    for eta in (0.0, 1.0):
        prior.eta = eta
        torch.testing.assert_close(prior.sample(brain, generator=torch.Generator().manual_seed(0)), target)


def test_target_must_be_tokens():
    with pytest.raises(ValueError, match=r"model.target: 'clip_image_tokens' must be a token target \(T, W\)"):
        _build({"a": 10}, {"clip_image_tokens": (16,)}, hidden=8, lowlevel=False, prior=False)
