"""Golden values for NeuroPictor's two fMRI -> diffusion mappers (Huo et al., ECCV 2024) from the
authors' released code.

Run OUTSIDE the project's environment, with a work tree of the authors' repository (only
``cldm/``, ``ldm/modules/diffusionmodules/util.py`` and ``models/finetune.yaml`` are read)::

    mkdir -p /work/ref/neuropictor
    git --git-dir=<mirror>/jingyanghuo+neuropictor/repo archive HEAD cldm ldm/modules/diffusionmodules/util.py \
        models | tar -x -C /work/ref/neuropictor
    OMP_NUM_THREADS=1 /work/refenv-npsttm/bin/python tests/fidelity/reference/make_neuropictor.py /work/ref/neuropictor

``cldm/cldm_fmri_surf.py`` imports the whole ``ldm`` tree, pretrained-metric networks and the
fMRI-PTE encoder at module level; none of it is needed here, so the file is not imported: the
class definitions ``FMRIToSemanticModel``, ``FMRIToControlModel`` and ``CLDM_for_FMRI`` are
executed on their own (:func:`released.execute_definitions`), with the two helpers they use,
``zero_module`` and ``conv_nd``, executed from ``ldm/modules/diffusionmodules/util.py``;
``CLDM_for_FMRI``'s base class ``LatentDiffusion`` is a stand-in that only provides
``get_input_gt`` (the ground-truth latents, here a fixed tensor). The pretraining file
``cldm/cldm_fmri_pret.py``'s ``FMRIToSemanticModel`` (the extra branch built but unused) is run too.
Nothing of their code is stored here.

What runs of theirs: both mappers' ``forward``; ``CLDM_for_FMRI.get_input`` (the fMRI encoder a
stand-in returning fixed tokens, the OpenCLIP text encoder a stand-in returning fixed final-layer
tokens), which forms the conditioning, the control input and ``sem_loss = sem_loss_weight · MSE``;
``CLDM_for_FMRI.configure_optimizers`` (one AdamW group over the mappers' parameters, every
parameter decayed) with ``learning_rate``, ``weight_decay`` and ``sem_loss_weight`` read from their
``models/finetune.yaml`` (1e-4, 0.01, 0.1). ``L_simple`` needs SD 2.1's UNet and the ControlNet
(not run here); a fixed stand-in takes its place in the step's total loss, ``MSE(conditioning,
A) + MSE(control map, C)`` with fixed ``A``, ``C``, so that every mapper parameter gets a gradient,
and the total is formed as their ``p_losses`` does (``l_simple_weight · L_simple + sem_loss``,
``l_simple_weight = 1``).

Tiny configuration: 17 fMRI tokens of width 8 (their semantic mapper's middle width is
``fmri_seq_len // 2`` = 8, the control mapper's ``2 · fmri_seq_len`` = 34); 77 text tokens (hard-coded in
the released semantic mapper) of width 8; control map 4 × 3 × 3; batch 2. Every weight is
:func:`tests.fidelity.patterned.patterned` of its name in OUR naming (seed 0) -- the released
zero-initialised convolutions (``extra_clip_out``, ``out``) included, so the branches behind them
contribute -- and is stored. Inputs: ``torch.Generator().manual_seed(0)``. No dropout in these
modules. Forward and losses in float32; the AdamW step in float64 (both modules cast), because the
step is compared as the update divided by the learning rate (≈ −sign(g) − wd·p): in float32 a
1-ulp difference of a parameter after a 1e-4 step would read as ~1e-3 there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import StandInModule, execute_definitions, mirror_commit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the project root: tests.fidelity.patterned
from tests.fidelity.patterned import patterned  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "golden" / "neuropictor"
MIRROR = "/work/.mirror/jingyanghuo+neuropictor/repo"
N_TOKENS, DIM, TEXT_TOKENS, TEXT_DIM, CHANNELS, SIZE, BATCH = 17, 8, 77, 8, 4, 3, 2

# their parameter-name prefixes -> ours (NeuroPictorDecoder's semantic / control mappers)
SEMANTIC = {"channel_mapper.0": "main.tokens.0", "channel_mapper.1": "main.tokens.1", "dim_mapper": "main.linear",
            "norm": "main.norm", "extra_clip.0": "extra.tokens.0", "extra_clip.1": "extra.tokens.1",
            "extra_clip.2": "extra.linear", "extra_clip.3": "extra.norm", "extra_clip_out": "extra_out"}
CONTROL = {"channel_mapper.0": "tokens.0", "channel_mapper.1": "tokens.1", "dim_mapper.0": "linear", "out": "out"}


def our_name(part: str, their: str) -> str:
    prefix, _, leaf = their.rpartition(".")
    table = SEMANTIC if part == "semantic" else CONTROL
    return f"{part}.{table[prefix]}.{leaf}"


class _LatentDiffusion:
    """Stands in for ldm's ``LatentDiffusion`` (the base of ``CLDM_for_FMRI``): ``get_input_gt``
    returns the batch's fixed ground-truth latents."""

    def get_input_gt(self, batch, k, *args, **kwargs):
        return batch[k]


