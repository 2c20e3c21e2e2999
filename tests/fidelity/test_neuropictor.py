"""NeuroPictor's two fMRI -> diffusion mappers against golden values from the authors' released
code (tests/fidelity/reference/make_neuropictor.py; tests/fidelity/golden/neuropictor/provenance.json).

Our decoder is built from ``braindecode_fw/conf/model/neuropictor.yaml`` at the reference's tiny configuration
(17 tokens × 8 -> 77 × 8 conditioning, 4 × 3 × 3 control map, the extra branch on as in the
fine-tune model, the mappers' middle widths by the released rules); its cortical projection and
ViT are replaced by a pass-through (the reference fed fixed tokens to the mappers), its diffusion
term by the reference's stand-in for ``L_simple``. Covered:

- the semantic mapper's ``clip_txt`` and conditioning (the zero-initialised extra branch with
  non-zero weights), the pretraining model's conditioning (``extra_branch: false``), the control
  map;
- ``braindecode_fw/conf/loss/neuropictor.yaml`` through ``TermsObjective``: ``w_sem · L_sem`` against the released
  ``sem_loss`` and the total against theirs (``L_simple + sem_loss``, with the stand-in);
- one AdamW step with ``braindecode_fw/conf/experiment/neuropictor_nsd.yaml``'s optimiser and parameter groups
  (the update divided by the lr, every parameter; float64 as in the reference), and the weight
  decay of every parameter against the released single group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from tests.fidelity.golden import assert_golden, golden_dir, load_golden

CONF = Path(__file__).resolve().parents[2] / "braindecode_fw" / "conf"
METHOD = "neuropictor"
# the reference's sizes: 4 × 4 patches + CLS = 17 tokens of width 8
TINY = {"map_size": 16, "patch": 4, "dim": 8, "depth": 1, "heads": 2, "fill_radius": 0.0, "text_tokens": 77,
        "control_channels": 4, "control_size": 3, "diffusion": None}


class _Tokens(nn.Module):
    """In place of the cortical projection: the "responses" are the encoder's tokens already."""

    def forward(self, responses: torch.Tensor, subjects) -> torch.Tensor:
        return responses


class _StandInDiffusion(nn.Module):
    """The reference's stand-in for ``L_simple``: ``MSE(condition, A) + MSE(control, C)``, ``C``
    passed as the latent target (the decoder hands that target to its diffusion module)."""

    def __init__(self, condition_target: torch.Tensor):
        super().__init__()
        self.register_buffer("condition_target", condition_target)

    def forward(self, latents, condition, control):
        return F.mse_loss(condition, self.condition_target) + F.mse_loss(control, latents)


def build_ours(extra_branch: bool = True):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "neuropictor.yaml"), TINY, {"extra_branch": extra_branch})
    decoder = instantiate(cfg)(n_features={"s": 4}, target_shapes={"clip_text_tokens": (77, 8)})
    assert decoder.encoder.n_tokens == 17
    decoder.projection, decoder.encoder = _Tokens(), nn.Identity()
    return decoder


@pytest.fixture()
def golden():
    pytest.importorskip("safetensors")
    if not (golden_dir(METHOD) / "expected.safetensors").is_file():
        pytest.skip("no NeuroPictor golden fixture")
    weights, inputs, expected, prov = load_golden(METHOD)
    decoder = build_ours()
    decoder.load_state_dict(weights, strict=True)
    decoder.diffusion = _StandInDiffusion(inputs["stand_in/condition"])
    return decoder, weights, inputs, expected, prov


def mapper_outputs(decoder, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = decoder(inputs["tokens"], ["s"] * len(inputs["tokens"]))
    return {"semantic/condition": out["clip_text_tokens"], "semantic/clip_txt": out["clip_text_tokens/main"],
            "control/map": out["control_map"]}


def batch(inputs, dtype=torch.float32):
    from braindecode_fw.data.datamodule import Batch

    x = inputs["tokens"].to(dtype)
    return Batch(subject=["s"] * len(x), responses=x, image_index=torch.arange(len(x)),
                 targets={"clip_text_tokens": inputs["clip_text_tokens"].to(dtype),
                          "vae_latent": inputs["stand_in/control"].to(dtype)})


def objective():
    return instantiate(OmegaConf.load(CONF / "loss" / "neuropictor.yaml")).train()


def optimizer(decoder):
    """``braindecode_fw/conf/experiment/neuropictor_nsd.yaml`` over ``braindecode_fw/conf/optim/adam.yaml``, the groups as
    ``LitDecoder._param_groups`` forms them (the decoder held as ``decoder``)."""
    from braindecode_fw.lit import weight_decay_groups

    optim = OmegaConf.merge(OmegaConf.load(CONF / "optim" / "adam.yaml"),
                            OmegaConf.load(CONF / "experiment" / "neuropictor_nsd.yaml").optim)
    assert optim.scheduler is None  # the released recipe has no schedule either
    holder = nn.Module()
    holder.decoder = decoder
    return instantiate(optim.optimizer)(params=weight_decay_groups(holder, optim.weight_decay_groups,
                                                                   adapter_prefix="decoder.adapter."))


def test_mapper_outputs_match_the_released_mappers(golden):
    decoder, _, inputs, expected, _ = golden
    assert_golden(mapper_outputs(decoder, inputs), expected, METHOD,
                  keys=["semantic/condition", "semantic/clip_txt", "control/map"])


def test_pretraining_model_conditions_on_clip_txt(golden):
    _, weights, inputs, expected, _ = golden
    decoder = build_ours(extra_branch=False)
    assert decoder.semantic.extra is None
    decoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith("semantic.extra")}, strict=True)
    out = mapper_outputs(decoder, inputs)
    assert out["semantic/condition"] is out["semantic/clip_txt"]
    assert_golden({"pretrain/condition": out["semantic/condition"]}, expected, METHOD, keys=["pretrain/condition"])


