"""Golden values for MindEye2's diffusion prior, from the released code.

Run outside the project's test suite, with MindEye2's released ``src/`` (MedARC-AI/MindEyeV2) and
the unpacked dalle2-pytorch 1.15.6 wheel (the version MindEye2's ``setup.sh`` installed) on disk,
in an environment with that wheel's import-time packages (einops 0.7, rotary-embedding-torch 0.5.3,
kornia 0.7.1, beartype)::

    pip download --no-deps dalle2-pytorch==1.15.6 && unzip dalle2_pytorch-1.15.6-*.whl -d dalle2
    python tests/fidelity/reference/make_mindeye2_prior.py /path/to/MindEyeV2/src dalle2

It loads dalle2-pytorch's ``dalle2_pytorch.py`` and executes the released ``BrainDiffusionPrior``,
``PriorNetwork`` and ``FlaggedCausalTransformer`` definitions of ``models.py`` at run time (nothing
of them is stored here), builds ``Train.ipynb``'s prior at a tiny size with a fixed seed and writes
``tests/fidelity/golden/mindeye2_prior/``: the weights in this project's names, the inputs, and the
released code's denoiser outputs (with and without the learned nulls, with guidance), the training
loss at fixed times and noise (with the condition dropout off and at 1, in eval mode as the released
validation computes it), the parameters after one AdamW step, and ``p_sample_loop`` samples (20 of
100 steps, eta 1 and 0, as ``recon_inference.ipynb`` calls it) from a fixed seed. Packages the wheel
imports only for other models (x-clip, coca-pytorch, resize-right, its tokenizer and VQGAN) are
stand-ins.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import StandInModule, execute_definitions  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "golden" / "mindeye2_prior"
DIM, TOKENS, DEPTH, HEADS, DIM_HEAD, TIMESTEPS = 16, 4, 2, 2, 8, 100
BATCH, SEED = 3, 7


class _FixedDenoiser(torch.nn.Module):
    """x̂0 = tanh(0.9 x + 0.5 brain) + 0.01 t: the same closed form as the golden test's."""

    self_cond = False

    def forward_with_cond_scale(self, image_embed, times, *, cond_scale=1.0, text_embed=None, **_):
        return torch.tanh(0.9 * image_embed + 0.5 * text_embed) + 0.01 * times.float()[:, None, None]


def _load_dalle2(wheel_dir: Path) -> types.ModuleType:
    package = types.ModuleType("dalle2_pytorch")
    package.__path__ = [str(wheel_dir / "dalle2_pytorch")]
    sys.modules["dalle2_pytorch"] = package
    for name in ("dalle2_pytorch.tokenizer", "dalle2_pytorch.vqgan_vae", "x_clip", "coca_pytorch", "resize_right"):
        sys.modules[name] = StandInModule(name)
    module = importlib.import_module("dalle2_pytorch.dalle2_pytorch")
    package.DiffusionPrior = module.DiffusionPrior
    return module


