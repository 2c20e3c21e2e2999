"""Diffusion priors: brain tokens -> CLIP image tokens by x0-prediction diffusion, after
dalle2-pytorch's ``DiffusionPrior``; MindEye2's network (docs/methods/mindeye2.md §3) or STTM's
``nn.TransformerDecoder`` network (docs/methods/sttm.md §2, :class:`TransformerDecoderPriorNetwork`).

- Schedule: cosine β (s = 0.008, β clipped at 0.999), ``timesteps`` = 100 training steps.
- Network (:class:`PriorNetwork`): sequence [brain tokens (T); time token (1); noised image tokens
  + learned position embedding (T)] through a non-causal transformer of ``depth`` layers
  (pre-LN multi-query cosine-similarity attention, scale 16, rotary on 32 dims, a learned null
  key/value, T5-style relative position bias; SwiGLU feed-forward ×4), a "stable" final LayerNorm
  and a linear output; the last T tokens are the predicted clean image tokens.
- Training: ``loss = MSE(x̂0, x0)`` on raw targets (ME2 leaves ``image_embed_scale`` out); brain
  tokens and noised image tokens are each replaced by learned nulls with probability
  ``cond_drop_prob`` (0.2).
- Sampling (:meth:`DiffusionPrior.sample`): ``sample_steps`` (20) of the 100, ``eta`` (ME2: 1),
  optional classifier-free guidance ``cond_scale`` (ME2: 1 = none); ``sampler: as_released`` is
  dalle2-pytorch 1.15.6's schedule and update, ``uniform_ddim`` textbook DDIM (docs/fidelity.md).

Real scale: dim 1664, 256 tokens, depth 6, 32 heads × 52: ≈ 259.9 M parameters (MindEye2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.errors import ConfigError


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 1..T of the cosine schedule (Nichol & Dhariwal), from β_t clipped at 0.999,
    float64 ``(T,)``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias (dalle2); ``stable`` divides by the max first.

    ``eps`` for float32 input, ``half_precision_eps`` for any other dtype (what it sees under
    fp16/bf16 autocast): dalle2-pytorch uses 1e-3 there, so small-variance rows are not blown up;
    None keeps ``eps`` for every dtype."""

    def __init__(self, dim: int, stable: bool = False, eps: float = 1e-5, half_precision_eps: float | None = 1e-3):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.stable, self.eps = stable, eps
        self.half_precision_eps = eps if half_precision_eps is None else half_precision_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if x.dtype == torch.float32 else self.half_precision_eps
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        return (x - x.mean(dim=-1, keepdim=True)) * (var + eps).rsqrt() * self.gain


def _rotate(x: torch.Tensor, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on the first ``rot_dim`` features of ``(..., n, d)``."""
    n = x.shape[-2]
    freqs = base ** (-torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * freqs[None]  # (n, rot/2)
    angles = angles.repeat_interleave(2, dim=-1)
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    pairs = rot.unflatten(-1, (-1, 2))
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    rot = rot * angles.cos().to(x.dtype) + rotated_half * angles.sin().to(x.dtype)
    return torch.cat((rot, rest), dim=-1)


class RelativePositionBias(nn.Module):
    """T5-style bucketed relative position bias, one scalar per head (dalle2's ``RelPosBias``:
    distances to later keys share bucket 0)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        n = (-relative).clamp(min=0)
        exact = self.num_buckets // 2
        is_small = n < exact
        large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                         * (self.num_buckets - exact)).long()
        return torch.where(is_small, n, large.clamp(max=self.num_buckets - 1))

    def forward(self, i: int, j: int, device: torch.device) -> torch.Tensor:
        rel = torch.arange(j, device=device)[None, :] - torch.arange(i, device=device)[:, None]
        return self.embedding(self.bucket(rel)).permute(2, 0, 1)  # (heads, i, j)


class CosineMultiQueryAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, rot_dim: int = 32, scale: float = 16.0,
                 half_precision_eps: float | None = 1e-3):
        super().__init__()
        self.heads, self.dim_head, self.rot_dim, self.scale = heads, dim_head, min(rot_dim, dim_head), scale
        self.norm = GainLayerNorm(dim, half_precision_eps=half_precision_eps)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)  # one shared key/value head
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False),
                                    GainLayerNorm(dim, half_precision_eps=half_precision_eps))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (b, h, n, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (b, n, d)
        q, k = _rotate(q, self.rot_dim), _rotate(k, self.rot_dim)
        nk, nv = (t.expand(b, 1, self.dim_head) for t in self.null_kv.unbind(0))
        k, v = torch.cat((nk, k), dim=1), torch.cat((nv, v), dim=1)  # (b, n + 1, d)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logits = torch.einsum("bhid,bjd->bhij", q, k).float() * self.scale + bias.float()
        attn = logits.softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class SwiGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, half_precision_eps: float | None = 1e-3):
        super().__init__()
        self.norm = GainLayerNorm(dim, half_precision_eps=half_precision_eps)
        self.proj_in = nn.Linear(dim, 2 * mult * dim, bias=False)
        self.proj_out = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(a * F.silu(gate))


