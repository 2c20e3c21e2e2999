"""Golden values for MindBridge's model, losses and optimiser steps, from the released code.

Run outside the project's test suite, with MindBridge's released ``src/`` (littlepure2333/MindBridge)
on disk::

    python tests/fidelity/reference/make_mindbridge.py /path/to/MindBridge/src

It imports the released ``models.py`` (``MindBridge``, ``MindSingle``), ``trainer.py``
(``Trainer``'s optimiser groups, OneCycle schedule and ``train_step``, i.e. how the total loss is
formed) and ``utils.py`` (``soft_clip_loss``), and takes ``pool_voxels`` from ``data.py`` by
executing that one definition at run time (nothing of them is stored here). Imports the model and
the training step do not need (OpenAI ``clip``, ``torchsnooper``, ``wandb``, ``data``'s kornia
augmentations, diffusers' VAE decoder) are stand-ins; the CLIP extractor is a stand-in that returns
fixed token tensors.

Tiny configuration, fixed seed, eval mode (every dropout off: ``train_step`` is called directly,
so the model stays in eval mode), float32. ``adapting=True`` fixes the cycle pair as released
(source = first subject of the batch, target = last), so both sides compute the same pair. Writes
``tests/fidelity/golden/mindbridge/``: the weights in this project's names, the inputs, and the
released code's outputs, loss terms and parameters after two ``train_step`` calls (AdamW, the
trainer's parameter groups, its OneCycle schedule) for the two-subject ``MindBridge`` and the
single-subject ``MindSingle``.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import StandInModule, execute_definitions  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "golden" / "mindbridge"
SUBJECTS = {"subj01": 20, "subj02": 30}   # ours -> voxel count; the released ids are 1, 2
IDS = {"subj01": 1, "subj02": 2}
POOL, HIDDEN, BOTTLENECK, N_BLOCKS, BATCH = 16, 12, 4, 2, 4
IMAGE_TOKENS, TEXT_TOKENS = (3, 8), (2, 8)
MSE_MULT, REC_MULT, CYC_MULT = 1e4, 1.0, 1.0
# large enough that one AdamW step (and its weight decay) moves parameters by far more than 1e-5
MAX_LR, NUM_EPOCHS, NUM_BATCHES = 0.5, 10, 3


def _stub_imports() -> None:
    try:
        import diffusers.models.autoencoders.vae as vae

        sys.modules.setdefault("diffusers.models.vae", vae)  # diffusers >= 0.28 moved it
    except ImportError:
        sys.modules["diffusers"] = StandInModule("diffusers")
        sys.modules["diffusers.models"] = StandInModule("diffusers.models")
        sys.modules["diffusers.models.vae"] = StandInModule("diffusers.models.vae")
    for name in ("clip", "torchsnooper", "wandb", "data"):
        sys.modules[name] = StandInModule(name)


class _FixedClip:
    """Stands in for the released ``Clipper``: ``embed_image``/``embed_text`` return the fixed
    target tokens of the rows being trained (the "images" and "captions" passed are row indices)."""

    def __init__(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor):
        self.image_tokens, self.text_tokens = image_tokens, text_tokens

    def embed_image(self, rows):
        return self.image_tokens[rows]

    def embed_text(self, rows):
        return self.text_tokens[torch.as_tensor(rows)]


class _Accelerator:
    """The single-process accelerate object the trainer sees (no DeepSpeed plugin)."""

    state = types.SimpleNamespace(deepspeed_plugin=None)

    @staticmethod
    def backward(loss):
        loss.backward()


def _trainer(trainer_cls, model, clip_extractor, rec_mult: float, cyc_mult: float):
    """A released trainer without its data/checkpoint set-up: the model, stand-in CLIP, its own
    ``prepare_optimizer``/``prepare_scheduler`` and the counters ``train_step`` accumulates."""
    t = trainer_cls.__new__(trainer_cls)
    t.args = types.SimpleNamespace(use_image_aug=False, mse_mult=MSE_MULT, rec_mult=rec_mult, cyc_mult=cyc_mult,
                                   max_lr=MAX_LR, num_epochs=NUM_EPOCHS, lr_scheduler_type="cycle")
    t.voxel2clip, t.clip_extractor, t.accelerator, t.device = model, clip_extractor, _Accelerator(), "cpu"
    t.num_batches, t.num_devices = NUM_BATCHES, 1
    t.prepare_optimizer()
    t.prepare_scheduler()
    t.losses, t.lrs = [], []
    for name in ("sims_image", "sims_text", "fwd_percent_correct", "bwd_percent_correct", "loss_clip_image_sum",
                 "loss_clip_text_sum", "loss_mse_image_sum", "loss_mse_text_sum", "loss_rec_sum", "loss_cyc_sum"):
        setattr(t, name, 0.0)
    return t


def _step_terms(t) -> dict[str, float]:
    """The loss terms ``train_step`` just computed (it keeps running sums; read them and reset)."""
    terms = {"image_softclip": t.loss_clip_image_sum, "image_mse": t.loss_mse_image_sum,
             "text_softclip": t.loss_clip_text_sum, "text_mse": t.loss_mse_text_sum,
             "reconstruction": t.loss_rec_sum, "cycle": t.loss_cyc_sum, "total": t.losses[-1]}
    for name in ("loss_clip_image_sum", "loss_clip_text_sum", "loss_mse_image_sum", "loss_mse_text_sum",
                 "loss_rec_sum", "loss_cyc_sum"):
        setattr(t, name, 0.0)
    return terms


def _perturb(model: nn.Module) -> None:
    """Non-trivial weights: the LoRA-style adapters start as the identity (up-projection zero),
    which would leave their down-projections without gradient; norms get non-unit gains."""
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))


def main(src: Path) -> None:
    _stub_imports()
    sys.path.insert(0, str(src))
    import models  # the released models.py
    import trainer  # the released trainer.py

    ns = execute_definitions((src / "data.py").read_text(), {"pool_voxels"},
                      {"torch": torch, "nn": nn, "F": nn.functional})
    torch.manual_seed(0)
    raw = {s: torch.randn(BATCH, n) for s, n in SUBJECTS.items()}
    pooled = {s: ns["pool_voxels"](v, POOL, "max") for s, v in raw.items()}  # the released loader's pooling
    n_rows = BATCH * len(SUBJECTS)
    image_tokens, text_tokens = torch.randn(n_rows, *IMAGE_TOKENS), torch.randn(n_rows, *TEXT_TOKENS)
    clip_extractor = _FixedClip(image_tokens, text_tokens)
    dims = {"in_dim": POOL, "out_dim_image": IMAGE_TOKENS[0] * IMAGE_TOKENS[1],
            "out_dim_text": TEXT_TOKENS[0] * TEXT_TOKENS[1], "h": HIDDEN, "n_blocks": N_BLOCKS}

    # ---- two subjects: MindBridge --------------------------------------------------------------
    bridge = models.MindBridge(**dims, subj_list=list(IDS.values()), adapting=True)
    for module in bridge.modules():  # the released adapters' bottleneck is fixed at 128
        if isinstance(module, models.Adapter_Layer):
            module.down_proj, module.up_proj = nn.Linear(POOL, BOTTLENECK), nn.Linear(BOTTLENECK, POOL)
    _perturb(bridge)
    bridge.eval()
    weights = _our_names(bridge)
    order = list(SUBJECTS)
    voxel = torch.cat([pooled[s] for s in order])
    subj_id = torch.tensor([IDS[s] for s in order])
    expected: dict[str, torch.Tensor] = {f"pooled/{s}": v for s, v in pooled.items()}
    captured = {}
    hook = bridge.translator.register_forward_hook(
        lambda m, args, out: captured.update(embedding=args[0].detach().clone(), translator=out.detach().clone()))
    with torch.no_grad():
        image, text, rec, cyc = bridge((voxel, subj_id))
        hook.remove()  # the translator's input and output of this (subject order) forward only
        # the other direction: the released cycle runs first subject -> last subject of the batch
        reverse = list(reversed(order))
        _, _, _, cyc_reverse = bridge((torch.cat([pooled[s] for s in reverse]),
                                       torch.tensor([IDS[s] for s in reverse])))
    for i, s in enumerate(order):
        expected[f"embedding/{s}"] = captured["embedding"][i * BATCH:(i + 1) * BATCH]
    expected.update({"translator": captured["translator"], "head/clip_image_tokens": image,
                     "head/clip_text_tokens": text, "reconstruction": rec,
                     f"cycle/{order[0]}->{order[1]}": cyc, f"cycle/{order[1]}->{order[0]}": cyc_reverse})

    t = _trainer(trainer.Trainer_bridge, bridge, clip_extractor, REC_MULT, CYC_MULT)
    rows = torch.arange(n_rows)
    for step in (1, 2):
        t.train_step(voxel, rows, rows.tolist(), subj_id)
        expected.update({f"loss{step}/{k}": torch.tensor(v, dtype=torch.float64) for k, v in _step_terms(t).items()})
        expected[f"lr{step}"] = torch.tensor(t.lrs[-1], dtype=torch.float64)
        expected.update({f"step{step}/{k}": v for k, v in _our_names(bridge).items()})

    # ---- one subject: MindSingle (no builder; the single-subject recipe has rec/cyc weight 0) ---
    single = models.MindSingle(**dims, subj_list=[IDS["subj01"]])
    for module in single.modules():
        if isinstance(module, models.Adapter_Layer):
            module.down_proj, module.up_proj = nn.Linear(POOL, BOTTLENECK), nn.Linear(BOTTLENECK, POOL)
    _perturb(single)
    single.eval()
    single_weights = _our_names(single)
    with torch.no_grad():
        s_image, s_text = single(pooled["subj01"])
    expected.update({"single/head/clip_image_tokens": s_image, "single/head/clip_text_tokens": s_text})
    ts = _trainer(trainer.Trainer_single, single, _FixedClip(image_tokens[:BATCH], text_tokens[:BATCH]), 0.0, 0.0)
    srows = torch.arange(BATCH)
    ts.train_step(pooled["subj01"], srows, srows.tolist(), torch.tensor([IDS["subj01"]]))
    expected.update({f"single/loss1/{k}": torch.tensor(v, dtype=torch.float64) for k, v in _step_terms(ts).items()})
    expected.update({f"single/step1/{k}": v for k, v in _our_names(single).items()})

    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({**weights, **{f"single/{k}": v for k, v in single_weights.items()}}, OUT / "weights.safetensors")
    save_file({**{f"voxels/{s}": v for s, v in raw.items()}, "clip_image_tokens": image_tokens,
               "clip_text_tokens": text_tokens}, OUT / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    (OUT / "provenance.json").write_text(json.dumps({
        "repository": "littlepure2333/MindBridge", "commit": "2a3943ff5b619db6f85f16a5e7ff1331d25def55",
        "files": ["src/models.py (MindBridge, MindSingle, Adapter_Layer, ResMLP)",
                  "src/trainer.py (Trainer.prepare_optimizer, prepare_scheduler, train_step; Trainer_bridge, "
                  "Trainer_single)",
                  "src/utils.py (soft_clip_loss)", "src/data.py (pool_voxels)"],
        "command": "python tests/fidelity/reference/make_mindbridge.py <MindBridge>/src",
        "config": {"subjects": SUBJECTS, "released_ids": IDS, "pool": POOL, "pool_type": "max", "hidden": HIDDEN,
                   "bottleneck": BOTTLENECK, "n_blocks": N_BLOCKS, "batch_per_subject": BATCH,
                   "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "mse_mult": MSE_MULT,
                   "rec_mult": REC_MULT, "cyc_mult": CYC_MULT, "softclip_temperature": 0.005,
                   "max_lr": MAX_LR, "num_epochs": NUM_EPOCHS, "num_batches": NUM_BATCHES,
                   "lr_scheduler_type": "cycle", "weight_decay": 0.01,
                   "adapting": True, "mode": "eval (dropout off)", "dtype": "float32",
                   "optimizer": "the released Trainer.prepare_optimizer (AdamW, no decay for names with "
                                "'bias'/'Norm'/'temperature') and prepare_scheduler (OneCycleLR, final_div 100, "
                                "pct_start 2/num_epochs); two train_step calls (bridge), one (single)"},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "note": "The released Adapter_Layer's bottleneck is fixed at 128; its two linears are replaced by "
                "bottleneck-4 ones (same module, same forward) to keep the fixture small. Weights are the "
                "released init plus 0.1 * N(0, 1). DeepSpeed's gradient clipping (main.py: 1.0) is applied by "
                "the DeepSpeed engine outside train_step and is not part of these steps.",
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


def _our_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The released parameters under this project's BridgeDecoder names."""
    by_id = {str(v): k for k, v in IDS.items()}
    sub = {"0.down_proj": "0.down", "0.up_proj": "0.up", "3.down_proj": "3.down", "3.up_proj": "3.up"}
    out = {}
    for name, p in model.named_parameters():
        part, *rest = name.split(".")
        if part in ("embedder", "builder"):
            subject, inner = by_id[rest[0]], ".".join(rest[1:])
            for old, new in sub.items():
                inner = inner.replace(old, new)
            ours = (f"adapter.embedders.{subject}.{inner}" if part == "embedder"
                    else f"builder.builders.{subject}.{inner}")
        elif part == "translator":  # translator.mlp.<i>.<j>
            ours = "encoder.blocks." + ".".join(rest[1:])
        elif part == "head_image":
            ours = "heads.clip_image_tokens.linear." + rest[0]
        elif part == "head_text":
            ours = "heads.clip_text_tokens.linear." + rest[0]
        else:
            raise KeyError(f"unmapped released parameter {name}")
        out[ours] = p.detach().clone()
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]))
