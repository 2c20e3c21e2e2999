"""The training fast path (braindecode_fw/pipeline/fast_path.py): what it switches, and that the
fused optimiser follows the same trajectory as torch's reference loop implementation."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from braindecode_fw.errors import ConfigError
from braindecode_fw.lit import DecoderModule, NonFiniteLossError
from braindecode_fw.losses import InfoNCELoss
from braindecode_fw.models.adapters import SubjectLinearAdapter
from braindecode_fw.models.decoder import build_decoder
from braindecode_fw.models.encoders import ResidualMLP
from braindecode_fw.models.heads import ProjectionHead
from braindecode_fw.pipeline import fast_path
from braindecode_fw.pipeline.fast_path import (
    FastPath,
    compile_decoder,
    fused_optimizer_factory,
    resolve_precision,
)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256), torch.nn.Linear(256, 32))


def _train(factory, steps: int = 20) -> tuple[torch.nn.Module, list[float], torch.optim.Optimizer]:
    net = _net()
    groups = [{"params": [p for p in net.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in net.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = factory(params=groups)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 64, generator=gen), torch.randn(128, 32, generator=gen)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, losses, opt


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_optimizer_follows_the_reference_loop(optimizer):
    # torch's for-loop implementation (foreach=False, fused=False) is the reference: the fused
    # kernel computes the same update, so 20 steps agree to float32 rounding
    configured = functools.partial(optimizer, lr=1e-3, betas=(0.9, 0.999))
    reference = functools.partial(optimizer, lr=1e-3, betas=(0.9, 0.999), foreach=False)
    ref_net, ref_losses, ref_opt = _train(reference)
    net, losses, opt = _train(fused_optimizer_factory(configured, FastPath()))
    assert opt.defaults["fused"] is True and not ref_opt.defaults.get("fused")
    assert ref_losses[-1] < 0.8 * ref_losses[0]  # it learned: the comparison is not between two no-ops
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-5
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the state is the usual one: a checkpoint of either continues with the other
    assert set(opt.state_dict()["state"][0]) == set(ref_opt.state_dict()["state"][0])


def test_fused_only_where_it_applies():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    params = list(_net().parameters())
    assert fused_optimizer_factory(adamw, FastPath.eager()) is adamw  # switched off
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    assert fused_optimizer_factory(sgd, FastPath()) is sgd  # no fused kernel here: as configured
    chosen = functools.partial(torch.optim.AdamW, lr=1e-3, foreach=True)
    assert fused_optimizer_factory(chosen, FastPath()) is chosen  # the user's own choice wins
    assert fused_optimizer_factory(adamw, FastPath())(params=params).defaults["fused"] is True
    half = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16)), torch.nn.Parameter(torch.zeros(3))]
    assert fused_optimizer_factory(adamw, FastPath())(params=half).defaults["fused"] is True  # fp16 is floating
    counts = [torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]
    assert not fused_optimizer_factory(adamw, FastPath())(params=counts).defaults.get("fused")  # no kernel for ints


def test_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    monkeypatch.setattr(fast_path, "cpu_has_bf16_matmul", lambda: False)
    assert resolve_precision("32-true", FastPath(), "cpu") == "32-true"  # emulated bf16 would be slower
    assert resolve_precision("32-true", FastPath(bf16=True), "cpu") == "bf16-mixed"  # asked for explicitly
    monkeypatch.setattr(fast_path, "cpu_has_bf16_matmul", lambda: True)
    assert resolve_precision("32-true", FastPath(), "cpu") == "bf16-mixed"
    assert resolve_precision(32, FastPath(), "cpu") == "bf16-mixed"
    assert resolve_precision("32-true", FastPath(bf16=False), "cpu") == "32-true"
    assert resolve_precision("16-mixed", FastPath(), "cpu") == "16-mixed"  # another precision is the user's choice
    assert resolve_precision("64-true", FastPath(bf16=True), "cpu") == "64-true"


def test_config_node_is_checked():
    assert FastPath.from_config(None) == FastPath()
    assert FastPath.from_config(OmegaConf.create({"bf16": False})).bf16 is False
    with pytest.raises(ConfigError, match=r"fast_path: unknown key\(s\) \['fused'\]; known: .*fused_optimizer"):
        FastPath.from_config({"fused": True})
    with pytest.raises(ConfigError, match="fast_path.bf16: expected true, false or auto, got 'yes'"):
        FastPath(bf16="yes")
    with pytest.raises(ConfigError, match="fast_path.nan_check: expected one of"):
        FastPath(nan_check="sometimes")
    with pytest.raises(ConfigError, match="fast_path.compile: expected true or false, got 'no'"):
        FastPath(compile="no")


def _module(nan_check: str) -> DecoderModule:
    dec = build_decoder({"s1": 8}, {"clip": (4,)}, adapter=SubjectLinearAdapter,
                        encoder=functools.partial(ResidualMLP, n_blocks=1), head=ProjectionHead, hidden=8)
    return DecoderModule(dec, InfoNCELoss(0.1), "clip", optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                         nan_check=nan_check)


def test_deferred_nan_check_names_the_first_bad_step():
    module = _module("deferred")
    assert not module._checks_every_step()
    module._track_finite(torch.tensor(1.0))
    module._raise_if_nonfinite_seen()  # finite so far: nothing
    module._track_finite(torch.tensor(float("nan")))
    module._track_finite(torch.tensor(2.0))  # a later finite loss does not clear it
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 0 .*fast_path.nan_check=step to name the batch"):
        module._raise_if_nonfinite_seen()
    assert _module("auto")._checks_every_step()  # on a CPU the check costs nothing: every step
    with pytest.raises(ConfigError, match="fast_path.nan_check"):
        _module("never")


def test_compiled_decoder_keeps_names_and_outputs():
    # torch.compile in place: the state dict (what checkpoints hold) keeps its names, outputs agree
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(16, 64)
    eager = net(x)
    names = list(net.state_dict())
    compiled = compile_decoder(net, FastPath(compile=True))
    assert compiled is net and list(net.state_dict()) == names and net._compiled_call_impl is not None
    torch.testing.assert_close(net(x), eager, rtol=1e-5, atol=1e-5)