class DenoiserBase(nn.Module):
    """What both prior networks share: the time token (sinusoidal embedding of t through dalle2's
    MLP, SiLU, expansion 2), learned image-token positions and the learned classifier-free nulls."""

    def __init__(self, dim: int, n_tokens: int):
        super().__init__()
        self.dim, self.n_tokens = dim, n_tokens
        self.time_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
                                      nn.Linear(2 * dim, dim))
        self.image_pos = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)
        self.null_brain = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image = nn.Parameter(torch.randn(n_tokens, dim))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return self.time_mlp(torch.cat((args.sin(), args.cos()), dim=-1).to(self.image_pos.dtype))

    def with_nulls(self, brain: torch.Tensor, noised: torch.Tensor, drop_brain: torch.Tensor | None,
                   drop_image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``drop_*``: ``(B,)`` bool, rows whose brain / noised-image tokens become the learned nulls."""
        if drop_brain is not None:
            brain = torch.where(drop_brain[:, None, None], self.null_brain.to(brain.dtype), brain)
        if drop_image is not None:
            noised = torch.where(drop_image[:, None, None], self.null_image.to(noised.dtype), noised)
        return brain, noised


class PriorNetwork(DenoiserBase):
    """``(brain (B, T, D), noised image (B, T, D), t (B,)) -> x̂0 (B, T, D)``."""

    def __init__(self, dim: int, n_tokens: int, depth: int = 6, heads: int = 32, dim_head: int = 52,
                 ff_mult: int = 4, half_precision_eps: float | None = 1e-3):
        super().__init__(dim, n_tokens)
        self.rel_pos = RelativePositionBias(heads)
        self.layers = nn.ModuleList(
            nn.ModuleList([CosineMultiQueryAttention(dim, heads, dim_head, half_precision_eps=half_precision_eps),
                           SwiGLUFeedForward(dim, ff_mult, half_precision_eps=half_precision_eps)])
            for _ in range(depth))
        self.final_norm = GainLayerNorm(dim, stable=True, half_precision_eps=half_precision_eps)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def forward(self, brain: torch.Tensor, noised: torch.Tensor, t: torch.Tensor,
                drop_brain: torch.Tensor | None = None, drop_image: torch.Tensor | None = None) -> torch.Tensor:
        brain, noised = self.with_nulls(brain, noised, drop_brain, drop_image)
        x = torch.cat((brain, self.time_embedding(t)[:, None], noised + self.image_pos), dim=1)
        bias = self.rel_pos(x.shape[1], x.shape[1] + 1, x.device)
        for attn, ff in self.layers:
            x = x + attn(x, bias)
            x = x + ff(x)
        return self.project_out(self.final_norm(x[:, -self.n_tokens:]))


class TransformerDecoderPriorNetwork(DenoiserBase):
    """STTM's prior network (docs/methods/sttm.md §2): ``nn.TransformerDecoder`` (6 layers, d 768, 12 heads,
    FF 3072, GELU, dropout 0 at real scale). The decoded sequence is [time token; noised image
    tokens + learned positions] and the output its last ``T`` positions; the memory is the brain
    tokens + a separate learned position embedding. While training, a random ``brain_token_drop``
    share of the memory tokens (drawn per batch between the two bounds, 60–65%) is removed, a
    different random subset for every sample.
    ``(brain (B, T, D), noised (B, T, D), t (B,)) -> x̂0 (B, T, D)``."""

    def __init__(self, dim: int, n_tokens: int, depth: int = 6, heads: int = 12, ff_dim: int | None = None,
                 brain_token_drop: tuple[float, float] | list[float] | None = (0.6, 0.65)):
        super().__init__(dim, n_tokens)
        self.brain_token_drop = tuple(brain_token_drop) if brain_token_drop else None
        self.brain_pos = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)
        layer = nn.TransformerDecoderLayer(dim, heads, ff_dim or 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)

    def kept_brain_tokens(self, brain: torch.Tensor) -> torch.Tensor:
        """Training: a random subset of each sample's (position-embedded) brain tokens."""
        if not self.training or self.brain_token_drop is None:
            return brain
        t = brain.shape[1]
        low, high = (int(f * t) for f in self.brain_token_drop)
        n_drop = int(torch.randint(low, high + 1, (), device="cpu"))
        keep = torch.rand(brain.shape[:2], device=brain.device).argsort(dim=1)[:, : t - n_drop]
        return brain.gather(1, keep[..., None].expand(-1, -1, brain.shape[2]))

    def forward(self, brain: torch.Tensor, noised: torch.Tensor, t: torch.Tensor,
                drop_brain: torch.Tensor | None = None, drop_image: torch.Tensor | None = None) -> torch.Tensor:
        brain, noised = self.with_nulls(brain, noised, drop_brain, drop_image)
        memory = self.kept_brain_tokens(brain + self.brain_pos)
        x = torch.cat((self.time_embedding(t)[:, None], noised + self.image_pos), dim=1)
        return self.decoder(x, memory)[:, -self.n_tokens:]


