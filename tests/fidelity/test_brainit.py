"""Brain-IT's BIT decoder against golden values from the authors' released code
(tests/fidelity/reference/make_brainit.py; tests/fidelity/golden/brainit/provenance.json).

Covered: the brain tokenizer (TransformerConv over the V2C edges, ReLU, LayerNorm), the semantic
and low-level predictions (all queries, and the sampled query subset), the MSE and multi-scale
InfoNCE losses and their sum (our ``braindecode_fw/conf/loss/brainit.yaml`` through ``TermsObjective``), one
AdamW step with the released settings (lr 5e-4, weight decay 0.01 on every parameter), and the
learning-rate schedule of ``braindecode_fw/conf/optim/adamw_warmup_plateau.yaml`` against the released loop's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from braindecode_fw.lit import weight_decay_groups
from tests.fidelity.golden import assert_golden, golden_dir, load_golden

pytest.importorskip("safetensors")
if not (golden_dir("brainit") / "expected.safetensors").is_file():
    pytest.skip("no Brain-IT golden fixture", allow_module_level=True)

from braindecode_fw.data.datamodule import Batch  # noqa: E402
from braindecode_fw.models.brainit import build_brainit_decoder  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "braindecode_fw" / "conf"


@pytest.fixture(scope="module")
def golden():
    return load_golden("brainit")


def build(prov: dict, weights: dict):
    cfg = prov["config"]
    targets = {"clip_image_tokens": (cfg["semantic_tokens"], cfg["out_dim"]),
               "vgg_tokens": (sum(cfg["scales"]), cfg["out_dim"])}
    branches = {"semantic": {"target": "clip_image_tokens"},
                "lowlevel": {"target": "vgg_tokens",
                             "token_sampling": {"scale_sizes": cfg["scales"], "per_scale": cfg["per_scale"]}}}
    model = build_brainit_decoder(cfg["subjects"], targets, branches=branches, dim=cfg["dim"], heads=cfg["heads"],
                                  depth=cfg["blocks"], n_clusters=cfg["clusters"], voxels_per_step=None, seed=0)
    model.load_state_dict({k: v for k, v in weights.items() if k.startswith("branches.")}, strict=True)
    return model


def objective():
    return instantiate(OmegaConf.load(CONF / "loss" / "brainit.yaml"))


def batch(inputs: dict, subject: str) -> Batch:
    responses = inputs[f"{subject}/responses"]
    return Batch(subject=[subject] * len(responses), responses=responses, image_index=torch.arange(len(responses)),
                 targets={"clip_image_tokens": inputs[f"{subject}/clip_image_tokens"],
                          "vgg_tokens": inputs[f"{subject}/vgg_tokens"]})


def test_forward_and_losses_match_the_released_decoder(golden):
    weights, inputs, expected, prov = golden
    model = build(prov, weights).eval()
    loss = objective()
    actual = {}
    for s in prov["config"]["subjects"]:
        b = batch(inputs, s)
        with torch.no_grad():
            for name, bit in model.branches.items():
                actual[f"{s}/{name}/brain_tokens"] = bit.brain_tokens(b.responses, b.subject)
            full = model(b.responses, b.subject)
            actual[f"{s}/semantic/pred"] = full["clip_image_tokens"]
            actual[f"{s}/lowlevel/pred"] = full["vgg_tokens"]
            model.generator.manual_seed(0)  # the reference drew its query subset from this seed
            total, parts, out = loss(model, b, 0.0)
        assert torch.equal(out["vgg_tokens/index"], inputs["lowlevel/index"])
        actual[f"{s}/lowlevel/pred_sampled"] = out["vgg_tokens"]
        actual[f"{s}/loss/semantic"], actual[f"{s}/loss/lowlevel"] = parts["semantic"], parts["lowlevel"]
        actual[f"{s}/loss/total"] = total
    assert_golden(actual, expected, "brainit", keys=[k for k in expected if not k.startswith(("step1/", "schedule/", "encoder"))])


def test_one_adamw_step_matches(golden):
    weights, inputs, expected, prov = golden
    model = build(prov, weights).train()
    optim = OmegaConf.load(CONF / "optim" / "adamw_warmup_plateau.yaml").optimizer
    assert (optim.lr, optim.weight_decay) == (prov["config"]["lr"], prov["config"]["weight_decay"])
    # the released script decays every parameter: optim.weight_decay_groups=all (experiment=brainit_nsd)
    nsd = OmegaConf.load(CONF / "experiment" / "brainit_nsd.yaml")
    assert nsd.optim.weight_decay_groups == "all"
    opt = instantiate(optim)(params=weight_decay_groups(model, nsd.optim.weight_decay_groups))
    assert not opt.param_groups[1]["params"]
    model.generator.manual_seed(0)
    total, _, _ = objective()(model, batch(inputs, "s1"), 0.0)
    opt.zero_grad()
    total.backward()
    opt.step()
    state = {f"step1/{k}": v for k, v in model.state_dict().items()}
    # the key bias adds the same q·b_k to every logit of a cluster, which the softmax cancels: its
    # gradient is zero up to rounding in both codes, and Adam turns that noise into steps of up to
    # ±lr. It is compared to the lr instead of to 1e-5.
    noisy = [k for k in expected if k.endswith("tokenizer.key.bias")]
    keys = [k for k in expected if k.startswith("step1/") and k not in noisy]
    assert keys and len(noisy) == 2
    assert_golden(state, expected, "brainit", keys=keys)
    assert_golden(state, expected, "brainit", keys=noisy, atol=2 * prov["config"]["lr"])


def test_schedule_matches_the_released_loop(golden):
    _, inputs, expected, prov = golden
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OmegaConf.load(CONF / "optim" / "adamw_warmup_plateau.yaml")
    opt = instantiate(cfg.optimizer)(params=[param])
    sched = instantiate(cfg.scheduler)(optimizer=opt)
    metric = inputs["schedule/metric"].tolist()
    lrs = []
    for epoch in range(1, prov["config"]["epochs"] + 1):  # Lightning: train epoch, validate, step
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(metric[epoch])
    assert_golden({"schedule/lr": torch.tensor(lrs, dtype=torch.float64)}, expected, "brainit",
                  atol=1e-12, keys=["schedule/lr"])


def test_universal_encoder_matches_the_released_encoder(golden):
    """Stage 0's encoder on a stand-in backbone (identity blocks; see make_brainit.py): forward,
    the MSE − 0.1·cos loss, and one Adam (amsgrad, lr 1e-3) step; eval mode (dropout off)."""
    from braindecode_fw.models.universal_encoder import (
        UniversalEncoder,
        UniversalEncoderConfig,
        encoder_loss,
    )

    weights, inputs, expected, prov = golden
    tokens = inputs["encoder/tokens"]
    n_layers, n_tokens = 2, tokens.shape[1] - 4
    cfg = UniversalEncoderConfig(in_dim=tokens.shape[2], n_layers=n_layers, n_tokens=n_tokens, dim=8, embed_dim=8)
    enc = UniversalEncoder(prov["config"]["subjects"], cfg).eval()
    prefix = "universal_encoder."
    enc.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    # their code drops the 4 register tokens after the class token; every stand-in layer gives the same tokens
    feats = torch.cat([tokens[:, :1], tokens[:, 5:]], 1)[:, None].expand(-1, n_layers, -1, -1)
    subjects = ["s1" if f else "s2" for f in inputs["encoder/subject_is_s1"].tolist()]
    pred = enc(feats, subjects, inputs["encoder/voxel_index"])
    loss = encoder_loss(pred, inputs["encoder/target"])
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3, amsgrad=True)
    opt.zero_grad()
    loss.backward()
    opt.step()
    actual = {"encoder/pred": pred, "encoder/loss": loss}
    actual.update({f"encoder_step1/{prefix}{k}": v for k, v in enc.state_dict().items()})
    # the key bias adds q·b to every logit of a voxel, which the softmax cancels (as in the
    # decoder's tokenizer): its gradient is rounding noise that Adam scales up to ±lr
    noisy = [k for k in expected if k.startswith("encoder_step1/") and k.endswith("attn.key.bias")]
    keys = [k for k in expected if k.startswith("encoder") and k not in noisy]
    assert len(noisy) == n_layers
    assert_golden(actual, expected, "brainit", keys=keys)
    assert_golden(actual, expected, "brainit", keys=noisy, atol=2e-3)