class _Encoder(nn.Module):
    """Stands in for the fMRI-PTE encoder: ``encode_feats`` returns the batch's fixed tokens."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens

    def encode_feats(self, fmri):
        return self.tokens


class _TextEncoder:
    """Stands in for the frozen OpenCLIP text encoder: final-layer tokens of the batch's captions."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def encode_text_final(self, text):
        return self.tokens


class _Float64(nn.Module):
    """Runs ``inner`` (cast to float64) on float64 inputs: ``get_input`` casts the encoder's tokens
    to float32 (exact here: they are float32 values), this casts them back."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


def released_namespace(src: Path, file: str) -> dict:
    ns = {"torch": torch, "th": torch, "nn": nn, "F": F, "LatentDiffusion": _LatentDiffusion,
          "instantiate_from_config": StandInModule("ldm.util").instantiate_from_config}
    execute_definitions((src / "ldm/modules/diffusionmodules/util.py").read_text(), {"zero_module", "conv_nd"}, ns)
    return execute_definitions((src / file).read_text(),
                               {"FMRIToSemanticModel", "FMRIToControlModel", "CLDM_for_FMRI"}, ns)


def load_patterned(module: nn.Module, part: str, weights: dict[str, torch.Tensor]) -> None:
    state = {}
    for name, p in module.state_dict().items():
        ours = our_name(part, name)
        weights[ours] = patterned(ours, p.shape)
        state[name] = weights[ours]
    module.load_state_dict(state, strict=True)


def cldm(ns: dict, semantic: nn.Module, control: nn.Module, tokens, text_tokens, recipe) -> object:
    """A ``CLDM_for_FMRI`` without its ``__init__`` (which loads SD, the fMRI-PTE checkpoint and the
    metric networks): the attributes ``get_input`` and ``configure_optimizers`` read."""
    model = ns["CLDM_for_FMRI"].__new__(ns["CLDM_for_FMRI"])
    model.control_key, model.first_stage_key, model.cond_stage_key = "fmri", "jpg", "txt"
    model.device, model.mask, model.mask_rate = "cpu", False, 0.0
    model.sem_loss_weight = float(recipe.model.params.sem_loss_weight)
    model.learning_rate, model.weight_decay = float(recipe.train.learning_rate), float(recipe.train.weight_decay)
    model.fmri_encoder = _Encoder(tokens)
    model.cond_stage = semantic
    model.cond_stage_model = _TextEncoder(text_tokens)
    model.control_model = nn.Module()
    model.control_model.fmri_mapper = control  # the ControlNet holds the control mapper (ControlNet.fmri_mapper)
    return model


def losses(model, batch, stand_in: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their ``get_input`` (conditioning, control input, sem_loss), the control mapper on the
    control input (``ControlNet.forward``'s ``fmri_mapper(hint)``), the stand-in ``L_simple`` and
    the total as their ``p_losses`` forms it."""
    _, cond = model.get_input(batch, model.first_stage_key)
    condition = torch.cat(cond["c_crossattn"], 1)  # as their apply_model
    control = model.control_model.fmri_mapper(torch.cat(cond["c_concat"], 1))
    clip_txt = model.cond_stage(model.fmri_encoder.encode_feats(None).float())[1]
    l_simple = F.mse_loss(condition, stand_in["condition"]) + F.mse_loss(control, stand_in["control"])
    total = 1.0 * l_simple + cond["sem_loss"]  # their p_losses: l_simple_weight · loss_simple + sem_loss
    return {"condition": condition, "clip_txt": clip_txt, "control": control, "sem_loss": cond["sem_loss"],
            "stand_in": l_simple, "total": total}


