"""MindEye2's decoder against golden values from the released code (tests/fidelity/reference/
make_mindeye2.py): ridge, trunk (``trunk: as_released``), backbone tokens, projector, SoftCLIP and
BiMixCo losses, the zero gradient into the released MLP blocks, and two AdamW steps with the
released parameter groups (``optim.weight_decay_groups=mindeye2``)."""

from __future__ import annotations

import functools

import pytest
import torch

from braindecode_fw.lit import weight_decay_groups
from braindecode_fw.losses import bimixco_loss, mixco_soft_labels, soft_clip_loss
from braindecode_fw.models.adapters import SubjectLinearAdapter
from braindecode_fw.models.decoder import build_token_decoder
from braindecode_fw.models.encoders import MindEye2Trunk
from braindecode_fw.models.heads import TokenProjector
from tests.fidelity.golden import assert_golden, load_golden

WEIGHTS, INPUTS, EXPECTED, PROVENANCE = load_golden("mindeye2")
CFG = PROVENANCE["config"]


def _decoder(trunk: str):
    dec = build_token_decoder(
        CFG["subjects"], {"clip_image_tokens": (CFG["tokens"], CFG["width"])}, hidden=CFG["hidden"],
        adapter=SubjectLinearAdapter, encoder=functools.partial(MindEye2Trunk, n_blocks=CFG["n_blocks"], trunk=trunk),
        projector=TokenProjector)
    dec.load_state_dict({k: v for k, v in WEIGHTS.items() if trunk == "as_released" or "mixer_blocks2" not in k})
    return dec.eval()


def _batch():
    subjects = [s for s, n in CFG["subjects"].items() for _ in range(3)]
    width = max(CFG["subjects"].values())
    x = torch.cat([torch.nn.functional.pad(INPUTS[f"voxels/{s}"], (0, width - n)) for s, n in CFG["subjects"].items()])
    return x, subjects


def _ours(dec) -> dict[str, torch.Tensor]:
    x, subjects = _batch()
    adapter = dec.adapter(x, subjects)
    out = dec(x, subjects)
    pred, target = out["clip_image_tokens"], INPUTS["target"]
    soft = mixco_soft_labels(INPUTS["betas"], INPUTS["perm"])
    softclip = soft_clip_loss(pred, target, CFG["softclip_temperature"])
    grads = torch.autograd.grad(softclip, list(dec.encoder.mixer_blocks1.parameters()), allow_unused=True)
    return {"adapter": adapter, "trunk": dec.encoder(adapter), "backbone": out["clip_image_tokens/backbone"],
            "clip_voxels": pred, "loss/softclip": softclip,
            "loss/bimixco": bimixco_loss(pred, target, soft, CFG["mixco_temperature"]),
            "grad_norm/mixer_blocks1": torch.stack([g.norm() if g is not None else torch.zeros(())
                                                    for g in grads]).norm()}


def test_released_trunk_equals_the_released_code():
    ours = _ours(_decoder("as_released"))
    assert_golden(ours, EXPECTED, "mindeye2 (trunk: as_released)",
                  keys=[k for k in EXPECTED if not k.startswith("step2/") and k != "grad_norm/mixer_blocks1"])
    # the released MLP blocks never reach the output: their gradient is zero up to the rounding of
    # a LayerNorm over an axis of length 1 (~1e-4 here, against O(1) for the heads). Rounding noise
    # differs between CPUs' kernels, so both are checked to be noise rather than equal to each other
    assert float(EXPECTED["grad_norm/mixer_blocks1"]) < 1e-3 and float(ours["grad_norm/mixer_blocks1"]) < 1e-3


def test_residual_trunk_is_a_different_network():
    ours = _ours(_decoder("residual"))
    assert torch.allclose(ours["adapter"], EXPECTED["adapter"], atol=1e-6)  # same ridge
    assert float((ours["backbone"] - EXPECTED["backbone"]).detach().abs().max()) > 1e-2
    assert float(ours["grad_norm/mixer_blocks1"]) > 0


def test_two_adamw_steps_with_the_released_parameter_groups():
    dec = _decoder("as_released")
    groups = weight_decay_groups(dec, "mindeye2")
    optimizer = torch.optim.AdamW(groups, lr=3e-4, weight_decay=1e-2)
    x, subjects = _batch()
    for _ in range(2):
        optimizer.zero_grad()
        soft_clip_loss(dec(x, subjects)["clip_image_tokens"], INPUTS["target"], CFG["softclip_temperature"]).backward()
        optimizer.step()
    state = dict(dec.named_parameters())
    # the mixer blocks' gradients are rounding noise (see above) that Adam rescales to full-size
    # steps in both codes, so their updates are not reproducible; every other parameter is
    assert_golden({f"step2/{k}": v for k, v in state.items()}, EXPECTED, "mindeye2 (AdamW step, mindeye2 groups)",
                  keys=[k for k in EXPECTED if k.startswith("step2/") and ".mixer_blocks" not in k])
    # the framework's default groups leave LayerNorm weights undecayed: a different step
    dec2 = _decoder("as_released")
    opt2 = torch.optim.AdamW(weight_decay_groups(dec2, "adapters_and_matrices"), lr=3e-4, weight_decay=1e-2)
    for _ in range(2):
        opt2.zero_grad()
        soft_clip_loss(dec2(x, subjects)["clip_image_tokens"], INPUTS["target"], CFG["softclip_temperature"]).backward()
        opt2.step()
    with pytest.raises(AssertionError, match="heads.projector.net.0.weight"):
        assert_golden({f"step2/{k}": v for k, v in dec2.named_parameters()}, EXPECTED, "mindeye2",
                      keys=["step2/heads.projector.net.0.weight"], atol=1e-9)
