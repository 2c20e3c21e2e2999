"""Golden values for MindEye2's trunk, heads, losses and one AdamW step, from the released code.

Run outside the project's test suite, with MindEye2's released ``src/`` (MedARC-AI/MindEyeV2) on
disk::

    python tests/fidelity/reference/make_mindeye2.py /path/to/MindEyeV2/src

It imports the released ``models.py`` (``BrainNetwork``), takes ``RidgeRegression`` from
``Train.ipynb`` and ``soft_clip_loss``/``mixco_nce`` from ``utils.py`` by executing those
definitions at run time (nothing of them is stored here), builds a tiny configuration with a fixed
seed and writes ``tests/fidelity/golden/mindeye2/``: the weights in this project's names, the
inputs, and the released code's outputs (eval mode: dropout off), losses and parameters after one
AdamW step with ``Train.ipynb``'s parameter groups. Imports ``models.py`` needs only for other
classes (OpenAI ``clip``, dalle2-pytorch, ``utils``'s data helpers) are stand-ins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import StandInModule, execute_definitions  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "golden" / "mindeye2"
SUBJECTS = {"subj_a": 20, "subj_b": 30}
HIDDEN, N_BLOCKS, TOKENS, WIDTH = 32, 2, 4, 16
TEMPERATURE_SOFTCLIP, TEMPERATURE_MIXCO = 0.005, 0.006


def _stub_imports() -> None:
    import diffusers.models.autoencoders.vae as vae

    sys.modules.setdefault("diffusers.models.vae", vae)  # diffusers >= 0.28 moved it
    for name in ("clip", "utils", "dalle2_pytorch", "dalle2_pytorch.dalle2_pytorch", "dalle2_pytorch.train_configs"):
        sys.modules[name] = StandInModule(name)


def main(src: Path) -> None:
    _stub_imports()
    sys.path.insert(0, str(src))
    import models  # the released models.py

    ns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    execute_definitions((src / "utils.py").read_text(), {"soft_clip_loss", "mixco_nce"}, ns)
    cells = ["".join(c["source"]) for c in json.loads((src / "Train.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    execute_definitions(next(c for c in cells if "class RidgeRegression" in c), {"RidgeRegression"}, ns)

    torch.manual_seed(0)
    ridge = ns["RidgeRegression"](list(SUBJECTS.values()), out_features=HIDDEN)
    backbone = models.BrainNetwork(h=HIDDEN, in_dim=HIDDEN, seq_len=1, n_blocks=N_BLOCKS, clip_size=WIDTH,
                                   out_dim=TOKENS * WIDTH, blurry_recon=False, clip_scale=1)
    for p in backbone.parameters():  # non-trivial norms and biases
        p.data.add_(0.1 * torch.randn_like(p))
    voxels = {s: torch.randn(3, n) for s, n in SUBJECTS.items()}
    target = torch.randn(6, TOKENS, WIDTH)
    perm, betas = torch.tensor([1, 0, 2, 5, 3, 4]), torch.tensor([0.3, 1.0, 0.8, 1.0, 0.05, 0.6])
    select = betas < 1

    def forward():
        ridge_out = torch.cat([ridge(voxels[s][:, None], i) for i, s in enumerate(SUBJECTS)])  # (6, 1, h)
        tokens, clip_voxels, _ = backbone(ridge_out)
        return ridge_out[:, 0], tokens, clip_voxels

    ridge.eval(), backbone.eval()
    ridge_out, tokens, clip_voxels = forward()
    # the trunk's output: what backbone_linear reads (recovered by solving its linear map)
    trunk = torch.linalg.lstsq(backbone.backbone_linear.weight, (tokens.flatten(1) - backbone.backbone_linear.bias).T).solution.T
    norm = torch.nn.functional.normalize
    p_flat, t_flat = norm(clip_voxels.flatten(1), dim=-1), norm(target.flatten(1), dim=-1)
    softclip = ns["soft_clip_loss"](p_flat, t_flat, temp=TEMPERATURE_SOFTCLIP)
    bimixco = ns["mixco_nce"](p_flat, t_flat, temp=TEMPERATURE_MIXCO, perm=perm, betas=betas, select=select)
    expected = {"adapter": ridge_out, "trunk": trunk, "backbone": tokens, "clip_voxels": clip_voxels,
                "loss/softclip": softclip, "loss/bimixco": bimixco}
    grads = torch.autograd.grad(softclip, [p for b in backbone.mixer_blocks1 for p in b.parameters()])
    expected["grad_norm/mixer_blocks1"] = torch.stack([g.norm() for g in grads]).norm()

    # one AdamW step on the SoftCLIP loss, Train.ipynb's groups (lr 3e-4, weight decay 0.01)
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [{"params": list(ridge.parameters()), "weight_decay": 1e-2},
              {"params": [p for n, p in backbone.named_parameters() if not any(nd in n for nd in no_decay)],
               "weight_decay": 1e-2},
              {"params": [p for n, p in backbone.named_parameters() if any(nd in n for nd in no_decay)],
               "weight_decay": 0.0}]
    weights = {**_our_names(ridge, backbone)}
    optimizer = torch.optim.AdamW(groups, lr=3e-4)
    for _ in range(2):  # two steps: the second moves by the (decayed) AdamW update, not by sign(g) alone
        optimizer.zero_grad()
        _, _, cv = forward()
        ns["soft_clip_loss"](norm(cv.flatten(1), dim=-1), t_flat, temp=TEMPERATURE_SOFTCLIP).backward()
        optimizer.step()
    expected.update({f"step2/{k}": v for k, v in _our_names(ridge, backbone).items()})

    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, OUT / "weights.safetensors")
    save_file({**{f"voxels/{s}": v for s, v in voxels.items()}, "target": target, "perm": perm, "betas": betas},
              OUT / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    import diffusers

    (OUT / "provenance.json").write_text(json.dumps({
        "repository": "MedARC-AI/MindEyeV2", "commit": "c1847188200e075b960ad6b87333e51ea17be1b1",
        "files": ["src/models.py (BrainNetwork)", "src/Train.ipynb (RidgeRegression, parameter groups)",
                  "src/utils.py (soft_clip_loss, mixco_nce)"],
        "command": "python tests/fidelity/reference/make_mindeye2.py <MindEyeV2>/src",
        "config": {"subjects": SUBJECTS, "hidden": HIDDEN, "n_blocks": N_BLOCKS, "seq_len": 1, "tokens": TOKENS,
                   "width": WIDTH, "blurry_recon": False, "mode": "eval (dropout off)", "dtype": "float32",
                   "softclip_temperature": TEMPERATURE_SOFTCLIP, "mixco_temperature": TEMPERATURE_MIXCO,
                   "optimizer": "AdamW lr 3e-4, weight decay 0.01, Train.ipynb groups, 2 steps on SoftCLIP"},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]},
        "note": "The low-level branch (blin1/bupsampler/b_maps_projector) is fixed at 28x28x4 / 49x512 in the released "
                "code, too large for a fixture; it is off here.",
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


def _our_names(ridge, backbone) -> dict[str, torch.Tensor]:
    """The released parameters under this project's TokenDecoder names."""
    out = {}
    for i, s in enumerate(SUBJECTS):
        out[f"adapter.linears.{s}.weight"] = ridge.linears[i].weight.detach().clone()
        out[f"adapter.linears.{s}.bias"] = ridge.linears[i].bias.detach().clone()
    for name, p in backbone.named_parameters():
        if name.startswith("mixer_blocks"):
            ours = f"encoder.{name}"
        elif name.startswith("backbone_linear."):
            ours = name.replace("backbone_linear.", "heads.tokens.")
        elif name.startswith("clip_proj."):
            ours = name.replace("clip_proj.", "heads.projector.net.")
        else:
            raise KeyError(name)
        out[ours] = p.detach().clone()
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]))