def _our_names(prior) -> dict[str, torch.Tensor]:
    """The released prior's parameters under this project's ``DiffusionPrior`` names."""
    fixed = {
        "net.learned_query": "net.image_pos",
        "net.null_brain_embeds": "net.null_brain",
        "net.null_image_embed": "net.null_image",
        "net.to_time_embeds.0.1.net.0.0.weight": "net.time_mlp.0.weight",
        "net.to_time_embeds.0.1.net.0.0.bias": "net.time_mlp.0.bias",
        "net.to_time_embeds.0.1.net.1.0.weight": "net.time_mlp.2.weight",
        "net.to_time_embeds.0.1.net.1.0.bias": "net.time_mlp.2.bias",
        "net.to_time_embeds.0.1.net.2.weight": "net.time_mlp.4.weight",
        "net.to_time_embeds.0.1.net.2.bias": "net.time_mlp.4.bias",
        "net.causal_transformer.rel_pos_bias.relative_attention_bias.weight": "net.rel_pos.embedding.weight",
        "net.causal_transformer.norm.g": "net.final_norm.gain",
        "net.causal_transformer.project_out.weight": "net.project_out.weight",
    }
    per_layer = {
        "0.null_kv": "0.null_kv", "0.norm.g": "0.norm.gain", "0.to_q.weight": "0.to_q.weight",
        "0.to_kv.weight": "0.to_kv.weight", "0.to_out.0.weight": "0.to_out.0.weight",
        "0.to_out.1.g": "0.to_out.1.gain", "1.0.g": "1.norm.gain", "1.1.weight": "1.proj_in.weight",
        "1.5.weight": "1.proj_out.weight",
    }
    out = {}
    for name, p in prior.named_parameters():
        if name.endswith("rotary_emb.freqs"):  # fixed frequencies (not trained), computed by ours
            continue
        if name in fixed:
            ours = fixed[name]
        else:
            head, _, rest = name.partition("net.causal_transformer.layers.")
            index, _, part = rest.partition(".")
            if head or part not in per_layer:
                raise KeyError(f"unmapped released parameter {name}")
            ours = f"net.layers.{index}.{per_layer[part]}"
        out[ours] = p.detach().clone().contiguous()
    return out


