"""MindBridge parts: parameter counts at real scale (docs/methods/mindbridge.md §2), pooling per subject,
LoRA-initialised adapters, builders, reconstruction and cycle losses against manual computations."""

from __future__ import annotations

import functools

import pytest
import torch

from braindecode_fw.models.adapters import (
    LowRankResidualAdapter,
    PooledSubjectEmbedder,
    SubjectBuilder,
)
from braindecode_fw.models.decoder import BridgeDecoder, build_bridge_decoder
from braindecode_fw.models.encoders import PostNormResidualMLP
from braindecode_fw.models.heads import ProjectionHead

MB_SUBJECTS = {"subj01": 15724, "subj02": 14278, "subj05": 13039, "subj07": 12682}
MB_TARGETS = {"clip_image_tokens": (257, 768), "clip_text_tokens": (77, 768)}


def _build(n_features, targets, hidden=2048, pool_size=8192, bottleneck=128):
    return build_bridge_decoder(
        n_features, targets,
        adapter=functools.partial(PooledSubjectEmbedder, pool_size=pool_size, bottleneck=bottleneck),
        encoder=functools.partial(PostNormResidualMLP, n_blocks=4), head=ProjectionHead,
        builder=functools.partial(SubjectBuilder, bottleneck=bottleneck), hidden=hidden)


def _millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_parameter_counts_at_real_scale():
    with torch.device("meta"):
        four = _build(MB_SUBJECTS, MB_TARGETS)
        single = _build({"subj01": 15724}, MB_TARGETS)
    # docs/methods/mindbridge.md §2: embedder 18.89 M, builder 18.91 M, translator 16.80 M, heads 404.4 M + 121.2 M
    assert _millions(four.adapter.embedders["subj01"]) == pytest.approx(18.89, abs=0.01)
    assert _millions(four.builder.builders["subj01"]) == pytest.approx(18.91, abs=0.01)
    assert _millions(four.encoder) == pytest.approx(16.80, abs=0.01)
    assert _millions(four.heads["clip_image_tokens"]) == pytest.approx(404.4, abs=0.1)
    assert _millions(four.heads["clip_text_tokens"]) == pytest.approx(121.2, abs=0.1)
    assert _millions(four) == pytest.approx(693.6, abs=0.1)  # 4-subject MindBridge
    assert single.builder is None  # the released single-subject MindSingle has no builder
    assert _millions(single) == pytest.approx(561.3, abs=0.1)  # "Vanilla"


def test_single_subject_has_no_builder_and_zero_auxiliary_losses():
    torch.manual_seed(0)
    dec = _build({"a": 40}, {"clip_image_tokens": (3, 8)}, hidden=16, pool_size=32, bottleneck=4)
    out = dec(torch.randn(2, 40), ["a", "a"], targets={})
    assert dec.builder is None and not any(n.startswith("builder") for n, _ in dec.named_parameters())
    assert out["loss/reconstruction"].item() == 0.0 and out["loss/cycle"].item() == 0.0
    assert not out["loss/reconstruction"].requires_grad


def test_single_subject_model_cannot_be_adapted_by_reset_tuning():
    from braindecode_fw.tasks.adapt import add_subject

    dec = _build({"a": 40}, {"clip_image_tokens": (3, 8)}, hidden=16, pool_size=32, bottleneck=4)
    with pytest.raises(ValueError, match=r"one subject and no builders; adapt from a model trained on at least "
                                         r"two subjects \(data.subjects\)"):
        add_subject(dec, "b", 50, init_bias_from=None)
    assert list(dec.adapter.embedders) == ["a"]  # refused before anything was added