def test_semantic_loss_and_total_match(golden):
    decoder, _, inputs, expected, prov = golden
    loss = objective()
    assert loss.terms["semantic"].weight == prov["config"]["sem_loss_weight"]
    with torch.no_grad():
        total, parts, _ = loss(decoder, batch(inputs), 0.0)
    actual = {"loss/sem_loss": (loss.terms["semantic"].weight * parts["semantic"]).reshape(1),
              "loss/stand_in": parts["diffusion"].reshape(1), "loss/total": total.reshape(1)}
    assert_golden(actual, expected, METHOD, keys=list(actual))


def test_one_adamw_step_matches_the_released_optimizer(golden):
    decoder, _, inputs, expected, prov = golden
    decoder = decoder.double()
    opt = optimizer(decoder)
    before = {n: p.detach().clone() for n, p in decoder.named_parameters()}
    opt.zero_grad()
    total, _, _ = objective()(decoder, batch(inputs, torch.float64), 0.0)
    total.backward()
    lr = opt.param_groups[0]["lr"]
    assert all(g["lr"] == lr for g in opt.param_groups)
    opt.step()
    actual = {"step/lr": torch.tensor([lr], dtype=torch.float64), "step/total": total.detach().reshape(1)}
    for n, p in decoder.named_parameters():
        actual[f"step/update/{n}"] = (p.detach() - before[n]) / lr
    assert sorted(k for k in expected if k.startswith("step/update/")) == sorted(k for k in actual if k.startswith("step/update/"))
    assert_golden(actual, expected, METHOD, keys=[k for k in expected if k.startswith("step/")])
    decay = {n: g["weight_decay"] for g in opt.param_groups for p in g["params"]
             for n, q in decoder.named_parameters() if q is p}
    assert_golden({"groups/weight_decay": torch.tensor([decay[n] for n in sorted(decay)], dtype=torch.float64)},
                  expected, METHOD, atol=0.0, keys=["groups/weight_decay"])


def test_the_check_sees_one_weight_and_the_zero_initialised_branches(golden):
    """One weight of the extra branch's zero convolution moved by 1e-3 moves the conditioning (and
    only it) beyond the tolerance; zeroing the two zero-initialised convolutions (the released
    initialisation) moves the conditioning and the control map by O(1): the fixture checks them."""
    decoder, _, inputs, expected, _ = golden
    with torch.no_grad():
        decoder.semantic.extra_out.weight[3, 5, 1] += 1e-3
    with pytest.raises(AssertionError, match="semantic/condition") as moved:
        assert_golden(mapper_outputs(decoder, inputs), expected, METHOD,
                      keys=["semantic/condition", "semantic/clip_txt", "control/map"])
    assert "semantic/clip_txt" not in str(moved.value) and "control/map" not in str(moved.value)
    with torch.no_grad():
        for conv in (decoder.semantic.extra_out, decoder.control.out):
            conv.weight.zero_()
            conv.bias.zero_()
    out = mapper_outputs(decoder, inputs)
    assert torch.equal(out["semantic/condition"], out["semantic/clip_txt"]) and not out["control/map"].any()
    for key in ("semantic/condition", "control/map"):
        assert float((out[key] - expected[key]).abs().max()) > 0.1


def test_framework_default_groups_differ_from_the_released_ones(golden):
    """The released optimiser decays every parameter; the framework's default rule would exempt the
    biases and LayerNorm weights -- the recipe's ``optim.weight_decay_groups: all`` matters."""
    from braindecode_fw.lit import weight_decay_groups

    decoder, *_ = golden
    groups = weight_decay_groups(decoder, "adapters_and_matrices")
    assert groups[1]["params"]  # biases, LN weights: not decayed by the default rule