def main(src: Path, wheel_dir: Path) -> None:
    dalle2 = _load_dalle2(wheel_dir)
    import random

    from tqdm.auto import tqdm

    ns = {name: getattr(dalle2, name) for name in (
        "l2norm", "default", "exists", "RotaryEmbedding", "SinusoidalPosEmb", "MLP", "Rearrange", "repeat",
        "rearrange", "prob_mask_like", "LayerNorm", "RelPosBias", "Attention", "FeedForward", "DiffusionPrior")}
    ns.update(torch=torch, nn=torch.nn, F=torch.nn.functional, random=random, tqdm=tqdm)
    execute_definitions((src / "models.py").read_text(), {"BrainDiffusionPrior", "PriorNetwork", "FlaggedCausalTransformer"},
                 ns)

    torch.manual_seed(0)
    network = ns["PriorNetwork"](dim=DIM, depth=DEPTH, dim_head=DIM_HEAD, heads=HEADS, causal=False,
                                 num_tokens=TOKENS, learned_query_mode="pos_emb")
    prior = ns["BrainDiffusionPrior"](net=network, image_embed_dim=DIM, condition_on_text_encodings=False,
                                      timesteps=TIMESTEPS, cond_drop_prob=0.2, image_embed_scale=None)
    with torch.no_grad():  # the released init leaves gains at 1 and the final projection at 0
        for p in prior.parameters():
            if p.requires_grad:  # not the rotary frequencies, a fixed "parameter"
                p.add_(0.1 * torch.randn_like(p))
    weights = _our_names(prior)
    prior.eval()

    g = torch.Generator().manual_seed(1)
    brain = torch.randn(BATCH, TOKENS, DIM, generator=g)
    target = torch.randn(BATCH, TOKENS, DIM, generator=g)
    noised = torch.randn(BATCH, TOKENS, DIM, generator=g)
    noise = torch.randn(BATCH, TOKENS, DIM, generator=g)
    times = torch.tensor([0, 42, 99])
    expected = {}
    with torch.no_grad():
        expected["denoiser"] = prior.net(noised, times, text_embed=brain)
        expected["denoiser_nulls"] = prior.net(noised, times, text_embed=brain, brain_cond_drop_prob=1.0,
                                               image_cond_drop_prob=1.0)
        expected["denoiser_guided"] = prior.net.forward_with_cond_scale(noised, times, text_embed=brain,
                                                                         cond_scale=3.0)
        # dalle2's LayerNorm on half-precision input (what it sees under bf16 autocast): eps 1e-3
        norm = dalle2.LayerNorm(DIM)
        norm.g.copy_(1 + 0.1 * torch.randn(DIM))
        rows = (0.01 * torch.randn(BATCH, TOKENS, DIM, generator=g)).bfloat16()
        expected["layernorm_bf16"] = norm(rows).float()
        expected["layernorm_float32"] = norm(rows.float())
        weights["layernorm.gain"] = norm.g.detach().clone()
        noised_target = prior.noise_scheduler.q_sample(x_start=target, t=times, noise=noise)
        expected["q_sample"] = noised_target
        for key, drop in (("loss", 0.0), ("loss_condition_dropped", 1.0)):
            prior.text_cond_drop_prob = prior.image_cond_drop_prob = drop
            expected[key], _ = prior.p_losses(target, times, text_cond=dict(text_embed=brain), noise=noise)
        prior.text_cond_drop_prob = prior.image_cond_drop_prob = 0.2

    # one AdamW step on the loss (condition dropout off so it is deterministic), Train.ipynb's groups
    prior.text_cond_drop_prob = prior.image_cond_drop_prob = 0.0
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [{"params": [p for n, p in prior.named_parameters() if not any(nd in n for nd in no_decay)],
               "weight_decay": 1e-2},
              {"params": [p for n, p in prior.named_parameters() if any(nd in n for nd in no_decay)],
               "weight_decay": 0.0}]
    initial = {k: v.clone() for k, v in prior.state_dict().items()}
    optimizer = torch.optim.AdamW(groups, lr=3e-4)
    loss, _ = prior.p_losses(target, times, text_cond=dict(text_embed=brain), noise=noise)
    loss.backward()
    optimizer.step()
    for name, value in _our_names(prior).items():
        expected[f"step/{name}"] = value
    prior.load_state_dict(initial)

    with torch.no_grad():
        torch.manual_seed(SEED)
        expected["sample_eta1"] = prior.p_sample_loop(brain.shape, text_cond=dict(text_embed=brain),
                                                      cond_scale=1.0, timesteps=20)
        torch.manual_seed(SEED)
        expected["sample_eta0"] = prior.p_sample_loop_ddim(brain.shape, text_cond=dict(text_embed=brain),
                                                           timesteps=20, eta=0.0)
        # the sampler alone, around a fixed closed-form denoiser both sides compute identically
        prior.net = _FixedDenoiser()
        for key, eta in (("sampler_eta1", 1.0), ("sampler_eta0", 0.0)):
            torch.manual_seed(SEED)
            expected[key] = prior.p_sample_loop_ddim(brain.shape, text_cond=dict(text_embed=brain),
                                                     timesteps=20, eta=eta)

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(weights, OUT / "weights.safetensors")
    save_file({"brain": brain, "target": target, "noised": noised, "noise": noise, "times": times,
               "small_variance_rows": rows},
              OUT / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    (OUT / "provenance.json").write_text(json.dumps({
        "repository": "MedARC-AI/MindEyeV2",
        "commit": "c1847188200e075b960ad6b87333e51ea17be1b1",
        "files": ["src/models.py (BrainDiffusionPrior, PriorNetwork, FlaggedCausalTransformer)",
                  "src/Train.ipynb (prior construction, parameter groups)",
                  "src/recon_inference.ipynb (p_sample_loop, 20 steps, cond_scale 1)"],
        "package": "dalle2-pytorch 1.15.6 (PyPI wheel), rotary-embedding-torch 0.5.3, einops 0.7.0",
        "command": "python tests/fidelity/reference/make_mindeye2_prior.py <MindEyeV2>/src <unpacked dalle2 wheel>",
        "config": {"dim": DIM, "tokens": TOKENS, "depth": DEPTH, "heads": HEADS, "dim_head": DIM_HEAD,
                   "timesteps": TIMESTEPS, "cond_drop_prob": 0.2, "learned_query_mode": "pos_emb",
                   "causal": False, "mode": "eval", "dtype": "float32 (layernorm_bf16: bfloat16 input)",
                   "sample_seed": SEED, "sample_timesteps": 20,
                   "optimizer": "AdamW lr 3e-4, weight decay 0.01, Train.ipynb groups, 1 step, dropout off"},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