def main(src: Path) -> None:
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(src / "models" / "finetune.yaml")
    ns = released_namespace(src, "cldm/cldm_fmri_surf.py")
    pretrain = released_namespace(src, "cldm/cldm_fmri_pret.py")
    semantic = ns["FMRIToSemanticModel"](cond_dim=TEXT_DIM, fmri_seq_len=N_TOKENS, fmri_latent_dim=DIM)
    control = ns["FMRIToControlModel"](fmri_seq_len=N_TOKENS, fmri_latent_dim=DIM, out_channel=CHANNELS, out_dim=SIZE)
    # the released zero convolutions really are zero before the patterned weights go in
    assert not semantic.extra_clip_out.weight.any() and not control.out.weight.any()
    weights: dict[str, torch.Tensor] = {}
    load_patterned(semantic, "semantic", weights)
    load_patterned(control, "control", weights)

    gen = torch.Generator().manual_seed(0)
    inputs = {"tokens": torch.randn(BATCH, N_TOKENS, DIM, generator=gen),
              "clip_text_tokens": torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=gen),
              "stand_in/condition": torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=gen),
              "stand_in/control": torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)}
    stand_in = {"condition": inputs["stand_in/condition"], "control": inputs["stand_in/control"]}
    # the surface maps and images are not read (the encoder and get_input_gt are stand-ins)
    batch = {"fmri": torch.zeros(BATCH), "jpg": torch.zeros(BATCH, 4, 2, 2), "txt": [""] * BATCH}

    # 1. forward and losses, float32
    model = cldm(ns, semantic, control, inputs["tokens"], inputs["clip_text_tokens"], recipe)
    with torch.no_grad():
        out = losses(model, batch, stand_in)
        condition, clip_txt = semantic(inputs["tokens"])
        assert torch.equal(condition, out["condition"]) and torch.equal(clip_txt, out["clip_txt"])
        pre = pretrain["FMRIToSemanticModel"](cond_dim=TEXT_DIM, fmri_seq_len=N_TOKENS, fmri_latent_dim=DIM)
        pre.load_state_dict(semantic.state_dict(), strict=True)  # built alike; its extra branch is unused
        pre_condition, pre_clip_txt = pre(inputs["tokens"])
        assert pre_condition is pre_clip_txt  # the pretraining model conditions on clip_txt itself
    expected = {"semantic/condition": out["condition"], "semantic/clip_txt": out["clip_txt"],
                "control/map": out["control"], "pretrain/condition": pre_condition,
                "loss/sem_loss": out["sem_loss"].reshape(1),
                "loss/stand_in": out["stand_in"].reshape(1), "loss/total": out["total"].reshape(1)}

    # 2. one AdamW step (their configure_optimizers), float64
    sem64, ctl64 = _Float64(semantic.double()), _Float64(control.double())
    model64 = cldm(ns, sem64, ctl64, inputs["tokens"].double(), inputs["clip_text_tokens"].double(), recipe)
    opt = model64.configure_optimizers()
    assert len(opt.param_groups) == 1
    names = {id(p): our_name("semantic", n.removeprefix("inner.")) for n, p in sem64.named_parameters()}
    names.update({id(p): our_name("control", n.removeprefix("inner.")) for n, p in ctl64.named_parameters()})
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    opt.zero_grad()
    out64 = losses(model64, batch, {k: v.double() for k, v in stand_in.items()})
    out64["total"].backward()
    for g in opt.param_groups:
        for p in g["params"]:  # every parameter is reached (the zero branches too, thanks to the patterned weights)
            assert p.grad is not None and p.grad.abs().min() > 0, names[id(p)]
    lr = opt.param_groups[0]["lr"]
    opt.step()
    expected["step/lr"] = torch.tensor([lr], dtype=torch.float64)
    expected["step/total"] = out64["total"].detach().reshape(1)
    for g in opt.param_groups:
        for p in g["params"]:
            expected[f"step/update/{names[id(p)]}"] = ((p.detach() - before[id(p)]) / lr).float()
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    expected["groups/weight_decay"] = torch.tensor([decay[n] for n in sorted(decay)], dtype=torch.float64)
    write(weights, inputs, expected, provenance(recipe))


def write(weights: dict, inputs: dict, expected: dict, prov: dict) -> None:
    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(weights.items())}, OUT / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, OUT / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    (OUT / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print("wrote", OUT, len(expected), "expected values")


def provenance(recipe) -> dict:
    return {
        "repository": "https://github.com/jingyanghuo/neuropictor",
        "commit": mirror_commit(MIRROR),
        "files": ["cldm/cldm_fmri_surf.py (FMRIToSemanticModel, FMRIToControlModel, CLDM_for_FMRI.get_input, "
                  "configure_optimizers)", "cldm/cldm_fmri_pret.py (FMRIToSemanticModel)",
                  "ldm/modules/diffusionmodules/util.py (zero_module, conv_nd)",
                  "models/finetune.yaml (learning_rate, weight_decay, sem_loss_weight)"],
        "packages": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "dtype": "forward and losses float32; the AdamW step float64 (update / lr stored as float32)",
        "command": "OMP_NUM_THREADS=1 /work/refenv-npsttm/bin/python tests/fidelity/reference/make_neuropictor.py "
                   "/work/ref/neuropictor",
        "weights": "tests/fidelity/patterned.py:patterned(name, shape), seed 0, every parameter (ours' names), "
                   "the released zero-initialised convolutions included",
        "l_simple": "stand-in: MSE(conditioning, inputs['stand_in/condition']) + MSE(control map, "
                    "inputs['stand_in/control']) (SD 2.1's UNet + ControlNet not run)",
        "config": {"n_tokens": N_TOKENS, "dim": DIM, "text_tokens": TEXT_TOKENS, "text_dim": TEXT_DIM,
                   "control_channels": CHANNELS, "control_size": SIZE, "batch": BATCH,
                   "semantic_mid_tokens": N_TOKENS // 2, "control_mid_tokens": 2 * N_TOKENS,
                   "lr": float(recipe.train.learning_rate), "weight_decay": float(recipe.train.weight_decay),
                   "sem_loss_weight": float(recipe.model.params.sem_loss_weight)},
    }


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/ref/neuropictor"))
