"""Universal Brain Encoder (Brain-IT stage 0, docs/methods/brainit.md §2): image features -> every voxel's response.

The encoder predicts the fMRI response of any voxel of any subject from frozen-backbone image
tokens. Its only subject-specific parameters are the voxel embeddings ``e_v`` (one ``e``-dim vector
per voxel), which serve twice:

- as the **query** of a per-layer attention over the image tokens (where in the image the voxel
  looks), projected by ``Linear(e -> e)``, with keys ``Linear(d -> e)(features) + positional
  embedding`` and a softmax **without** the usual ``1/sqrt(e)`` scaling (as in Brain-IT's
  ``MapAttention_dynamic_pos``);
- through ``W_v = e_v · F`` (``F`` shared, ``e × L·d``) as the voxel's linear read-out of the
  concatenated per-layer features (what the voxel responds to).

Because all voxels of all subjects live in one embedding space, the learned embeddings can be
clustered jointly across subjects (V2C, :mod:`braindecode_fw.models.voxel_clusters`), and a new
subject only needs new embeddings (transfer, docs/methods/brainit.md §7: train with
``parameters=encoder.voxel_parameters([new])``).

Not included: the frozen DINOv2 ViT-L/14-reg backbone and the LoRA-like residuals Brain-IT adds
after each of its blocks (r = 7, α = 0.01); the features come from a cached target, so the backbone
is frozen *without* those residuals here. Brain-IT's ±3 px image-shift augmentation is likewise not
applicable to cached features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F_

from braindecode_fw.contracts import Batch
from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.models.routing import subject_rows
from braindecode_fw.schema import check_keys

log = logging.getLogger(__name__)

# Brain-IT's encoder initialises its positional embeddings and read-out map with std 1/(2√32)
# (``encoder_param.embed_dim`` = 32, a constant its training script never changes)
RELEASED_STD = 1.0 / (2 * math.sqrt(32))


@dataclass
class UniversalEncoderConfig:
    """Sizes of the Universal Brain Encoder; defaults are Brain-IT's real scale (docs/methods/brainit.md §2).

    ``in_dim`` C (1024: ViT-L), ``n_layers`` L (blocks [1, 6, 12, 18, 24] of DINOv2 ViT-L/14-reg),
    ``n_tokens`` T (257 at 224 px, register tokens dropped), ``dim`` d (128: per-layer feature
    width), ``embed_dim`` e (256: voxel embedding width), ``dropout`` (0.25, after the attention's
    LayerNorm), ``mlp_ratio`` (4: the residual MLP is d -> 4d -> d). ``init``: ``released``
    (Brain-IT's ``models/encoder_models.py``: voxel embeddings ``N(0, 1)·0.1/(2√e)``, positional
    embeddings and the read-out map ``F`` ``N(0, 1)/(2√32)``, a constant of its code) or ``unit``
    (voxel embeddings ``N(0, 1/e)``, ``pos`` ``N(0, 0.02²)``, ``F`` ``N(0, 1/(L·d))``: unit-scale
    initial predictions and O(1) attention logits). ``embed_init_std`` overrides the voxel
    embeddings' std. ``shared_pos``: one positional embedding ``(T, e)`` for all layers (Brain-IT's
    ``pos_embed``; it appears in the state dict under every layer's name) or one per layer.
    """

    in_dim: int = 1024
    n_layers: int = 5
    n_tokens: int = 257
    dim: int = 128
    embed_dim: int = 256
    dropout: float = 0.25
    mlp_ratio: int = 4
    embed_init_std: float | None = None
    init: str = "released"
    shared_pos: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], path: str = "model.universal_encoder") -> UniversalEncoderConfig:
        """Build from a (Hydra) mapping; unknown keys raise an error naming them under ``path``."""
        check_keys(cls, cfg, f"{path}: unknown key(s)")
        out = cls(**dict(cfg))
        out.validate(path)
        return out

    def validate(self, path: str = "model.universal_encoder") -> None:
        for key in ("in_dim", "n_layers", "n_tokens", "dim", "embed_dim", "mlp_ratio"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{path}.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("released", "unit"):
            raise ConfigError(f"{path}.init must be 'released' or 'unit', got {self.init!r}")
        if self.embed_init_std is not None and self.embed_init_std <= 0:
            raise ConfigError(f"{path}.embed_init_std must be > 0 or null, got {self.embed_init_std}")


class VoxelQueryAttention(nn.Module):
    """Voxel-embedding queries attend over image tokens (Brain-IT's ``MapAttention_dynamic_pos``).

    queries ``(B, n, e)``, values ``(B, T, d)`` -> ``(B, n, d)``. Keys are
    ``Linear(d -> e)(values) + pos`` with a learned ``pos`` ``(T, e)``; the weights are
    ``softmax_T(Linear(e -> e)(q) · k)`` with **no** ``1/sqrt(e)`` factor (the embeddings' norm sets
    the sharpness). ``pos_std``: its initialisation (Brain-IT: ``1/(2√32)``).
    """

    def __init__(self, dim: int, embed_dim: int, n_tokens: int, pos_std: float = 0.02):
        super().__init__()
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(dim, embed_dim)
        self.pos = nn.Parameter(torch.empty(n_tokens, embed_dim))
        nn.init.normal_(self.pos, std=pos_std)

    def forward(self, queries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if values.shape[-2] != self.pos.shape[0]:
            raise ConfigError(f"features have {values.shape[-2]} tokens, the encoder was built for "
                             f"{self.pos.shape[0]} (model.universal_encoder.n_tokens)")
        keys = self.key(values) + self.pos
        # scale=1.0: Brain-IT omits the 1/sqrt(d) factor; SDPA avoids materialising (B, n, T)
        # weights where a fused kernel exists (GPU), and is the plain math path on CPU
        return F_.scaled_dot_product_attention(self.query(queries), keys, values, scale=1.0)


class _LayerReadout(nn.Module):
    """One backbone layer: tokens ``(B, T, C)`` + queries ``(B, n, e)`` -> ``(B, n, d)``:
    ``LN(C) -> Linear(C -> d)`` -> voxel-query attention -> ``LN(d) -> Dropout -> x + MLP(x)``."""

    def __init__(self, cfg: UniversalEncoderConfig):
        super().__init__()
        d = cfg.dim
        self.norm_in = nn.LayerNorm(cfg.in_dim)
        self.proj = nn.Linear(cfg.in_dim, d)
        self.attn = VoxelQueryAttention(d, cfg.embed_dim, cfg.n_tokens,
                                        pos_std=RELEASED_STD if cfg.init == "released" else 0.02)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.norm_out(self.attn(queries, self.proj(self.norm_in(tokens)))))
        return x + self.mlp(x)


def universal_encoder_parameter_count(cfg: UniversalEncoderConfig, n_voxels: Mapping[str, int] | int) -> int:
    """Closed-form parameter count (shared part + ``sum_s V_s · e`` voxel embeddings)."""
    c, d, e, t, h = cfg.in_dim, cfg.dim, cfg.embed_dim, cfg.n_tokens, cfg.mlp_ratio * cfg.dim
    per_layer = (2 * c) + (c * d + d) + (e * e + e) + (d * e + e) + (t * e) + (2 * d) + (d * h + h) + (h * d + d)
    total_voxels = n_voxels if isinstance(n_voxels, int) else sum(n_voxels.values())
    shared = (cfg.n_layers - 1) * t * e if cfg.shared_pos else 0
    return cfg.n_layers * per_layer - shared + e * cfg.n_layers * d + total_voxels * e


class UniversalEncoder(nn.Module):
    """Image tokens -> voxel responses for any subject (docs/methods/brainit.md §2).

    ``n_voxels``: subject -> voxel count (the columns ``[:V_s]`` of ``Batch.responses``). See
    :meth:`forward` for shapes. Memory at Brain-IT's training scale (5000 sampled voxels, T = 257,
    L = 5, float32): forward + backward peaks at about 0.27 GB per sample on the math attention
    path (measured on CPU), i.e. about 9 GB at B = 32, mostly the (B, n, 4d) MLP activations and
    the (B, n, T) attention weights of each layer; the voxel embeddings of 4 × 40k voxels are 41M
    parameters.
    """

    def __init__(self, n_voxels: Mapping[str, int], config: UniversalEncoderConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config or UniversalEncoderConfig()
        if overrides:
            check_keys(UniversalEncoderConfig, overrides, "model.universal_encoder: unknown key(s)")
            cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
        self.config = cfg
        self.n_voxels: dict[str, int] = {}
        self.layers = nn.ModuleList([_LayerReadout(cfg) for _ in range(cfg.n_layers)])
        if cfg.shared_pos:  # one parameter, used (and its gradient summed) by every layer
            for layer in self.layers[1:]:
                layer.attn.pos = self.layers[0].attn.pos
        # F: shared e × L·d map from a voxel embedding to its read-out weights W_v = e_v F.
        # unit: N(0, 1/(L·d)) with e_v ~ N(0, 1/e) gives unit-scale initial predictions
        std = RELEASED_STD if cfg.init == "released" else 1.0 / math.sqrt(cfg.n_layers * cfg.dim)
        self.readout = nn.Parameter(torch.randn(cfg.embed_dim, cfg.n_layers * cfg.dim) * std)
        self.voxel_embeddings = nn.ParameterDict()
        for s, n in n_voxels.items():
            self.add_subject(s, n)

    @property
    def subjects(self) -> list[str]:
        return list(self.n_voxels)

    def add_subject(self, subject: str, n_voxels: int, init: torch.Tensor | np.ndarray | None = None) -> None:
        """New voxel embeddings ``(n_voxels, e)`` for ``subject``: random (``N(0, embed_init_std²)``)
        or copied from ``init`` (e.g. the embeddings of nearest-neighbour reference voxels)."""
        e = self.config.embed_dim
        if n_voxels < 1:
            raise ConfigError(f"subject {subject!r}: n_voxels must be >= 1, got {n_voxels}")
        ref = self.readout
        if init is None:
            std = self.config.embed_init_std or (0.1 / (2 * math.sqrt(e)) if self.config.init == "released"
                                                 else 1.0 / math.sqrt(e))
            weight = torch.randn(n_voxels, e, device=ref.device, dtype=ref.dtype) * std
        else:
            weight = torch.as_tensor(np.asarray(init) if not torch.is_tensor(init) else init).detach()
            if tuple(weight.shape) != (n_voxels, e):
                raise ConfigError(f"subject {subject!r}: init has shape {tuple(weight.shape)}, expected ({n_voxels}, {e})")
            weight = weight.to(device=ref.device, dtype=ref.dtype).clone()
        self.n_voxels[subject] = int(n_voxels)
        self.voxel_embeddings[subject] = nn.Parameter(weight)

    def voxel_parameters(self, subjects: Iterable[str] | None = None) -> list[nn.Parameter]:
        """The voxel embeddings of ``subjects`` (all if None): what transfer trains (docs/methods/brainit.md §7)."""
        names = self.subjects if subjects is None else list(subjects)
        return [self.voxel_embeddings[self._check_subject(s)] for s in names]

    def embeddings(self) -> dict[str, np.ndarray]:
        """Every subject's voxel embeddings as float32 ``(V_s, e)`` arrays (input of V2C clustering)."""
        return {s: p.detach().float().cpu().numpy() for s, p in self.voxel_embeddings.items()}

    def _check_subject(self, subject: str) -> str:
        if subject not in self.n_voxels:
            raise UnknownNameError(f"no voxel embeddings for subject {subject!r}; the encoder has {self.subjects}")
        return subject

    def _as_layers(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` or ``(B, L, T, C)`` -> ``(B, L, T, C)``, checked against the config."""
        if features.ndim == 3:
            features = features[:, None]
        cfg = self.config
        if features.ndim != 4 or features.shape[1] != cfg.n_layers or features.shape[3] != cfg.in_dim:
            raise ConfigError(f"features must be (B, T, C) or (B, L, T, C) with L = model.universal_encoder.n_layers "
                             f"= {cfg.n_layers} and C = in_dim = {cfg.in_dim}; got {tuple(features.shape)}")
        return features

    def forward(self, features: torch.Tensor, subjects: Sequence[str],
                voxel_index: torch.Tensor | None = None) -> torch.Tensor:
        """Predict voxel responses.

        features: ``(B, T, C)`` (one layer) or ``(B, L, T, C)``; subjects: ``B`` ids (batches may
        mix subjects). voxel_index: which voxels to predict, indices into each row's own subject's
        voxels: ``(B, n)`` (a different subset per sample, as Brain-IT samples 5000 voxels per
        sample), ``(n,)`` (the same for every row), or None for all voxels.

        Returns ``(B, n)``, or for ``voxel_index=None`` ``(B, V_max)`` with ``V_max`` the largest
        voxel count among the batch's subjects and rows zero beyond their subject's count (the
        layout of ``Batch.responses``).
        """
        tokens = self._as_layers(features)
        subjects = list(subjects)
        b = tokens.shape[0]
        if len(subjects) != b:
            raise ConfigError(f"{len(subjects)} subject ids for a batch of {b}")
        dev = tokens.device
        pad_mask = None
        if voxel_index is None:
            v_max = max(self.n_voxels[self._check_subject(s)] for s in subjects)
            counts = torch.tensor([self.n_voxels[s] for s in subjects], device=dev)
            ar = torch.arange(v_max, device=dev)
            pad_mask = ar[None, :] < counts[:, None]
            voxel_index = torch.minimum(ar[None, :], counts[:, None] - 1)  # padded columns repeat a real voxel
        voxel_index = voxel_index.to(device=dev, dtype=torch.long)
        if voxel_index.ndim == 1:
            voxel_index = voxel_index.expand(b, -1)
        if voxel_index.ndim != 2 or voxel_index.shape[0] != b:
            raise ConfigError(f"voxel_index must be (n,) or (B={b}, n), got {tuple(voxel_index.shape)}")
        queries = self._gather_queries(subjects, voxel_index)  # (B, n, e)
        per_layer = [layer(tokens[:, i], queries) for i, layer in enumerate(self.layers)]
        feats = torch.cat(per_layer, dim=-1)  # (B, n, L·d)
        # sum_j feats_j (e_v F)_j == e_v · (F feats): same numbers without the (B, n, L·d) W_v tensor
        pred = (torch.matmul(feats, self.readout.t()) * queries).sum(-1)
        if pad_mask is not None:
            pred = pred * pad_mask
        return pred

    def _gather_queries(self, subjects: list[str], voxel_index: torch.Tensor) -> torch.Tensor:
        b, n = voxel_index.shape
        e = self.config.embed_dim
        out = self.readout.new_zeros((b, n, e))
        for s in dict.fromkeys(subjects):
            emb = self.voxel_embeddings[self._check_subject(s)]
            rows = subject_rows(subjects, s, voxel_index.device)
            idx = voxel_index.index_select(0, rows)
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.n_voxels[s]:
                raise IndexError(f"voxel_index for subject {s!r} spans [{lo}, {hi}], the subject has {self.n_voxels[s]} voxels")
            out = out.index_copy(0, rows, emb[idx].to(out.dtype))
        return out


def encoder_loss(pred: torch.Tensor, target: torch.Tensor, *, cosine_weight: float = 0.1,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Brain-IT's encoder loss (docs/methods/brainit.md §2): ``MSE − 0.1 · mean_b cos(pred_b, target_b)``.

    pred, target: ``(B, n)``; the cosine is over the voxel axis of each sample. ``mask`` ``(B, n)``
    (optional) excludes padded voxels from both terms.
    """
    if pred.shape != target.shape:
        raise ConfigError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if mask is None:
        mse = F_.mse_loss(pred, target)
        cos = F_.cosine_similarity(pred, target, dim=-1)
    else:
        m = mask.to(pred.dtype)
        mse = ((pred - target) ** 2 * m).sum() / m.sum().clamp(min=1)
        p, t = pred * m, target * m
        cos = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1)).clamp(min=1e-8)
    return mse - cosine_weight * cos.mean()


def _features(batch: Batch, feature: str, device: torch.device) -> torch.Tensor:
    if feature not in batch.targets:
        raise UnknownNameError(f"the batch has no target {feature!r} (the encoder's image-feature key); "
                       f"it has {sorted(batch.targets)}")
    return batch.targets[feature].to(device=device, dtype=torch.float32)


def _responses(batch: Batch, device: torch.device) -> torch.Tensor:
    """``(B, F_max)``; repeated test items ``(B, R, F_max)`` are averaged over their real repeats."""
    y = batch.responses.to(device=device, dtype=torch.float32)
    if y.ndim == 3:
        if batch.repeat_mask is None:
            y = y.mean(1)
        else:
            w = batch.repeat_mask.to(device=device, dtype=y.dtype)[..., None]
            y = (y * w).sum(1) / w.sum(1).clamp(min=1)
    if y.ndim != 2:
        raise ConfigError(f"the universal encoder needs fMRI responses (B, F), got {tuple(batch.responses.shape)}")
    return y


def sample_voxels(encoder: UniversalEncoder, subjects: Sequence[str], n: int,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample voxel subsets without replacement: ``(B, min(n, min_s V_s))`` indices into each
    row's subject's voxels (Brain-IT draws 5000 voxels per sample; a batch holding a subject with
    fewer voxels than ``n`` uses that subject's count for every row so the batch stays rectangular)."""
    subjects = list(subjects)
    counts = [encoder.n_voxels[encoder._check_subject(s)] for s in subjects]
    k = min(n, *counts)
    out = torch.empty((len(subjects), k), dtype=torch.long)
    for s in dict.fromkeys(subjects):
        rows = [i for i, x in enumerate(subjects) if x == s]
        keys = torch.rand((len(rows), encoder.n_voxels[s]), generator=generator)
        out[rows] = keys.topk(k, dim=1).indices if k < encoder.n_voxels[s] else keys.argsort(dim=1)
    return out.to(device)


@torch.no_grad()
def voxel_correlations(encoder: UniversalEncoder, batches: Iterable[Batch], feature: str, *,
                       voxel_chunk: int = 5000) -> dict[str, np.ndarray]:
    """Pearson r between predicted and measured responses, per voxel, over all samples of
    ``batches``: ``{subject: (V_s,) float64}`` (NaN where a voxel or its prediction is constant).
    Predictions run in eval mode, ``voxel_chunk`` voxels at a time, per subject group of each batch."""
    was_training = encoder.training
    encoder.eval()
    dev = encoder.readout.device
    sums: dict[str, torch.Tensor] = {}  # subject -> (6, V): n, Σp, Σy, Σp², Σy², Σpy in float64
    try:
        for batch in batches:
            x, y = _features(batch, feature, dev), _responses(batch, dev)
            for s in dict.fromkeys(batch.subject):
                rows = subject_rows(batch.subject, s, dev)
                v_s = encoder.n_voxels[encoder._check_subject(s)]
                if y.shape[1] < v_s:
                    raise ConfigError(f"subject {s!r}: responses have {y.shape[1]} columns, the encoder expects {v_s} voxels")
                xs, ys = x.index_select(0, rows), y.index_select(0, rows)[:, :v_s].double()
                pred = torch.cat([encoder(xs, [s] * len(rows), torch.arange(a, min(a + voxel_chunk, v_s), device=dev))
                                  for a in range(0, v_s, voxel_chunk)], dim=1).double()
                acc = sums.setdefault(s, torch.zeros((6, v_s), dtype=torch.float64, device=dev))
                acc[0] += len(rows)
                acc[1] += pred.sum(0)
                acc[2] += ys.sum(0)
                acc[3] += (pred**2).sum(0)
                acc[4] += (ys**2).sum(0)
                acc[5] += (pred * ys).sum(0)
    finally:
        encoder.train(was_training)
    out = {}
    for s, (n, sp, sy, spp, syy, spy) in sums.items():
        cov = spy - sp * sy / n
        var_p, var_y = spp - sp**2 / n, syy - sy**2 / n
        r = cov / torch.sqrt(var_p * var_y)
        out[s] = torch.where((var_p > 0) & (var_y > 0), r, torch.nan).cpu().numpy()
    return out


def mean_correlation(corrs: Mapping[str, np.ndarray]) -> float:
    """Mean voxel correlation pooled over subjects (NaNs ignored): the validation metric."""
    if not corrs:
        return float("nan")
    return float(np.nanmean(np.concatenate([np.asarray(v) for v in corrs.values()])))


def _log_epoch(record: dict[str, Any]) -> None:
    log.info("universal encoder epoch %d: loss %.4f, val r %.4f, lr %.2e (%d steps)", record["epoch"],
             record["train_loss"], record.get("val_r", float("nan")), record["lr"], record["steps"])


def fit_universal_encoder(
    encoder: UniversalEncoder,
    batches_fn: Callable[[], Iterable[Batch]],
    *,
    feature: str,
    epochs: int,
    lr: float = 1e-3,
    voxels_per_sample: int = 5000,
    seed: int = 0,
    max_steps: int | None = None,
    val_batches: Iterable[Batch] | Callable[[], Iterable[Batch]] | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    cosine_weight: float = 0.1,
    scheduler_patience: int = 4,
    log: Callable[[dict[str, Any]], None] | None = _log_epoch,
) -> list[dict[str, Any]]:
    """Train the encoder with Brain-IT's recipe (docs/methods/brainit.md §2): Adam (amsgrad), lr 1e-3,
    :func:`encoder_loss` on ``voxels_per_sample`` voxels drawn per sample (see
    :func:`sample_voxels`), ReduceLROnPlateau (factor 0.1, ``scheduler_patience`` 4) on the mean
    validation voxel correlation when ``val_batches`` is given (Brain-IT: 30 epochs, batch 32).

    batches_fn: returns a fresh iterable of :class:`Batch` per epoch; ``batch.targets[feature]``
    holds the image tokens ``(B, [L,] T, C)`` and ``batch.responses`` ``(B, F_max)`` is cropped to
    each subject's own voxel count. ``parameters``: what to optimise (default: every parameter that
    requires grad; transfer, docs/methods/brainit.md §7, passes ``encoder.voxel_parameters([new_subject])``).
    ``max_steps`` stops early (over all epochs). ``seed`` fixes voxel sampling and dropout without
    touching the global RNG state. ``log`` gets each epoch's record.

    Returns the history: one dict per epoch with ``epoch``, ``steps`` (cumulative),
    ``train_loss`` (mean over the epoch), ``lr`` and, with validation, ``val_r``.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if voxels_per_sample < 1:
        raise ConfigError(f"voxels_per_sample must be >= 1, got {voxels_per_sample}")
    params = [p for p in (encoder.parameters() if parameters is None else parameters) if p.requires_grad]
    if not params:
        raise ConfigError("fit_universal_encoder: no trainable parameters")
    dev = encoder.readout.device
    opt = torch.optim.Adam(params, lr=lr, amsgrad=True)
    # Brain-IT's train/train_encoder.py: absolute threshold 0.003 on the validation correlation
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=scheduler_patience,
                                                       threshold=0.003, threshold_mode="abs")
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    step = 0
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    # a private RNG stream for dropout, so training is reproducible and leaves the caller's RNG alone
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            encoder.train()
            losses = []
            for batch in batches_fn():
                x, y = _features(batch, feature, dev), _responses(batch, dev)
                idx = sample_voxels(encoder, batch.subject, voxels_per_sample, gen, dev)
                if y.shape[1] <= int(idx.max()):
                    raise ConfigError(f"responses have {y.shape[1]} columns, fewer than the encoder's voxel counts "
                                     f"{ {s: encoder.n_voxels[s] for s in dict.fromkeys(batch.subject)} }")
                target = y.gather(1, idx)
                loss = encoder_loss(encoder(x, batch.subject, idx), target, cosine_weight=cosine_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            record: dict[str, Any] = {"epoch": epoch, "steps": step,
                                      "train_loss": float(np.mean(losses)) if losses else float("nan"),
                                      "lr": opt.param_groups[0]["lr"]}
            if val_batches is not None:
                val = val_batches() if callable(val_batches) else val_batches
                record["val_r"] = mean_correlation(voxel_correlations(encoder, val, feature))
                sched.step(record["val_r"])
            history.append(record)
            if log is not None:
                log(record)
            if max_steps is not None and step >= max_steps:
                break
    return history
