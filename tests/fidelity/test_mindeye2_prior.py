"""Golden values: MindEye2's diffusion prior (denoiser, nulls, guidance, loss, one AdamW step,
half-precision LayerNorm, 20-step samples) equals the released code (MindEye2's models.py on
dalle2-pytorch 1.15.6) at identical weights; fixture made by
tests/fidelity/reference/make_mindeye2_prior.py (provenance.json)."""

from __future__ import annotations

import pytest
import torch

from braindecode_fw.lit import weight_decay_groups
from braindecode_fw.models.prior import DiffusionPrior, GainLayerNorm
from tests.fidelity.golden import assert_golden, load_golden

DIM, TOKENS, DEPTH, HEADS, DIM_HEAD, SEED = 16, 4, 2, 2, 8, 7


@pytest.fixture(scope="module")
def golden():
    return load_golden("mindeye2_prior")


class _FixedDenoiser(torch.nn.Module):
    """x̂0 = tanh(0.9 x + 0.5 brain) + 0.01 t (the reference script's), to test the sampler alone."""

    def forward(self, brain, noised, t, drop_brain=None, drop_image=None):
        return torch.tanh(0.9 * noised + 0.5 * brain) + 0.01 * t.float()[:, None, None]


def _prior(weights, **options) -> DiffusionPrior:
    prior = DiffusionPrior(DIM, TOKENS, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, timesteps=100,
                           cond_drop_prob=0.2, sample_steps=20, eta=1.0, **options)
    missing, unexpected = prior.load_state_dict({k: v for k, v in weights.items() if k.startswith("net.")},
                                                strict=False)
    assert not missing and not unexpected
    return prior.eval()


def _ours(golden, **options) -> dict[str, torch.Tensor]:
    weights, inputs = golden[0], golden[1]
    prior = _prior(weights, **options)
    brain, target, noised, noise, t = (inputs[k] for k in ("brain", "target", "noised", "noise", "times"))
    everything = torch.ones(len(brain), dtype=torch.bool)
    out = {}
    with torch.no_grad():
        out["denoiser"] = prior.net(brain, noised, t)
        out["denoiser_nulls"] = prior.net(brain, noised, t, everything, everything)
        prior.cond_scale = 3.0
        out["denoiser_guided"] = prior.predict_x0(brain, noised, t)
        prior.cond_scale = 1.0
        out["q_sample"] = prior.q_sample(target, t, noise)
        prior.cond_drop_prob = 0.0
        out["loss"] = prior.loss(brain, target, t, noise)
        prior.cond_drop_prob = 1.0  # eval mode: the released validation loss keeps the dropout
        out["loss_condition_dropped"] = prior.loss(brain, target, t, noise)
        prior.cond_drop_prob = 0.2
        norm = GainLayerNorm(DIM)
        norm.gain.copy_(weights["layernorm.gain"])
        out["layernorm_bf16"] = norm(inputs["small_variance_rows"]).float()
        out["layernorm_float32"] = norm(inputs["small_variance_rows"].float())
        for key, eta in (("sample_eta1", 1.0), ("sample_eta0", 0.0)):
            prior.eta = eta
            out[key] = prior.sample(brain, generator=torch.Generator().manual_seed(SEED))
        network, prior.net = prior.net, _FixedDenoiser()
        for key, eta in (("sampler_eta1", 1.0), ("sampler_eta0", 0.0)):
            prior.eta = eta
            out[key] = prior.sample(brain, generator=torch.Generator().manual_seed(SEED))
        prior.net = network
    prior.eta, prior.cond_drop_prob = 1.0, 0.0
    optimizer = torch.optim.AdamW(weight_decay_groups(prior, "mindeye2"), lr=3e-4, weight_decay=1e-2)
    prior.loss(brain, target, t, noise).backward()
    optimizer.step()
    for name, p in prior.named_parameters():
        out[f"step/{name}"] = p.detach()
    return out


# Samples through the full network: 19 steps amplify the denoiser's float32 rounding (~1e-6; the
# late steps multiply it by 1/√(1/ᾱ - 1) ≈ 22 at t = 4) to ~3e-5, so they are compared at 1e-4;
# the sampler itself (around a fixed denoiser) and every single-step part at 1e-5.
END_TO_END = ("sample_eta1", "sample_eta0")


def test_prior_equals_released(golden):
    ours, expected = _ours(golden), golden[2]
    assert_golden(ours, expected, "mindeye2_prior", keys=[k for k in expected if k not in END_TO_END])
    assert_golden(ours, expected, "mindeye2_prior", atol=1e-4, keys=list(END_TO_END))


def test_released_schedule_visits_94_to_4():
    prior = DiffusionPrior(DIM, TOKENS, depth=1, heads=HEADS, dim_head=DIM_HEAD)
    assert prior.sample_times() == [94, 89, 84, 79, 74, 69, 64, 59, 54, 49, 44, 39, 34, 29, 24, 19, 14, 9, 4, -1]
    prior.sampler = "uniform_ddim"
    assert prior.sample_times()[:3] == [99, 94, 89] and len(prior.sample_times()) == 21
    prior.sampler, prior.sample_steps = "as_released", 100  # dalle2's DDPM chain over every step
    assert prior.sample_times() == list(range(99, -2, -1))


def test_our_options_are_measurably_different(golden):
    """The options that restore this project's former behaviour move exactly the parts they name."""
    expected = golden[2]
    ours = _ours(golden, sampler="uniform_ddim", cond_drop_in_eval=False, guidance_null="brain",
                 half_precision_eps=None)
    for name in ("sample_eta1", "sample_eta0", "sampler_eta1", "sampler_eta0", "loss_condition_dropped",
                 "denoiser_guided"):
        assert (ours[name] - expected[name]).abs().max() > 1e-3, name
    assert torch.equal(ours["denoiser"], _ours(golden)["denoiser"])
    norm = GainLayerNorm(DIM, half_precision_eps=None)  # eps 1e-5 whatever the dtype
    with torch.no_grad():
        norm.gain.copy_(golden[0]["layernorm.gain"])
        moved = norm(golden[1]["small_variance_rows"]).float() - expected["layernorm_bf16"]
    assert moved.abs().max() > 1e-2


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sampler", "ddpm", r"model.prior.sampler: one of \['as_released', 'uniform_ddim'\], got 'ddpm'"),
    ("guidance_null", "image", r"model.prior.guidance_null: one of \['brain_and_image', 'brain'\], got 'image'"),
    ("sample_steps", 101, r"model.prior.sample_steps: between 1 and timesteps \(100\), got 101"),
])
def test_bad_sampler_options_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        DiffusionPrior(DIM, TOKENS, depth=1, heads=HEADS, dim_head=DIM_HEAD, **{key: value})
