"""STTM parts (docs/methods/sttm.md §2): real-scale parameter counts against sums over the specification
(meta device), the token-attention head against a manual computation, the TransformerDecoder prior's
brain-token drop and √d target scaling, and new-subject adapters."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from braindecode_fw.models.adapters import SubjectMLPAdapter
from braindecode_fw.models.heads import TokenAttentionHead, TokenProjector
from braindecode_fw.models.prior import DiffusionPrior, TransformerDecoderPriorNetwork
from tests.conftest import compose_config


def _sttm(n_features, target_shapes, overrides=()):
    cfg = compose_config("train", ["model=sttm", *overrides])
    return instantiate(cfg.model)(n_features=n_features, target_shapes=target_shapes)


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear(a: int, b: int) -> int:
    return a * b + b


def test_parameter_counts_and_shapes_at_real_scale():
    voxels = {"subj01": 15724, "subj02": 14278, "subj05": 13039, "subj07": 12682}
    with torch.device("meta"):
        dec = _sttm(voxels, {"clip_image_tokens": (257, 768), "clip_text": (768,)})
        out = dec(torch.zeros(2, 15724), ["subj01", "subj07"])
    assert out["clip_image_tokens"].shape == (2, 257, 768) and out["clip_image_tokens/backbone"].shape == (2, 257, 768)
    h, ln = 4096, 2 * 4096
    block = _linear(h, h) + ln  # post-norm residual block: Linear + LayerNorm
    for s, n in voxels.items():  # adapter: Linear -> LN, + 1 block
        assert _n(dec.adapter.mlps[s]) == _linear(n, h) + ln + block
    assert _n(dec.encoder) == 4 * block
    head = 2 * h + _linear(h, 257 * 128) + 2 * 128 + _linear(128, 3 * 768) + _linear(768, 128) \
        + 2 * 128 + _linear(128, 1536) + 2 * 1536 + _linear(1536, 768)
    assert _n(dec.heads["tokens"]) == head
    assert _n(dec.heads["projector"]) == 2 * 768 + _linear(768, 2048) + 2 * 2048 + _linear(2048, 2048) \
        + 2 * 2048 + _linear(2048, 768)
    d = 768
    layer = 2 * (3 * d * d + 3 * d + _linear(d, d)) + _linear(d, 3072) + _linear(3072, d) + 3 * 2 * d
    prior = 6 * layer + _linear(d, 2 * d) + _linear(2 * d, 2 * d) + _linear(2 * d, d) + 4 * 257 * d
    assert _n(dec.prior) == prior
    # in all (docs/decoders.md): 4 adapters 295.4 M, shared MLP 67.2 M, token head 136.6 M,
    # projector 7.4 M, prior 62.2 M
    assert _n(dec) / 1e6 == pytest.approx(568.7, abs=0.05)


def test_token_attention_head_matches_manual_attention():
    torch.manual_seed(0)
    head = TokenAttentionHead(hidden=12, n_tokens=5, width=16, token_dim=8, attention_dim=12, heads=3,
                              mlp_dim=20, dropout=0.0).eval()
    h = torch.randn(2, 12)
    x = head.to_tokens(h).view(2, 5, 8)
    q, k, v = head.qkv(head.attention_norm(x)).split(12, dim=-1)

    def heads(t):
        return t.view(2, 5, 3, 4).transpose(1, 2)

    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    attended = (weights @ heads(v)).transpose(1, 2).reshape(2, 5, 12)
    expected = head.widen(x + head.attention_out(attended))
    torch.testing.assert_close(head(h), expected, atol=1e-6, rtol=1e-5)
    assert head(h).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="attention_dim 10 is not divisible by heads 3"):
        TokenAttentionHead(hidden=4, n_tokens=2, width=4, attention_dim=10, heads=3)


def test_projector_inner_width():
    p = TokenProjector(6, n_layers=3, inner=10)
    assert [m.out_features for m in p.net if isinstance(m, torch.nn.Linear)] == [10, 10, 6]
    assert p(torch.randn(2, 3, 6)).shape == (2, 3, 6)


def test_prior_drops_brain_tokens_while_training_and_scales_targets():
    torch.manual_seed(0)
    net = TransformerDecoderPriorNetwork(16, 20, depth=1, heads=2, ff_dim=32, brain_token_drop=(0.6, 0.65))
    brain = torch.randn(3, 20, 16)
    kept = net.kept_brain_tokens(brain)
    assert kept.shape[1] in (20 - 12, 20 - 13)  # int(0.6·20)=12 … int(0.65·20)=13 dropped
    for i in range(3):  # each sample keeps a subset of its own tokens
        rows = {tuple(r.tolist()) for r in brain[i]}
        assert all(tuple(r.tolist()) in rows for r in kept[i])
    assert not torch.equal(kept[0], kept[1][: len(kept[0])])
    net.eval()
    assert net.kept_brain_tokens(brain) is brain  # no drop at inference
    prior = DiffusionPrior(16, 20, cond_drop_prob=0.0, embed_scale="sqrt_dim",
                           network=lambda dim, n_tokens: TransformerDecoderPriorNetwork(dim, n_tokens, depth=1,
                                                                                          heads=2, ff_dim=32))
    assert prior.embed_scale == 4.0
    prior.eval()
    target = torch.randn(2, 20, 16)
    torch.manual_seed(3)
    loss = prior.loss(brain[:2], target)
    torch.manual_seed(3)  # the same t and noise, on 4× the target, through the network directly
    t = torch.randint(0, 100, (2,))
    x0 = 4.0 * target
    noised = prior.q_sample(x0, t, torch.randn_like(x0))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prior.net(brain[:2], noised, t), x0))
    with pytest.raises(ValueError, match="model.prior.embed_scale: a positive number or 'sqrt_dim', got 'huge'"):
        DiffusionPrior(16, 20, embed_scale="huge")


def test_mlp_adapter_routes_crops_and_adds_subjects():
    torch.manual_seed(0)
    adapter = SubjectMLPAdapter({"a": 6, "b": 4}, hidden=8, dropout=0.0, block_dropout=0.0).eval()
    x = torch.randn(3, 6)
    out = adapter(x, ["b", "a", "b"])
    torch.testing.assert_close(out[1], adapter.mlps["a"](x[1:2])[0])
    torch.testing.assert_close(out[0], adapter.mlps["b"](x[0:1, :4])[0])  # cropped to b's 4 voxels
    adapter.add_subject("c", 5)
    assert adapter.mlps["c"][0].in_features == 5 and adapter(x, ["c"]).shape == (1, 8)
    with pytest.raises(KeyError, match="no adapter for subject 'z'"):
        adapter(x[:1], ["z"])
