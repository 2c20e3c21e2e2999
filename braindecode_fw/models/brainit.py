"""Brain-IT's Brain Interaction Transformer (BIT; Beliy et al., ICLR 2026; docs/methods/brainit.md §3).

Voxels become tokens, voxels of one functional cluster are pooled into one *brain token* per
cluster, and learned output queries read the brain tokens through a cross-transformer:

1. **Voxel tokens** (:class:`VoxelTokenEmbedding`): ``t_v = y_v · e_v`` with a learned embedding
   ``e_v`` (``dim``) per voxel, the only subject-specific parameters.
2. **Brain tokenizer** (:class:`BrainTokenizer`): graph attention from the voxels to ``K`` cluster
   nodes, exactly PyG's ``TransformerConv`` (one head, root weight) over the voxel -> cluster edges
   of the V2C mapping, whose cluster nodes carry learned centre embeddings, then ReLU and LayerNorm:
   ``(B, V) -> (B, K, dim)``. Because ``t_v`` is a scalar times ``e_v``, its key and value are
   ``y_v·W e_v + b``: the attention logits are affine in ``y_v`` with per-voxel coefficients, and
   the aggregation is a per-cluster weighted sum of the ``W_value e_v`` rows, computed on a
   cluster-padded layout ``(K, max cluster size)`` (Brain-IT's V2C mapping array). Memory is
   ``O(B·K·M + K·M·dim)`` instead of the ``O(B·V·dim)`` of a generic graph layer, which at real
   scale (B 128, 15,000 voxels, dim 512) is 3.9 GB per tensor.
3. **Cross-transformer** (:class:`CrossTransformer`): a cross block reads the brain tokens into the
   learned queries, then ``depth`` × [self-attention block on the brain tokens; cross block added to
   the queries]. A cross block has no query projection and no LayerNorm on the queries (as the
   code): ``y = Proj(Attn(q, K(LN(b)), V(LN(b))))``, ``y += MLP(LN(y))``.
4. **Output**: ``Linear(dim -> out_dim)`` per query.

:class:`BrainITDecoder` holds one BIT per branch (each with its own voxel embeddings, as Brain-IT
trains its semantic and low-level models separately; their losses touch disjoint parameters, so
training them in one run is the same as training them apart): the semantic branch predicts CLIP
image tokens (256 × 1664 bigG at real scale, MSE), the low-level branch multi-scale VGG tokens
(7,190 × 512, multi-scale InfoNCE on per-scale sampled queries). Stage 0 (the universal encoder
and the V2C clustering that gives every voxel its cluster) is
:mod:`~braindecode_fw.models.brainit_stage0`.

Deviations, on purpose: voxels are subsampled per subject group of a batch (``voxels_per_step``),
without replacement — Brain-IT samples 15,000 per sample *with* replacement, and its graph
construction then silently drops all but the last copy of a duplicated voxel (docs/methods/brainit.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.contracts import SAMPLED_INDEX_SUFFIX, SAMPLED_SCALE_SUFFIX
from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.losses import sample_scale_tokens
from braindecode_fw.models.decoder import Decoder
from braindecode_fw.models.routing import subject_rows


def _safe_key(subject: str) -> str:
    # parameter/buffer names may not contain "."
    return subject.replace(".", "_")


class VoxelTokenEmbedding(nn.Module):
    """Per-subject voxel embeddings ``(V_s, dim)``, initialised ``N(0, 1)·0.1/(2√dim)`` as Brain-IT."""

    def __init__(self, n_features: Mapping[str, int], dim: int):
        super().__init__()
        self.dim = dim
        self.n_features: dict[str, int] = {}
        self.embeddings = nn.ParameterDict()
        for s, n in n_features.items():
            self.add_subject(s, n)

    @property
    def subjects(self) -> list[str]:
        return list(self.n_features)

    def add_subject(self, subject: str, n_voxels: int, init: torch.Tensor | None = None) -> None:
        """Fresh (or ``init`` ``(n_voxels, dim)``) embeddings for ``subject``."""
        if init is not None and tuple(init.shape) != (n_voxels, self.dim):
            raise ConfigError(f"voxel embeddings of {subject!r}: init has shape {tuple(init.shape)}, expected "
                             f"({n_voxels}, {self.dim})")
        value = init.detach().clone().float() if init is not None else torch.randn(n_voxels, self.dim) * (
            0.1 / (2 * math.sqrt(self.dim)))
        self.n_features[subject] = int(n_voxels)
        self.embeddings[_safe_key(subject)] = nn.Parameter(value)

    def weight(self, subject: str) -> torch.Tensor:
        if subject not in self.n_features:
            raise UnknownNameError(f"no voxel embeddings for subject {subject!r}; the model has {self.subjects}")
        return self.embeddings[_safe_key(subject)]


def cluster_layout(labels: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Voxels grouped by cluster: ``labels`` ``(V,)`` in ``[0, K)`` -> (``order`` ``(V,)``: voxel
    indices sorted by cluster, ``slot`` ``(V,)``: each sorted voxel's position inside its cluster,
    ``M``: the largest cluster size). ``(labels[order], slot)`` indexes a ``(K, M)`` padded layout."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n_clusters)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return order, slot, int(counts.max()) if len(labels) else 0


class BrainTokenizer(nn.Module):
    """Voxel tokens -> one brain token per cluster: ``TransformerConv(dim, dim)`` (one head, root
    weight, biased query/key/value/skip projections) over voxel -> cluster edges, the cluster nodes
    carrying learned centre embeddings ``(K, dim)``, then ReLU and LayerNorm (docs/methods/brainit.md §3).

    For cluster ``c`` with voxels ``v ∈ c`` and voxel tokens ``t_v = y_v e_v``::

        out_c = W_skip z_c + Σ_v α_cv W_value t_v,   α_c = softmax_v((W_q z_c)·(W_k t_v) / √dim)

    A cluster without voxels (possible after subsampling) gets ``W_skip z_c`` only.
    """

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.dim, self.n_clusters = dim, n_clusters
        # N(0, 1)·0.1/(2√dim), as Brain-IT initialises its voxel embeddings, centres and queries
        self.centers = nn.Parameter(torch.randn(n_clusters, dim) * (0.1 / (2 * math.sqrt(dim))))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.skip = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``values`` ``(B, V)`` voxel responses, ``embeddings`` ``(V, dim)``, ``labels`` ``(V,)``
        cluster of each voxel -> brain tokens ``(B, K, dim)``."""
        b, k, d = values.shape[0], self.n_clusters, self.dim
        q = self.query(self.centers)  # (K, d)
        order, slot, m = cluster_layout(labels, k)
        sorted_labels = labels[order]
        # key/value of t_v = y_v e_v are y_v (W e_v) + bias: per-voxel logit slope and offset
        key_e = F.linear(embeddings[order], self.key.weight)  # (V, d)
        slope = (key_e * q[sorted_labels]).sum(-1) / math.sqrt(d)  # (V,)
        offset = (self.key.bias[None] * q[sorted_labels]).sum(-1) / math.sqrt(d)
        value_e = F.linear(embeddings[order], self.value.weight)  # (V, d)

        mask = torch.zeros(k, m, dtype=torch.bool, device=values.device)
        mask[sorted_labels, slot] = True
        y = values.new_zeros(b, k, m)
        y[:, sorted_labels, slot] = values[:, order].to(y.dtype)
        logits = values.new_full((b, k, m), float("-inf"))
        logits[:, sorted_labels, slot] = y[:, sorted_labels, slot] * slope + offset
        filled = mask.any(1)  # (K,)
        alpha = torch.softmax(logits.masked_fill(~filled[None, :, None], 0.0), dim=-1)
        alpha = alpha * filled[None, :, None]
        v_pad = value_e.new_zeros(k, m, d)
        v_pad[sorted_labels, slot] = value_e
        aggregated = torch.einsum("bkm,kmd->bkd", alpha * y, v_pad) + filled[None, :, None] * self.value.bias
        return self.norm(torch.relu(self.skip(self.centers)[None] + aggregated))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x += Attn(LN(x))``, ``x += MLP(LN(x))`` (GELU, no dropout),
    ``(B, N, dim) -> (B, N, dim)``. Brain-IT's brain-token block has a bias-free qkv and MLP ratio 4
    (the defaults); NeuroPictor's fMRI ViT uses it with ``qkv_bias=True``."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.heads: {heads} must divide model.dim={dim}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Queries read the brain tokens: ``y = Proj(Attn(q, K(LN(b)), V(LN(b))))`` with the queries
    split into heads as they are (no projection, no LayerNorm), bias-free K/V, scale
    ``1/√head_dim``; then ``y += MLP(LN(y))``. Returns ``y`` (the caller adds it to the queries).
    ``queries`` ``(B, N, dim)``, ``brain`` ``(B, K, dim)`` -> ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_kv = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, queries: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        b, n, d = queries.shape
        h = self.heads
        q = queries.view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(brain)).view(b, brain.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return y + self.mlp(self.norm_mlp(y))


class CrossTransformer(nn.Module):
    """Cross block 0, then ``depth`` × [self-attention on brain tokens; cross block], each cross
    block's output added to the queries. ``brain`` ``(B, K, dim)``, ``queries`` ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.first = CrossAttentionBlock(dim, heads)
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(dim, heads) for _ in range(depth))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(depth))

    def forward(self, brain: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        queries = queries + self.first(queries, brain)
        for self_block, cross in zip(self.self_blocks, self.cross_blocks, strict=True):
            brain = self_block(brain)
            queries = queries + cross(queries, brain)
        return queries


class BrainInteractionTransformer(nn.Module):
    """One BIT: voxel responses of one or several subjects -> ``(B, N, out_dim)`` for ``N`` learned
    queries (or the ``query_index`` subset of them).

    ``n_features``: voxels per subject; cluster labels per subject are buffers set by
    :meth:`set_cluster_labels` (from stage 0) and saved with the state dict.
    Real scale (docs/methods/brainit.md §3): dim 512, heads 8, depth 5, 128 clusters; semantic 256 × 1664,
    low-level 7,190 × 512.
    """

    def __init__(self, n_features: Mapping[str, int], *, n_queries: int, out_dim: int, n_clusters: int = 128,
                 dim: int = 512, heads: int = 8, depth: int = 5):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim ({dim}) must be divisible by model.heads ({heads})")
        self.n_clusters, self.n_queries, self.out_dim = n_clusters, n_queries, out_dim
        self.voxels = VoxelTokenEmbedding(n_features, dim)
        self.tokenizer = BrainTokenizer(dim, n_clusters)
        self.transformer = CrossTransformer(dim, heads, depth)
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * (0.1 / (2 * math.sqrt(dim))))
        self.output = nn.Linear(dim, out_dim)
        for s, n in n_features.items():
            self.register_buffer(f"labels_{_safe_key(s)}", torch.full((n,), -1, dtype=torch.long))

    @property
    def subjects(self) -> list[str]:
        return self.voxels.subjects

    def add_subject(self, subject: str, n_voxels: int, init: torch.Tensor | None = None) -> None:
        self.voxels.add_subject(subject, n_voxels, init)
        self.register_buffer(f"labels_{_safe_key(subject)}", torch.full((n_voxels,), -1, dtype=torch.long,
                                                                         device=self.queries.device))

    def set_cluster_labels(self, subject: str, labels: torch.Tensor) -> None:
        buf = self.cluster_labels(subject, check=False)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != buf.shape:
            raise ConfigError(f"cluster labels of {subject!r}: shape {tuple(labels.shape)}, the subject has "
                             f"{buf.shape[0]} voxels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.n_clusters):
            raise ConfigError(f"cluster labels of {subject!r} must lie in [0, {self.n_clusters}) "
                             f"(model.n_clusters), got [{int(labels.min())}, {int(labels.max())}]")
        buf.copy_(labels)

    def cluster_labels(self, subject: str, check: bool = True) -> torch.Tensor:
        name = f"labels_{_safe_key(subject)}"
        if not hasattr(self, name):
            raise UnknownNameError(f"no voxel embeddings for subject {subject!r}; the model has {self.subjects}")
        buf = getattr(self, name)
        if check and len(buf) and int(buf.min()) < 0:
            raise RuntimeError(f"BIT: subject {subject!r} has no voxel clusters yet (stage 0 / "
                               f"model.clusters.path sets them)")
        return buf

    def brain_tokens(self, responses: torch.Tensor, subjects: Sequence[str], voxels_per_step: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, F_max)`` zero-padded responses -> ``(B, K, dim)``; rows routed by subject, each
        subject group tokenised over its own voxels (a random ``voxels_per_step`` of them, if given)."""
        subjects = list(subjects)
        out = responses.new_zeros(len(subjects), self.n_clusters, self.tokenizer.dim)
        for s in dict.fromkeys(subjects):
            rows = subject_rows(subjects, s, responses.device)
            n = self.voxels.n_features.get(s)
            if n is None:
                raise UnknownNameError(f"no voxel embeddings for subject {s!r}; the model has {self.subjects}")
            labels, emb = self.cluster_labels(s), self.voxels.weight(s)
            values = responses.index_select(0, rows)[:, :n]
            if voxels_per_step is not None and voxels_per_step < n:
                keep = torch.randperm(n, generator=generator)[:voxels_per_step].to(responses.device)
                values, labels, emb = values[:, keep], labels[keep], emb[keep]
            tokens = self.tokenizer(values.to(emb.dtype), emb, labels)
            out = out.index_copy(0, rows, tokens.to(out.dtype))
        return out

    def forward(self, responses: torch.Tensor, subjects: Sequence[str], *, query_index: torch.Tensor | None = None,
                voxels_per_step: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        brain = self.brain_tokens(responses, subjects, voxels_per_step, generator)
        queries = self.queries if query_index is None else self.queries.index_select(0, query_index)
        return self.output(self.transformer(brain, queries.expand(len(brain), -1, -1)))


class BrainITDecoder(Decoder):
    """Brain-IT behind the framework's decoder contract (docs/methods/brainit.md §3): one
    :class:`BrainInteractionTransformer` per branch, each predicting its target's tokens.

    ``forward(responses, subjects)``: ``(B, F_max)`` -> ``{target: (B, N, W)}`` per branch, or
    ``(B, D)`` for a branch in ``pooled`` (an embedding target read by one query). When a
    loss is computed (``targets`` given: training and validation), a branch with ``token_sampling``
    predicts only a per-scale random subset of its queries (Brain-IT's low-level branch: [512, 512,
    128, 64, 16] of the five VGG scales) and adds ``<target>/index`` (the sampled query indices)
    and ``<target>/scale`` (the scale of each), which the ``multiscale_infonce`` loss term reads;
    prediction returns every query. Voxels are subsampled (``voxels_per_step``) while training only.

    Stage 0 (:mod:`~braindecode_fw.models.brainit_stage0`) gives each voxel its functional cluster
    before training (:meth:`configure_from_data`): it trains the universal encoder held here
    (``universal_encoder``, frozen afterwards, kept in the state dict for new-subject transfer) and
    clusters its voxel embeddings, or loads a saved clustering (``stage0.clusters_path``).
    """

    def __init__(self, branches: Mapping[str, BrainInteractionTransformer], targets: Mapping[str, str], *,
                 token_sampling: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
                 voxels_per_step: int | None = None, universal_encoder: nn.Module | None = None,
                 stage0: Mapping | None = None, seed: int = 0, pooled: Iterable[str] = ()):
        nn.Module.__init__(self)
        self.branches = nn.ModuleDict(dict(branches))
        self.branch_targets = dict(targets)
        self.token_sampling = {b: (list(sizes), list(per)) for b, (sizes, per) in (token_sampling or {}).items()}
        self.voxels_per_step = voxels_per_step
        self.universal_encoder = universal_encoder
        self.stage0 = dict(stage0 or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.stage0_result: dict | None = None  # set by configure_from_data (clusters, report)
        self.pooled = set(pooled)  # branches predicting an embedding (D,) with one query

    @property
    def subjects(self) -> list[str]:
        return next(iter(self.branches.values())).subjects

    @property
    def n_clusters(self) -> int:
        return next(iter(self.branches.values())).n_clusters

    def compute(self, responses, subjects, targets):
        out: dict[str, torch.Tensor] = {}
        vps = self.voxels_per_step if self.training else None
        for name, bit in self.branches.items():
            target = self.branch_targets[name]
            sampling = self.token_sampling.get(name)
            if targets is not None and sampling is not None:
                index, scale = sample_scale_tokens(sampling[0], sampling[1], generator=self.generator)
                index, scale = index.to(responses.device), scale.to(responses.device)
                out[target] = bit(responses, subjects, query_index=index, voxels_per_step=vps,
                                  generator=self.generator)
                out[target + SAMPLED_INDEX_SUFFIX], out[target + SAMPLED_SCALE_SUFFIX] = index, scale
            else:
                value = bit(responses, subjects, voxels_per_step=vps, generator=self.generator)
                out[target] = value[:, 0] if name in self.pooled else value
        return out

    def add_subject(self, subject: str, n_voxels: int, init_bias_from: str | None = None) -> list[str]:
        """Fresh voxel embeddings (and unset cluster labels) for a new subject in every branch and
        in the universal encoder; returns the parameter-name prefixes of the BIT embeddings, the
        only parameters Brain-IT's transfer trains (docs/methods/brainit.md §7). There is no adapter
        bias to start from (``init_bias_from`` must be None): :meth:`nearest_voxel_init` starts them."""
        if init_bias_from is not None:
            raise ConfigError("adaptation.init_bias_from: Brain-IT has no adapter bias; use adaptation.init: "
                             "nearest_voxel (adaptation=brainit_transfer)")
        prefixes = []
        for name, bit in self.branches.items():
            bit.add_subject(subject, n_voxels)
            prefixes.append(f"branches.{name}.voxels.embeddings.{_safe_key(subject)}")
        if self.universal_encoder is not None:
            self.universal_encoder.add_subject(subject, n_voxels)
        return prefixes

    def nearest_voxel_init(self, subject: str, datamodule, spec: Mapping) -> dict:
        """Brain-IT's transfer to a new subject (:func:`~braindecode_fw.models.brainit_stage0.transfer_initialise`,
        docs/methods/brainit.md §7)."""
        from braindecode_fw.models.brainit_stage0 import transfer_initialise

        return transfer_initialise(self, subject, datamodule, spec)

    def set_clusters(self, labels: Mapping[str, torch.Tensor]) -> None:
        """Every branch's cluster labels per subject (``labels[s]`` ``(V_s,)``)."""
        for s in self.subjects:
            if s not in labels:
                raise UnknownNameError(f"voxel clusters: no labels for subject {s!r}; they cover {sorted(labels)}")
            for bit in self.branches.values():
                bit.set_cluster_labels(s, torch.as_tensor(labels[s]))

    def has_clusters(self) -> bool:
        bit = next(iter(self.branches.values()))
        return all(int(bit.cluster_labels(s, check=False).min()) >= 0 for s in self.subjects)

    def configure_from_data(self, datamodule) -> None:
        """Stage 0 before training: the voxel clusters from ``stage0.clusters_path`` or from a
        universal encoder trained on ``datamodule`` (:func:`~braindecode_fw.models.brainit_stage0.run_stage0`)."""
        from braindecode_fw.models import brainit_stage0

        self.stage0_result = brainit_stage0.configure(self, datamodule, self.stage0)

    def use_saved_artifacts(self, run_dir) -> None:
        """A resumed run reuses the stage 0 it saved when it started (``<run_dir>/stage0``) instead of
        training a different one (called by bdf-train before :meth:`configure_from_data`)."""
        from braindecode_fw.models import brainit_stage0

        folder = Path(run_dir) / "stage0"
        if (folder / brainit_stage0.CLUSTERS_FILE).is_file() and not self.stage0.get("load_from"):
            self.stage0["load_from"] = str(folder)

    def save_artifacts(self, run_dir) -> list:
        """Write stage 0's clustering and report into ``run_dir`` (called by bdf-train)."""
        from braindecode_fw.models import brainit_stage0

        return brainit_stage0.save_artifacts(self.stage0_result, run_dir)


def build_brainit_decoder(
    n_features: Mapping[str, int],
    target_shapes: Mapping[str, Sequence[int]],
    *,
    branches: Mapping[str, Mapping | None],
    dim: int = 512,
    heads: int = 8,
    depth: int = 5,
    n_clusters: int = 128,
    voxels_per_step: int | None = 15000,
    universal_encoder: Mapping | None = None,
    stage0: Mapping | None = None,
    seed: int = 0,
) -> BrainITDecoder:
    """Hydra entry point (``model=brainit``), sizes from the data.

    ``branches``: name -> ``{target: <token target (N, W)>, token_sampling: {per_scale: [...],
    image_size: <the multi-scale target's image size>}}`` (a null branch is dropped).
    ``universal_encoder``: :class:`~braindecode_fw.models.universal_encoder.UniversalEncoderConfig`
    keys (its input sizes come from the ``stage0.features`` target's shape, ``(T, C)`` or
    ``(L, T, C)``); ``stage0``: see :mod:`~braindecode_fw.models.brainit_stage0`.
    """
    from braindecode_fw.models.universal_encoder import UniversalEncoder, UniversalEncoderConfig
    from braindecode_fw.targets.multiscale import scale_sizes

    active = {name: dict(spec) for name, spec in branches.items() if spec is not None}
    if not active:
        raise ConfigError("model.branches: no branch configured (semantic and/or lowlevel)")
    bits, targets, sampling, pooled = {}, {}, {}, set()
    for name, spec in active.items():
        target = spec.get("target")
        shape = tuple(int(d) for d in target_shapes.get(target, ()))
        if target not in target_shapes or len(shape) not in (1, 2):
            raise ConfigError(f"model.branches.{name}.target: {target!r} must be a token target (N, W) or an "
                             f"embedding (D,) of the run; targets {({k: tuple(v) for k, v in target_shapes.items()})}")
        if len(shape) == 1:  # one learned query reads the embedding (e.g. a pooled CLIP image embedding)
            pooled.add(name)
            shape = (1, shape[0])
        bits[name] = BrainInteractionTransformer(n_features, n_queries=shape[0], out_dim=shape[1],
                                                 n_clusters=n_clusters, dim=dim, heads=heads, depth=depth)
        targets[name] = target
        ts = spec.get("token_sampling")
        if ts is not None and name in pooled:
            raise ConfigError(f"model.branches.{name}.token_sampling: the target {target!r} is an embedding "
                             f"{tuple(target_shapes[target])}, not tokens to sample")
        if ts is not None:
            sizes = list(ts.get("scale_sizes") or scale_sizes(int(ts["image_size"])))
            if sum(sizes) != shape[0]:
                raise ConfigError(f"model.branches.{name}.token_sampling: the scales hold {sum(sizes)} tokens "
                                 f"({sizes}), the target {target!r} has {shape[0]}")
            sampling[name] = (sizes, list(ts["per_scale"]))
    stage0 = dict(stage0 or {})
    encoder = None
    if universal_encoder is not None:
        feature = stage0.get("features")
        if feature not in target_shapes:
            raise ConfigError(f"model.stage0.features: {feature!r} is not a target of the run; targets "
                             f"{sorted(target_shapes)} (add it under extra_targets)")
        fshape = tuple(int(d) for d in target_shapes[feature])
        if len(fshape) not in (2, 3):
            raise ConfigError(f"model.stage0.features: {feature!r} must be image tokens (T, C) or (L, T, C), got "
                             f"{fshape}")
        layers, tokens, width = (1, *fshape) if len(fshape) == 2 else fshape
        config = UniversalEncoderConfig.from_mapping({**dict(universal_encoder), "in_dim": width, "n_layers": layers,
                                                      "n_tokens": tokens})
        encoder = UniversalEncoder(n_features, config)
    return BrainITDecoder(bits, targets, token_sampling=sampling, voxels_per_step=voxels_per_step,
                          universal_encoder=encoder, stage0=stage0, seed=seed, pooled=pooled)
