"""Golden values for Brain-IT's Brain Interaction Transformer from the authors' released code.

Run OUTSIDE the project's environment, with the authors' checkout first on the path (it imports
their ``models.decoder_models``, ``utils.datasets``, ``utils.clip_loss``, ``utils.vgg_utils``; none
of their code is copied here)::

    python -m venv --system-site-packages /work/refenv-brainit
    /work/refenv-brainit/bin/pip install --no-deps torch-geometric==2.6.1
    git --git-dir=<mirror>/WeizmannVision+brainit-fmri/repo archive HEAD models utils | tar -x -C /work/ref/brainit
    PYTHONPATH=/work/ref/brainit:$PWD /work/refenv-brainit/bin/python \
        tests/fidelity/reference/make_brainit.py /work/ref/brainit

Tiny configuration: two subjects (30 and 20 voxels), 4 clusters (cluster 3 holds subject 1's voxels
only, so subject 2 meets an empty cluster), dim 8, 2 heads, 2 blocks; the semantic branch predicts
6 × 5 tokens (MSE), the low-level branch 18 × 5 tokens in three "scales" [8, 6, 4] of which
[3, 2, 2] are sampled (multi-scale InfoNCE, ``ClipLoss_MS(ClipLoss(reshape=True))``). Their
decoder runs with ``xformers=False`` (``Block``/``BlockCross``) and, as a check, with
``xformers=True`` through a plain-math stand-in for ``xformers.ops.memory_efficient_attention``
(their training default); both agree. float32, every dropout is 0 in their code; no voxel
subsampling (their validation path, ``sample=False``). One optimiser step: their
``optim.AdamW(model.parameters(), lr=5e-4)`` (weight decay 0.01 on every parameter) on each
branch's loss. Their schedule (``LambdaLR`` cubic warm-up stepped before each epoch, then
``ReduceLROnPlateau`` on the previous epoch's metric) is replayed for 40 epochs on a fixed metric
sequence.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import mirror_commit  # noqa: E402

SUBJECTS = {"s1": 30, "s2": 20}
K, DIM, HEADS, BLOCKS = 4, 8, 2, 2
SEM_TOKENS, OUT_DIM = 6, 5
SCALES, PER_SCALE = [8, 6, 4], [3, 2, 2]
BATCH = {"s1": 3, "s2": 2}
LR, WARMUP, PATIENCE, EPOCHS = 5e-4, 15, 5, 40
ENC_LAYERS, ENC_DIM, ENC_EMBED, ENC_IN, ENC_TOKENS = 2, 8, 8, 12, 9


def _stub_xformers() -> None:
    """A stand-in for ``xformers.ops.memory_efficient_attention`` ((B, N, H, D) layout)."""
    def memory_efficient_attention(q, k, v, scale=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, -1)
        return (attn @ v).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    sys.modules.update({"xformers": pkg, "xformers.ops": ops})


def their_state_to_ours(sd: dict[str, torch.Tensor], prefix: str, labels: dict[str, torch.Tensor]) -> dict:
    """Their ``Decoder`` state dict -> our ``BrainInteractionTransformer`` names under ``prefix``."""
    out = {}
    start = 0
    for s, n in SUBJECTS.items():
        out[f"voxels.embeddings.{s}"] = sd["voxel_embed"][start:start + n]
        out[f"labels_{s}"] = labels[s]
        start += n
    out["tokenizer.centers"] = sd["centers"]
    for theirs, ours in (("lin_query", "query"), ("lin_key", "key"), ("lin_value", "value"), ("lin_skip", "skip")):
        for p in ("weight", "bias"):
            out[f"tokenizer.{ours}.{p}"] = sd[f"conv_centers.{theirs}.{p}"]
    for p in ("weight", "bias"):
        out[f"tokenizer.norm.{p}"] = sd[f"norm_centers.{p}"]
        out[f"output.{p}"] = sd[f"proj.{p}"]
    out["queries"] = sd["pred_tokens"]

    def block(src: str, dst: str, attention: str, norm1: str, norm2: str) -> None:
        """One released transformer block (``attn.<attention>``, norms, projection, MLP)."""
        out[f"{dst}.{attention}.weight"] = sd[f"{src}.attn.{attention}.weight"]
        for p in ("weight", "bias"):
            out[f"{dst}.{norm1}.{p}"] = sd[f"{src}.norm1.{p}"]
            out[f"{dst}.{norm2}.{p}"] = sd[f"{src}.norm2.{p}"]
            out[f"{dst}.proj.{p}"] = sd[f"{src}.attn.proj.{p}"]
            out[f"{dst}.mlp.0.{p}"] = sd[f"{src}.mlp.fc1.{p}"]
            out[f"{dst}.mlp.2.{p}"] = sd[f"{src}.mlp.fc2.{p}"]

    block("block_crosses.0", "transformer.first", "kv", "norm_kv", "norm_mlp")
    for i in range(BLOCKS):
        block(f"block_crosses.{i + 1}", f"transformer.cross_blocks.{i}", "kv", "norm_kv", "norm_mlp")
        block(f"blocks.{i}", f"transformer.self_blocks.{i}", "qkv", "norm1", "norm2")
    return {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in out.items()}


def main(their_repo: str) -> None:
    sys.path.insert(0, their_repo)
    _stub_xformers()
    from models.decoder_models import Decoder, dec_param
    from utils.clip_loss import ClipLoss
    from utils.datasets import EmbedGraphDataset, collate
    from utils.vgg_utils import ClipLoss_MS

    # our sampler (the test's decoder draws the same indices from its seeded generator)
    from braindecode_fw.losses import sample_scale_tokens

    torch.manual_seed(0)
    np.random.seed(0)
    n_total = sum(SUBJECTS.values())
    # V2C clusters: every voxel one cluster; cluster 3 gets subject 1's voxels only
    labels_all = np.concatenate([np.arange(30) % 4, np.arange(20) % 3])
    counts = np.bincount(labels_all, minlength=K)
    mapping = -np.ones((K, counts.max()), dtype=int)  # their get_clusters.py layout, padded with -1
    for c in range(K):
        members = np.where(labels_all == c)[0]
        mapping[c, :len(members)] = members
    labels = {"s1": torch.tensor(labels_all[:30]), "s2": torch.tensor(labels_all[30:])}

    def make(out_tokens: int, xformers: bool) -> Decoder:
        p = dec_param(n_total)
        p.embed_dim_vox, p.num_centers, p.heads, p.num_blocks = DIM, K, HEADS, BLOCKS
        p.out_tokens, p.out_dim, p.xformers = out_tokens, OUT_DIM, xformers
        return Decoder(p)

    models = {"semantic": make(SEM_TOKENS, False), "lowlevel": make(sum(SCALES), False)}
    with torch.no_grad():  # non-trivial biases and norms, so every mapping is exercised
        for m in models.values():
            for name, t in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    t.add_(0.1 * torch.randn_like(t))
    weights = {}
    for b, m in models.items():
        weights.update(their_state_to_ours(m.state_dict(), f"branches.{b}.", labels))

    # inputs: one batch per subject (their collate stacks equal voxel counts), all voxels (sample=False)
    sub_counts = np.array(list(SUBJECTS.values()))
    inputs, expected = {}, {}
    index, scale = sample_scale_tokens(SCALES, PER_SCALE, generator=torch.Generator().manual_seed(0))
    sem_loss_fn = torch.nn.functional.mse_loss
    low_loss_fn = ClipLoss_MS(ClipLoss(reshape=True), sample_target_vec=PER_SCALE)
    batches = {}
    for si, (s, n) in enumerate(SUBJECTS.items()):
        bsz = BATCH[s]
        fmri = torch.randn(bsz, n)
        sem_y = torch.randn(bsz, SEM_TOKENS, OUT_DIM)
        low_y = torch.randn(bsz, sum(SCALES), OUT_DIM)
        inputs[f"{s}/responses"], inputs[f"{s}/clip_image_tokens"], inputs[f"{s}/vgg_tokens"] = fmri, sem_y, low_y
        ds = EmbedGraphDataset(fmri.numpy(), sem_y.numpy(), mapping, np.full(bsz, si), sub_num_voxels=sub_counts,
                               sample=False, num_centers=K)
        x, _, vox, edges = collate([ds[i] for i in range(bsz)], N_C=K)
        batches[s] = (x.float(), vox.int(), edges.int(), sem_y, low_y)
    inputs["lowlevel/index"], inputs["lowlevel/scale"] = index, scale

    def forward_all(tag: str) -> None:
        for s, (x, vox, edges, sem_y, low_y) in batches.items():
            captured = {}
            hooks = [m.norm_centers.register_forward_hook(lambda mod, i, o, b=b, c=captured: c.__setitem__(b, o))
                     for b, m in models.items()]
            sem = models["semantic"](x, vox, edges)
            low_full = models["lowlevel"](x, vox, edges)
            for h in hooks:
                h.remove()
            ids = index[None].expand(len(x), -1)
            low = models["lowlevel"](x, vox, edges, out_tokens_inds=ids)
            expected[f"{tag}{s}/semantic/brain_tokens"] = captured["semantic"].detach().clone()
            expected[f"{tag}{s}/lowlevel/brain_tokens"] = captured["lowlevel"].detach().clone()
            expected[f"{tag}{s}/semantic/pred"] = sem.detach().clone()
            expected[f"{tag}{s}/lowlevel/pred"] = low_full.detach().clone()
            expected[f"{tag}{s}/lowlevel/pred_sampled"] = low.detach().clone()
            ls = sem_loss_fn(sem.squeeze(), sem_y.squeeze())
            ll, _ = low_loss_fn(low.squeeze(), low_y[:, index].squeeze())
            expected[f"{tag}{s}/loss/semantic"] = ls.detach().clone()
            expected[f"{tag}{s}/loss/lowlevel"] = ll.detach().clone()
            expected[f"{tag}{s}/loss/total"] = (ls + ll).detach().clone()

    for m in models.values():
        m.train()  # no dropout anywhere in their decoder
    forward_all("")

    # their xformers path (the training default) gives the same outputs
    plain = dict(models)
    saved = dict(expected)
    for b in plain:
        models[b] = make(plain[b].param.out_tokens, True)
        models[b].load_state_dict(plain[b].state_dict())
    expected.clear()
    forward_all("")
    xf_diff = max(float((expected[k] - saved[k]).abs().max()) for k in saved)
    print("xformers path vs plain path: max |diff|", xf_diff)
    assert xf_diff < 1e-6
    expected.clear()
    expected.update(saved)

    # one optimiser step per branch on subject s1's batch: their AdamW(model.parameters(), lr)
    x, vox, edges, sem_y, low_y = batches["s1"]
    for b, m in plain.items():
        opt = torch.optim.AdamW(m.parameters(), lr=LR)
        if b == "semantic":
            loss = sem_loss_fn(m(x, vox, edges).squeeze(), sem_y.squeeze())
        else:
            loss, _ = low_loss_fn(m(x, vox, edges, out_tokens_inds=index[None].expand(len(x), -1)).squeeze(),
                                  low_y[:, index].squeeze())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k, v in their_state_to_ours(m.state_dict(), f"branches.{b}.", labels).items():
            if ".labels_" not in k:
                expected[f"step1/{k}"] = v

    # their schedule, replayed on a fixed validation-metric sequence
    metric = [1.0 - 0.01 * e if e < 22 else 0.78 for e in range(EPOCHS + 1)]
    model = make(1, False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=PATIENCE, mode="min", factor=0.1,
                                                         threshold=0.001, threshold_mode="abs")

    def warmup(epoch, start_lr=1e-3):
        return start_lr + (1 - start_lr) * ((float(epoch) / float(WARMUP)) ** 3) if epoch < WARMUP else 1

    lambda_lr = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    lrs = []
    for epoch in range(1, EPOCHS + 1):  # their loop: schedule, then train (lr recorded), then validate
        if epoch < WARMUP + 1:
            lambda_lr.step()
        else:
            plateau.step(metric[epoch - 1])
        lrs.append(opt.param_groups[0]["lr"])
    inputs["schedule/metric"] = torch.tensor(metric, dtype=torch.float64)
    expected["schedule/lr"] = torch.tensor(lrs, dtype=torch.float64)

    encoder_part(weights, inputs, expected)
    write(weights, inputs, expected, provenance(their_repo))


def encoder_part(weights: dict, inputs: dict, expected: dict) -> None:
    """Stage 0's universal encoder (their ``models.encoder_models.Encoder``) on a stand-in backbone:
    ``ENC_LAYERS`` identity blocks and an identity ``prepare_tokens_with_masks``, so each selected
    layer's tokens are the input tokens (class token, 4 register tokens that their code drops,
    ``ENC_TOKENS - 1`` patches). Their LoRA residuals start at zero (``lora_B`` zero-initialised) and
    are left out of the comparison (ours has none). Dropout 0.25: eval mode, also for the step."""
    from models.encoder_models import Encoder, encoder_param

    torch.manual_seed(1)
    backbone = torch.nn.Module()
    backbone.blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(ENC_LAYERS)])
    backbone.prepare_tokens_with_masks = lambda x: x
    p = encoder_param(sum(SUBJECTS.values()))
    p.inner_ch, p.embed_dim_vox, p.in_channels, p.in_spatial = ENC_DIM, ENC_EMBED, ENC_IN, ENC_TOKENS
    enc = Encoder(p, backbone, select_layers=list(range(1, ENC_LAYERS + 1)), r=7, alpha=0.01).eval()
    with torch.no_grad():
        for name, t in enc.named_parameters():
            if "norm" in name or name.endswith("bias"):
                t.add_(0.1 * torch.randn_like(t))
        enc.voxel_embed.mul_(100.0)  # sharper voxel attention than the released init gives
    bsz = 3
    tokens = torch.randn(bsz, ENC_TOKENS + 4, ENC_IN)
    subjects = ["s2", "s1", "s2"]
    local = torch.tensor([[0, 3, 1, 2], [5, 0, 2, 29], [2, 2, 1, 19]])
    starts = {"s1": 0, "s2": SUBJECTS["s1"]}
    glob = local + torch.tensor([starts[s] for s in subjects])[:, None]
    target = torch.randn(bsz, local.shape[1])
    inputs["encoder/tokens"], inputs["encoder/voxel_index"], inputs["encoder/target"] = tokens, local, target
    inputs["encoder/subject_is_s1"] = torch.tensor([s == "s1" for s in subjects])

    def ours(sd) -> dict:
        out = {"readout": sd["feat_embed"]}
        start = 0
        for s, n in SUBJECTS.items():
            out[f"voxel_embeddings.{s}"] = sd["voxel_embed"][start:start + n]
            start += n
        for i in range(ENC_LAYERS):
            out[f"layers.{i}.attn.pos"] = sd["pos_embed"]
            for pp in ("weight", "bias"):
                for theirs, mine in ((f"norm_in.{i}", "norm_in"), (f"in_project.{i}", "proj"),
                                     (f"map_att.{i}.project", "attn.query"), (f"map_att.{i}.project_x", "attn.key"),
                                     (f"norm.{i}", "norm_out"), (f"mlp.{i}.fc1", "mlp.0"), (f"mlp.{i}.fc2", "mlp.2")):
                    out[f"layers.{i}.{mine}.{pp}"] = sd[f"{theirs}.{pp}"]
        return {f"universal_encoder.{k}": v.detach().clone() for k, v in out.items()}

    weights.update(ours(enc.state_dict()))
    pred = enc(tokens, glob)
    loss = torch.nn.functional.mse_loss(pred, target) - 0.1 * torch.mean(
        torch.nn.functional.cosine_similarity(pred, target))
    expected["encoder/pred"], expected["encoder/loss"] = pred.detach().clone(), loss.detach().clone()
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3, amsgrad=True)  # train/train_encoder.py
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, v in ours(enc.state_dict()).items():
        expected[f"encoder_step1/{k}"] = v


def write(weights: dict, inputs: dict, expected: dict, prov: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(__file__).resolve().parents[1] / "golden" / "brainit"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in expected.items()}, folder / "expected.safetensors")
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print("wrote", folder, len(expected), "expected values")


def provenance(their_repo: str) -> dict:
    import torch_geometric

    mirror = "/work/.mirror/WeizmannVision+brainit-fmri/repo"
    commit = mirror_commit(mirror)
    return {
        "repository": "https://github.com/WeizmannVision/brainit-fmri",
        "commit": commit,
        "files": ["models/decoder_models.py", "models/layers_transformer.py", "utils/datasets.py",
                  "utils/clip_loss.py", "utils/vgg_utils.py", "train/train_decoder.py (optimiser, schedule)",
                  "models/encoder_models.py", "models/layers_encoder.py", "train/train_encoder.py + utils/train_utils_enc.py (loss, Adam)"],
        "packages": {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "dtype": "float32 (schedule: float64)",
        "command": "PYTHONPATH=/work/ref/brainit:$PWD /work/refenv-brainit/bin/python "
                   "tests/fidelity/reference/make_brainit.py /work/ref/brainit",
        "config": {"subjects": SUBJECTS, "clusters": K, "dim": DIM, "heads": HEADS, "blocks": BLOCKS,
                   "semantic_tokens": SEM_TOKENS, "out_dim": OUT_DIM, "scales": SCALES, "per_scale": PER_SCALE,
                   "batch": BATCH, "lr": LR, "weight_decay": 0.01, "warmup_epochs": WARMUP,
                   "patience": PATIENCE, "epochs": EPOCHS, "xformers": "False; True checked equal via a stand-in"},
    }


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/ref/brainit")
