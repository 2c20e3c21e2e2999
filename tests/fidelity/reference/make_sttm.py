"""Golden values for STTM (Liu et al., AAAI 2025) from the authors' released code.

Run OUTSIDE the project's environment, with the authors' checkout first on the path (it imports
their ``model.CrossBrain_Decoding_torch_decoder_global_constra``, ``model.utils`` and the training
script's ``configure_optimizers``; none of their code is copied here)::

    python -m venv --system-site-packages /work/refenv-npsttm
    git --git-dir=<mirror>/YulongBonjour+STTM/repo archive HEAD | tar -x -C /work/ref/sttm
    PYTHONPATH=/work/ref/sttm:$PWD OMP_NUM_THREADS=1 /work/refenv-npsttm/bin/python \
        tests/fidelity/reference/make_sttm.py /work/ref/sttm

Their modules import packages the computed parts never call (pandas, webdataset, braceexpand,
kornia, resize_right, x_clip, coca_pytorch); empty stand-ins are registered for those.

Tiny configuration, as far as the released code lets one shrink it: two subjects (12 and 10
voxels), hidden 16, 1 adapter block, 2 shared blocks, token_dim 4. Hard-coded in the released code
and kept: 257 tokens, q/k/v 768 with 8 heads, token width 768 (``clip_size``, which the prior's
``view(..., 768)`` fixes), projector 768 -> 2048 -> 2048 -> 768, prior d_model 768 with 12 heads.
The prior's ``nn.TransformerDecoder`` is built with depth 1 and feed-forward 64 (their
``decoder(...)`` helper called with those two arguments changed). The weights are too large to
store: every tensor is :func:`tests.fidelity.patterned.patterned` of its name in OUR naming,
loaded into their modules through the name map below; the small ones are stored too.

float32; every module in eval mode (dropout off) and the prior's condition dropout set to 0
(``text_cond_drop_prob = image_cond_drop_prob = 0``, what ours does outside training), brain-token
dropping off (``is_train=False``). Randomness aligned by construction: the prior loss's timesteps
and noise are drawn after ``torch.manual_seed(PRIOR_SEED)`` on both sides; BiMixCo's permutation
and β (drawn by their ``utils.mixco``) are recorded and fed to ours; the random loss weights
``softmax(randn(2))`` are the ones our objective's generator (seed 0) draws after its MixCo
selection draw, replayed here. One optimiser step: their ``configure_optimizers`` (AdamW, their
four parameter groups, OneCycleLR max_lr 3e-4, pct_start 2/50, final_div 1000) on the BiMixCo-phase
total loss. The sampler: their ``p_sample_loop_ddpm`` (100-step DDPM) from a seeded generator.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import mirror_commit  # noqa: E402

SUBJECTS = {"s1": 12, "s2": 10}
THEIR_ID = {"s1": 1, "s2": 2}
HIDDEN, TOKEN_DIM, ADAPTER_BLOCKS, SHARED_BLOCKS = 16, 4, 1, 2
PRIOR_DEPTH, PRIOR_FF, TIMESTEPS = 1, 64, 100
BATCH = {"s1": 4, "s2": 3}
PRIOR_SEED, SAMPLE_SEED, SAMPLE_ROWS = 1234, 7, 2
SOFTCLIP_EPOCH = 5  # index into their cosine-annealed temperatures (epoch 17 + 5 of 50)
LR, EPOCHS, PER_GPU_BATCH = 3e-4, 50, 16
LR_STEPS = [0, 1, 10, 100, 553, 554, 1108, 5000, 15000, 27699]
STORED_MAX = 4096  # tensors up to this many elements are stored verbatim as well
N_TOKENS, WIDTH = 257, 768


def _stub_imports() -> None:
    """Empty stand-ins for import-time-only dependencies of their modules."""
    names = {"pandas": {}, "webdataset": {}, "braceexpand": {}, "kornia": {}, "kornia.filters": {"gaussian_blur2d": None},
             "resize_right": {"resize": None}, "x_clip": {"CLIP": object}, "coca_pytorch": {"CoCa": object}}
    for name, attrs in names.items():
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo probes specs
            for k, v in attrs.items():
                setattr(mod, k, v)
            sys.modules[name] = mod
    sys.modules["kornia"].filters = sys.modules["kornia.filters"]


def our_to_theirs(name: str) -> str:
    """One of our ``TokenDecoder`` parameter names -> the released ``BrainDiffusionPrior``'s (the
    q/k/v rows of our fused ``qkv`` are handled by the caller)."""
    parts = name.split(".")
    if parts[0] == "adapter":  # adapter.mlps.<s>.<i>...
        s, i, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        head = f"head{THEIR_ID[s]}"
        if i < 4:
            return f"voxel2clip.input_proj.{head}.{i}.{rest}"
        return f"voxel2clip.input_res_block.{head}.{i - 4}.{rest}"
    if parts[0] == "encoder":  # encoder.blocks.<i>.<j>...
        return f"voxel2clip.mlp.{'.'.join(parts[2:])}"
    if parts[:2] == ["heads", "projector"]:
        return f"voxel2clip.projector.{'.'.join(parts[3:])}"
    if parts[:2] == ["heads", "tokens"]:
        sub, rest = parts[2], ".".join(parts[3:])
        table = {"to_tokens": "voxel2clip.hidd2token", "attention_norm": "voxel2clip.token_attention.layer_norm",
                 "attention_out": "voxel2clip.token_attention.attention.projection"}
        if sub in table:
            return f"{table[sub]}.{rest}"
        if sub == "widen":  # LN, Linear, LN, GELU, Dropout, Linear
            i, leaf = int(parts[3]), parts[4]
            if i == 0:
                return f"voxel2clip.token_attention.qkv_layer_norm.{leaf}"
            return f"voxel2clip.token_attention.out_proj.{ {1: 0, 2: 1, 5: 4}[i] }.{leaf}"
    if parts[:2] == ["prior", "net"]:
        sub, rest = parts[2], ".".join(parts[3:])
        table = {"image_pos": "net.learned_query", "brain_pos": "net.learned_query_brain",
                 "null_brain": "net.null_brain_embeds", "null_image": "net.null_image_embed"}
        if sub in table:
            return table[sub]
        if sub == "time_mlp":  # Linear, SiLU, Linear, SiLU, Linear = dalle2 MLP(dim, dim)
            i, leaf = int(parts[3]), parts[4]
            return f"net.to_time_embeds.0.1.net.{ {0: '0.0', 2: '1.0', 4: '2'}[i] }.{leaf}"
        if sub == "decoder":
            return f"net.causal_transformer.{rest}"
    raise KeyError(f"no released counterpart for {name}")


def load_into_theirs(theirs: torch.nn.Module, ours: dict[str, torch.Tensor]) -> None:
    mapped = {}
    for name, value in ours.items():
        if name.startswith("heads.tokens.qkv."):
            leaf = name.rpartition(".")[2]
            for proj, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                mapped[f"voxel2clip.token_attention.attention.{proj}.{leaf}"] = chunk
        else:
            mapped[our_to_theirs(name)] = value
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k in dict(theirs.named_parameters())]
    if missing or unexpected:
        raise RuntimeError(f"name map incomplete: missing {missing}, unexpected {unexpected}")


def our_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of our decoder at the tiny configuration (built with our code)."""
    from tests.fidelity.test_sttm import build_ours

    return {k: tuple(v.shape) for k, v in build_ours().state_dict().items()}