def test_real_scale_forward_backward_shapes():
    """One NSD-sized row per subject through a narrower trunk: pooling from 12.7k–15.7k voxels to
    8192, token heads at 257×768 and 77×768, both auxiliary losses differentiable."""
    torch.manual_seed(0)
    dec = _build(MB_SUBJECTS, MB_TARGETS, hidden=64, bottleneck=8)
    subjects = ["subj07", "subj01"]
    x = torch.randn(2, 15724)
    out = dec(x, subjects, targets={})
    assert out["clip_image_tokens"].shape == (2, 257, 768) and out["clip_text_tokens"].shape == (2, 77, 768)
    loss = out["clip_image_tokens"].square().mean() + out["loss/reconstruction"] + out["loss/cycle"]
    loss.backward()
    assert dec.adapter.embedders["subj07"][1].weight.grad is not None
    assert dec.adapter.embedders["subj02"][1].weight.grad is None  # absent from the batch


def test_pooling_per_subject_and_lora_identity_init():
    emb = PooledSubjectEmbedder({"a": 10, "b": 7}, hidden=4, pool_size=5)
    x = torch.randn(3, 10)
    x[1, 7:] = 1e6  # padding beyond subject b's voxels must not leak into its pooled vector
    pooled = emb.pool(x, ["a", "b", "a"])
    torch.testing.assert_close(pooled[1], torch.nn.functional.adaptive_max_pool1d(x[1:2, None, :7], 5)[0, 0])
    torch.testing.assert_close(pooled[0], torch.nn.functional.adaptive_max_pool1d(x[0:1, None, :], 5)[0, 0])
    adapter = LowRankResidualAdapter(6, bottleneck=2)
    v = torch.randn(4, 6)
    torch.testing.assert_close(adapter(v), v)  # starts as the identity (up = 0)
    avg = PooledSubjectEmbedder({"a": 10}, hidden=4, pool_size=5, pool="avg").pool(x[:1], ["a"])
    torch.testing.assert_close(avg[0], x[0].reshape(5, 2).mean(1))
    with pytest.raises(ValueError, match="model.adapter.pool: 'max' or 'avg', got 'median'"):
        PooledSubjectEmbedder({"a": 3}, 2, pool="median")


def test_reconstruction_and_cycle_losses_match_manual():
    torch.manual_seed(1)
    dec = _build({"a": 12, "b": 9, "c": 10}, {"t": (3, 4)}, hidden=8, pool_size=6, bottleneck=2)
    for p in dec.parameters():  # non-trivial builders/adapters
        torch.nn.init.normal_(p, std=0.3)
    dec.eval()  # no dropout: deterministic comparison
    subjects = ["a", "b", "a", "c"]
    x = torch.randn(4, 12)
    dec.cycle_target = "b"  # adaptation: cycle source -> b
    torch.manual_seed(7)
    out = dec(x, subjects, targets={})
    pooled = dec.adapter.pool(x, subjects)
    e = dec.adapter.embed(pooled, subjects)
    ref_rec = torch.nn.functional.mse_loss(dec.builder(e, subjects), pooled)
    torch.testing.assert_close(out["loss/reconstruction"], ref_rec)
    torch.manual_seed(7)
    source = ["a", "c"][int(torch.randint(2, ()))]
    rows = [i for i, s in enumerate(subjects) if s == source]
    e_a = e[rows]
    back = dec.adapter.embedders["b"](dec.builder.builders["b"](e_a))
    torch.testing.assert_close(out["loss/cycle"], torch.nn.functional.mse_loss(back, e_a))
    single = dec(x[:2], ["a", "a"], targets={})
    assert float(single["loss/cycle"]) == 0.0  # one subject in the batch: no pair
    assert "loss/cycle" not in dec(x, subjects)  # prediction: no auxiliary losses


def test_repeat_averaging_drops_auxiliary_outputs():
    dec = _build({"a": 12}, {"t": (3, 4)}, hidden=8, pool_size=6, bottleneck=2).eval()
    x = torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = dec(x, ["a", "a"], repeat_mask=mask)
    assert set(out) == {"t"}
    ref = dec(x[0, :2], ["a", "a"])["t"].mean(0)
    torch.testing.assert_close(out["t"][0], ref)
    assert isinstance(dec, BridgeDecoder)