SAMPLERS = ("as_released", "uniform_ddim")
GUIDANCE_NULLS = ("brain_and_image", "brain")


class DiffusionPrior(nn.Module):
    """x0-prediction diffusion over CLIP image tokens conditioned on brain tokens (cosine schedule,
    classifier-free condition dropout, DDIM sampling; docs/methods/mindeye2.md §3, docs/methods/sttm.md §2).

    ``network``: a partial taking ``dim, n_tokens`` (e.g. :class:`TransformerDecoderPriorNetwork`);
    None builds MindEye2's :class:`PriorNetwork` from ``depth, heads, dim_head`` (its LayerNorms use
    ``half_precision_eps`` on fp16/bf16 input, dalle2's 1e-3; None keeps 1e-5). ``embed_scale``
    multiplies the target tokens before diffusion and divides samples after (dalle2's
    ``image_embed_scale``; STTM uses √768, ``"sqrt_dim"``).

    ``sampler`` (docs/fidelity.md):

    - ``"as_released"``: dalle2-pytorch 1.15.6's ``p_sample_loop``, what MindEye2's
      ``recon_inference.ipynb`` runs. With ``sample_steps < timesteps`` its DDIM: the timesteps are
      ``int(linspace(-1, T, n + 1)[:-1])`` reversed (20 of 100: the 19 steps 94, 89, ..., 4, then the
      clean estimate), the update uses ᾱ_{t-1} ("alphas_cumprod_prev") where DDIM has ᾱ_t, the noise
      is re-derived with ᾱ_t, and no noise enters the step into t = 0. With every step, its DDPM
      ancestral chain, which is DDIM with η = 1 over all steps (``eta`` is then ignored).
    - ``"uniform_ddim"``: DDIM (Song et al., ICLR 2021, eq. 12) with ᾱ_t over
      ``round(linspace(-1, T - 1, n + 1))`` (20 of 100: 99, 94, ..., 4).

    ``cond_drop_in_eval``: the released loss keeps the condition dropout in evaluation mode too
    (dalle2's ``p_losses`` draws it regardless), so validation losses are comparable with the
    released logs; false turns it off outside training. ``guidance_null`` is what the unconditional
    branch of classifier-free guidance (``cond_scale`` != 1) replaces by the learned nulls: as
    released both the brain and the noised image tokens, or only the brain tokens."""

    def __init__(self, dim: int, n_tokens: int, *, depth: int = 6, heads: int = 32, dim_head: int = 52,
                 timesteps: int = 100, cond_drop_prob: float = 0.2, sample_steps: int = 20, eta: float = 1.0,
                 cond_scale: float = 1.0, network: Callable[..., nn.Module] | None = None,
                 embed_scale: float | str = 1.0, sampler: str = "as_released", cond_drop_in_eval: bool = True,
                 guidance_null: str = "brain_and_image", half_precision_eps: float | None = 1e-3):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.prior.sampler: one of {list(SAMPLERS)}, got {sampler!r}")
        if guidance_null not in GUIDANCE_NULLS:
            raise ConfigError(f"model.prior.guidance_null: one of {list(GUIDANCE_NULLS)}, got {guidance_null!r}")
        if not 1 <= sample_steps <= timesteps:
            raise ConfigError(f"model.prior.sample_steps: between 1 and timesteps ({timesteps}), got {sample_steps}")
        self.net = network(dim=dim, n_tokens=n_tokens) if network is not None else \
            PriorNetwork(dim, n_tokens, depth, heads, dim_head, half_precision_eps=half_precision_eps)
        if embed_scale == "sqrt_dim":
            embed_scale = math.sqrt(dim)
        if isinstance(embed_scale, str) or embed_scale <= 0:
            raise ConfigError(f"model.prior.embed_scale: a positive number or 'sqrt_dim', got {embed_scale!r}")
        self.embed_scale = float(embed_scale)
        self.timesteps, self.cond_drop_prob = timesteps, cond_drop_prob
        self.sample_steps, self.eta, self.cond_scale = sample_steps, eta, cond_scale
        self.sampler, self.cond_drop_in_eval, self.guidance_null = sampler, cond_drop_in_eval, guidance_null
        alphas_cumprod = cosine_alphas_cumprod(timesteps)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # ᾱ_{t-1} (ᾱ_{-1} = 1), which dalle2's DDIM update indexes where DDIM uses ᾱ_t
        self.register_buffer("alphas_cumprod_prev", F.pad(alphas_cumprod[:-1], (1, 0), value=1.0).float(),
                             persistent=False)
        # ε from (x_t, x̂0) as dalle2 computes it, its coefficients in float64 first (near t = 0,
        # 1/√(1/ᾱ - 1) amplifies float32 rounding of √(1 - ᾱ))
        self.register_buffer("sqrt_recip_alphas_cumprod", alphas_cumprod.rsqrt().float(), persistent=False)
        self.register_buffer("sqrt_recipm1_alphas_cumprod", (1 / alphas_cumprod - 1).sqrt().float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, brain: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Training objective: ``MSE(x̂0(brain, q(x0, t), t), x0)``, t uniform in [0, T) unless
        given, on the targets times ``embed_scale``; brain and noised-image tokens each replaced by
        the learned nulls with probability ``cond_drop_prob`` (in training, and in evaluation with
        ``cond_drop_in_eval``)."""
        target = target * self.embed_scale
        b = len(target)
        if t is None:
            t = torch.randint(0, self.timesteps, (b,), device=target.device)
        noise = torch.randn_like(target) if noise is None else noise
        noised = self.q_sample(target, t, noise)
        drop_b = drop_i = None
        if self.training or self.cond_drop_in_eval:
            drop_b = torch.rand(b, device=target.device) < self.cond_drop_prob
            drop_i = torch.rand(b, device=target.device) < self.cond_drop_prob
        return F.mse_loss(self.net(brain, noised, t, drop_b, drop_i), target)

    def predict_x0(self, brain: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.net(brain, x, t)
        if self.cond_scale != 1.0:
            null = torch.ones(len(x), dtype=torch.bool, device=x.device)
            x0_null = self.net(brain, x, t, drop_brain=null,
                               drop_image=null if self.guidance_null == "brain_and_image" else None)
            x0 = x0_null + self.cond_scale * (x0 - x0_null)
        return x0

    def sample_times(self) -> list[int]:
        """The timesteps :meth:`sample` visits, ending with -1 (the clean estimate)."""
        if self.sampler == "as_released":
            if self.sample_steps == self.timesteps:  # dalle2's DDPM chain
                return list(range(self.timesteps - 1, -2, -1))
            # dalle2: int() truncates towards zero, the float32 linspace as released
            times = torch.linspace(-1.0, self.timesteps, self.sample_steps + 1)[:-1].int().tolist()
            return times[::-1]
        return torch.linspace(-1, self.timesteps - 1, self.sample_steps + 1).round().long().flip(0).tolist()

    @torch.no_grad()
    def sample(self, brain: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampling from noise by ``sampler`` over ``sample_steps`` of the ``timesteps``-step
        schedule: ``(B, T, D)`` brain tokens -> ``(B, T, D)`` predicted image tokens. The noise is
        drawn on the CPU from ``generator`` (the initial noise, then one draw per noisy step)."""
        x = torch.randn(brain.shape, generator=generator, device="cpu").to(brain.device, brain.dtype)
        # as released: with fewer steps than the schedule dalle2's DDIM, with every step its DDPM chain
        dalle2_ddim = self.sampler == "as_released" and self.sample_steps < self.timesteps
        eta = self.eta if self.sampler == "uniform_ddim" or dalle2_ddim else 1.0
        update_alphas = self.alphas_cumprod_prev if dalle2_ddim else self.alphas_cumprod
        times = self.sample_times()
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            tt = torch.full((len(x),), t_now, device=x.device, dtype=torch.long)
            x0 = self.predict_x0(brain, x, tt)
            eps = (self.sqrt_recip_alphas_cumprod[t_now] * x - x0) / self.sqrt_recipm1_alphas_cumprod[t_now]
            if t_next < 0:
                x = x0
                continue
            a, a_next = update_alphas[t_now], update_alphas[t_next]
            # in dalle2's order of operations, so float32 rounding matches too
            sigma = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
            direction = ((1 - a_next) - sigma.square()).clamp(min=0).sqrt()
            x_next = x0 * a_next.sqrt()
            if not (dalle2_ddim and t_next == 0):  # dalle2's DDIM adds no noise into t = 0
                noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
                x_next = x_next + sigma * noise
            x = x_next + direction * eps
        return x / self.embed_scale