def main(their_repo: str) -> None:
    from tests.fidelity.patterned import patterned, patterned_state, summary

    sys.path.insert(0, their_repo)
    _stub_imports()
    import model.CrossBrain_Decoding_torch_decoder_global_constra as net_mod
    import Train_CrossBrain_Decoding_global_contras as train_mod

    released_decoder = net_mod.decoder
    net_mod.decoder = lambda **kw: released_decoder(**{**kw, "depth": PRIOR_DEPTH, "dim_feedforward": PRIOR_FF})
    torch.manual_seed(0)
    voxel2clip = net_mod.CrossBrainNetwork(
        voxel_num_dict={THEIR_ID[s]: n for s, n in SUBJECTS.items()}, clip_size=WIDTH, token_dim=TOKEN_DIM,
        h=HIDDEN, n_blocks=SHARED_BLOCKS, norm_type="ln", act_first=False, use_token_attention=True,
        input_n_blocks=ADAPTER_BLOCKS)
    prior_network = net_mod.VersatileDiffusionPriorNetwork(dim=WIDTH, depth=6, dim_head=64, heads=WIDTH // 64,
                                                           causal=False, num_tokens=N_TOKENS,
                                                           learned_query_mode="pos_emb")
    model = net_mod.BrainDiffusionPrior(net=prior_network, image_embed_dim=WIDTH, condition_on_text_encodings=False,
                                        timesteps=TIMESTEPS, cond_drop_prob=0.2, image_embed_scale=None,
                                        voxel2clip=voxel2clip)
    shapes = our_shapes()
    weights_all = patterned_state(shapes)
    load_into_theirs(model, weights_all)
    their_names = {id(p): n for n, p in model.named_parameters()}
    n_theirs, n_ours = sum(p.numel() for p in model.parameters()), sum(int(np.prod(s)) for s in shapes.values())
    assert n_theirs == n_ours, (n_theirs, n_ours)
    model.eval()
    # what ours does outside training: no classifier-free condition dropout
    model.text_cond_drop_prob = model.image_cond_drop_prob = 0.0

    inputs, expected = {}, {}
    gen = torch.Generator().manual_seed(0)
    for s, n in SUBJECTS.items():
        inputs[f"{s}/responses"] = torch.randn(BATCH[s], n, generator=gen)
        inputs[f"{s}/clip_text"] = torch.randn(BATCH[s], WIDTH, generator=gen)
    tokens = {s: patterned(f"inputs/{s}/clip_image_tokens", (BATCH[s], N_TOKENS, WIDTH)) / WIDTH ** 0.5
              for s in SUBJECTS}

    # 1. forward, per part
    with torch.no_grad():
        for s in SUBJECTS:
            x = inputs[f"{s}/responses"]
            adapter = voxel2clip.get_subject_proj(x.clone(), THEIR_ID[s])
            expected[f"{s}/adapter"] = adapter
            expected[f"{s}/encoder"] = voxel2clip.get_backbone_out(x.clone(), THEIR_ID[s])
            backbone, projected = voxel2clip(x.clone(), THEIR_ID[s])
            expected.update(summary(f"{s}/backbone", backbone))
            expected.update(summary(f"{s}/projected", projected))
            # prior: x0 prediction and its MSE at seeded timesteps/noise (their forward_ori)
            torch.manual_seed(PRIOR_SEED)
            loss, pred = model.forward_ori(text_embed=backbone, image_embed=tokens[s], is_train=False)
            expected[f"{s}/prior/loss"] = loss.reshape(1)
            expected.update(summary(f"{s}/prior/pred", pred))

    # 2. the BiMixCo-phase loss (subject s1) and one AdamW step with their groups and schedule
    s = "s1"
    recorded = {}
    released_mixco = net_mod.utils.mixco

    def recording_mixco(voxels, *args, **kwargs):
        out = released_mixco(voxels, *args, **kwargs)
        recorded.update(perm=out[1].clone(), betas=out[2].clone(), select=out[3].clone())
        return out

    net_mod.utils.mixco = recording_mixco
    released_loss_prior = model.loss_prior

    def seeded_loss_prior(*args, **kwargs):
        torch.manual_seed(PRIOR_SEED)
        return released_loss_prior(*args, **kwargs)

    model.loss_prior = seeded_loss_prior
    # our objective's generator (seed 0): one uniform draw per row (MixCo selection), then randn(2)
    g = torch.Generator().manual_seed(0)
    torch.rand(BATCH[s], generator=g)
    batch_weight = torch.softmax(torch.randn(2, generator=g), 0)
    args = types.SimpleNamespace(num_epochs=EPOCHS, batch_size=PER_GPU_BATCH)
    optimizer, scheduler = train_mod.configure_optimizers(args=args, diffusion_prior=model, max_lr=LR)
    lrs = []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    torch.manual_seed(99)
    nce, g_img, g_txt, prior = model(voxel=inputs[f"{s}/responses"].clone(), image_embed=tokens[s].clone(), mix_up=True,
                                     subject_id=THEIR_ID[s], use_cross_sub_loss=False,
                                     global_text_emb=inputs[f"{s}/clip_text"].clone(), inference_mode=False,
                                     only_loss_prior=False, is_train=False)
    contrast = nce + 0.5 * g_img + 0.5 * g_txt
    total = batch_weight[0] * contrast + batch_weight[1] * 30 * prior
    total.backward()
    lr0 = optimizer.param_groups[0]["lr"]
    optimizer.step()
    inputs["mixco/perm"], inputs["mixco/beta"] = recorded["perm"], torch.where(recorded["select"], recorded["betas"],
                                                                               torch.ones_like(recorded["betas"]))
    inputs["mixco/batch_weight"] = batch_weight
    for k, v in {"tokens": nce, "global_image": g_img, "global_text": g_txt, "prior": prior, "total": total}.items():
        expected[f"mixco/loss/{k}"] = v.detach().reshape(1)
    expected["step1/lr"] = torch.tensor([lr0], dtype=torch.float64)
    ours_of = {}
    for n in shapes:
        if n.startswith("heads.tokens.qkv."):
            continue
        ours_of[our_to_theirs(n)] = n
    for tn, p in model.named_parameters():
        delta = (p.detach() - before[tn]) / lr0
        if tn.startswith("voxel2clip.token_attention.attention.") and tn.split(".")[-2] in "qkv":
            on = f"heads.tokens.qkv.{tn.split('.')[-1]}/{tn.split('.')[-2]}"
        else:
            on = ours_of[tn]
        # the update divided by the lr: ≈ sign(grad) − wd·p, of order 1 (a bare difference of
        # ~1e-5 would hide under the tolerance)
        expected[f"step1_update/{on}"] = delta.reshape(-1)[:64].contiguous()
    decay = {id(p): grp["weight_decay"] for grp in optimizer.param_groups for p in grp["params"]}
    names = sorted(their_names.values())
    expected["groups/weight_decay"] = torch.tensor([decay[id(dict(model.named_parameters())[n])] for n in names])
    sched_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(sched_opt, max_lr=LR,
                                                total_steps=int(EPOCHS * (8859 // PER_GPU_BATCH + 1)),
                                                final_div_factor=1000, last_epoch=-1, pct_start=2 / EPOCHS)
    del scheduler
    for step in range(LR_STEPS[-1] + 1):
        if step in LR_STEPS:
            lrs.append(sched_opt.param_groups[0]["lr"])
        sched_opt.step()
        sched.step()
    expected["schedule/lr"] = torch.tensor(lrs, dtype=torch.float64)
    first_stage = int(0.35 * EPOCHS)
    temps = net_mod.utils.cosine_anneal(0.004, 0.006, EPOCHS - first_stage)
    expected["schedule/temperature"] = torch.tensor([0.006] * first_stage + temps.tolist(), dtype=torch.float64)
    net_mod.utils.mixco = released_mixco

    # 3. the SoftCLIP phase at one of their annealed temperatures (forward only)
    model.load_state_dict({n: p for n, p in before.items()}, strict=False)
    with torch.no_grad():
        tau = float(temps[SOFTCLIP_EPOCH])
        prior2, nce2, g_img2, g_txt2 = model(voxel=inputs[f"{s}/responses"].clone(), image_embed=tokens[s].clone(),
                                             mix_up=False, subject_id=THEIR_ID[s],
                                             global_text_emb=inputs[f"{s}/clip_text"].clone(), inference_mode=False,
                                             epoch_temp=tau, only_loss_prior=False, is_train=False)
    inputs["softclip/temperature"] = torch.tensor([tau], dtype=torch.float64)
    for k, v in {"tokens": nce2, "global_image": g_img2, "global_text": g_txt2, "prior": prior2}.items():
        expected[f"softclip/loss/{k}"] = v.reshape(1)

    # 4. the sampler: 100-step DDPM from a seeded generator (their loop returns the scaled embedding)
    with torch.no_grad():
        backbone, _ = voxel2clip(inputs["s2/responses"][:SAMPLE_ROWS].clone(), THEIR_ID["s2"])
        sample = model.p_sample_loop_ddpm(backbone.shape, text_cond={"text_embed": backbone}, cond_scale=1.0,
                                          generator=torch.Generator().manual_seed(SAMPLE_SEED))
    expected.update(summary("sample", sample))

    weights = {k: v for k, v in weights_all.items() if v.numel() <= STORED_MAX}
    write(weights, inputs, expected, provenance(their_repo, sorted(weights_all)))


def write(weights: dict, inputs: dict, expected: dict, prov: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(__file__).resolve().parents[1] / "golden" / "sttm"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, folder / "expected.safetensors")
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print("wrote", folder, len(expected), "expected values")


def provenance(their_repo: str, all_weights: list[str]) -> dict:
    mirror = "/work/.mirror/YulongBonjour+STTM/repo"
    commit = mirror_commit(mirror)
    return {
        "repository": "https://github.com/YulongBonjour/STTM",
        "commit": commit,
        "files": ["model/CrossBrain_Decoding_torch_decoder_global_constra.py", "model/attention.py",
                  "model/dalle2_pytorch.py", "model/utils.py",
                  "Train_CrossBrain_Decoding_global_contras.py (configure_optimizers, loss weighting)"],
        "packages": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "dtype": "float32 (lr schedule float64)",
        "command": "PYTHONPATH=/work/ref/sttm:$PWD OMP_NUM_THREADS=1 /work/refenv-npsttm/bin/python "
                   "tests/fidelity/reference/make_sttm.py /work/ref/sttm",
        "weights": "tests/fidelity/patterned.py:patterned(name, shape) for every parameter (ours' names); "
                   f"those with <= {STORED_MAX} elements also stored",
        "all_weights": all_weights,
        "config": {"subjects": SUBJECTS, "hidden": HIDDEN, "token_dim": TOKEN_DIM, "adapter_blocks": ADAPTER_BLOCKS,
                   "shared_blocks": SHARED_BLOCKS, "prior_depth": PRIOR_DEPTH, "prior_ff": PRIOR_FF,
                   "timesteps": TIMESTEPS, "batch": BATCH, "prior_seed": PRIOR_SEED, "sample_seed": SAMPLE_SEED,
                   "sample_rows": SAMPLE_ROWS, "lr": LR, "weight_decay": 0.01, "epochs": EPOCHS,
                   "per_gpu_batch": PER_GPU_BATCH, "lr_steps": LR_STEPS, "softclip_epoch": SOFTCLIP_EPOCH},
    }


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/ref/sttm")

