"""Subject-specific input parts: map each subject's own feature space to a shared hidden space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.models.encoders import PostNormResidualBlock
from braindecode_fw.models.routing import subject_rows


class SubjectLinearAdapter(nn.Module):
    """One linear map per subject, ``(batch, n_voxels_s) -> (batch, hidden)``.

    MindEye2's "ridge" shared-subject functional alignment (docs/methods/mindeye2.md §2): ``nn.Linear`` with
    bias and no activation, regularised only by weight decay. Rows of a mixed-subject batch are
    routed to their subject's linear layer; each row's input is cropped to its subject's voxel
    count (batches are zero-padded to the widest subject).
    """

    def __init__(self, n_features: Mapping[str, int], hidden: int, dropout: float = 0.0):
        super().__init__()
        self.n_features = dict(n_features)
        self.hidden = hidden
        self.linears = nn.ModuleDict({s: nn.Linear(n, hidden) for s, n in self.n_features.items()})
        self.dropout = nn.Dropout(dropout)

    @property
    def subjects(self) -> list[str]:
        return list(self.n_features)

    def add_subject(self, subject: str, n_features: int) -> None:
        """A freshly initialised linear map for a new subject (adaptation)."""
        self.n_features[subject] = n_features
        self.linears[subject] = nn.Linear(n_features, self.hidden)

    def forward(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """responses ``(B, F_max)`` (or ``(B, R, F_max)``), subjects: ``B`` ids -> ``(B, hidden)``
        (or ``(B, R, hidden)``)."""
        out = responses.new_zeros((*responses.shape[:-1], self.hidden))
        subjects = list(subjects)
        for s in dict.fromkeys(subjects):
            if s not in self.linears:
                raise UnknownNameError(f"no adapter for subject {s!r}; the model has {self.subjects}")
            rows = subject_rows(subjects, s, responses.device)
            x = responses.index_select(0, rows)[..., : self.n_features[s]]
            out = out.index_copy(0, rows, self.linears[s](self.dropout(x)).to(out.dtype))
        return out


def _route(x: torch.Tensor, subjects: Sequence[str], modules: Mapping[str, nn.Module] | nn.ModuleDict, out_dim: int,
           crop: Mapping[str, int] | None = None) -> torch.Tensor:
    """Apply ``modules[s]`` to the rows of subject ``s`` (cropped to ``crop[s]`` features) and
    put the results back in batch order: ``(B, F)`` -> ``(B, out_dim)``."""
    out = x.new_zeros((len(subjects), out_dim))
    subjects = list(subjects)
    for s in dict.fromkeys(subjects):
        if s not in modules:
            raise UnknownNameError(f"no adapter for subject {s!r}; the model has {list(modules)}")
        rows = subject_rows(subjects, s, x.device)
        part = x.index_select(0, rows)
        if crop is not None:
            part = part[..., : crop[s]]
        out = out.index_copy(0, rows, modules[s](part).to(out.dtype))
    return out


class SubjectMLPAdapter(nn.Module):
    """STTM's shallow per-subject adapter (docs/methods/sttm.md §2), ``(B, F_max) -> (B, hidden)``:
    ``Linear(n_voxels_s -> hidden) -> LayerNorm -> GELU -> Dropout(0.5)`` then ``n_blocks``
    post-norm residual blocks (1 at real scale, hidden 4096, block dropout 0.15)."""

    def __init__(self, n_features: Mapping[str, int], hidden: int, n_blocks: int = 1, dropout: float = 0.5,
                 block_dropout: float = 0.15):
        super().__init__()
        self.n_features = dict(n_features)
        self.hidden, self.n_blocks, self.dropout, self.block_dropout = hidden, n_blocks, dropout, block_dropout
        self.mlps = nn.ModuleDict({s: self._mlp(n) for s, n in self.n_features.items()})

    def _mlp(self, n_features: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, self.hidden), nn.LayerNorm(self.hidden), nn.GELU(),
                             nn.Dropout(self.dropout),
                             *[PostNormResidualBlock(self.hidden, self.block_dropout) for _ in range(self.n_blocks)])

    @property
    def subjects(self) -> list[str]:
        return list(self.n_features)

    def add_subject(self, subject: str, n_features: int) -> None:
        """A freshly initialised adapter for a new subject (STTM's transfer)."""
        self.n_features[subject] = n_features
        self.mlps[subject] = self._mlp(n_features)

    def forward(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        return _route(responses, subjects, self.mlps, self.hidden, crop=self.n_features)


class LowRankResidualAdapter(nn.Module):
    """``x + up(dropout(relu(down(x))))``, ``(..., dim) -> (..., dim)``, initialised like LoRA
    (down: Kaiming-uniform with a=√5, up and both biases zero), so it starts as the identity
    (MindBridge's subject adapter, docs/methods/mindbridge.md §2)."""

    def __init__(self, dim: int, bottleneck: int = 128, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(torch.relu(self.down(x))))


class PooledSubjectEmbedder(nn.Module):
    """MindBridge's input side (docs/methods/mindbridge.md §2): each subject's voxels are adaptively max- (or
    average-) pooled to ``pool_size`` features (8192 at real scale), then a per-subject embedder
    ``LowRankResidualAdapter -> Linear(pool_size, hidden) -> LayerNorm -> GELU -> Dropout``
    maps them to the shared space. ``(B, F_max) -> (B, hidden)``."""

    def __init__(self, n_features: Mapping[str, int], hidden: int, pool_size: int = 8192, pool: str = "max",
                 bottleneck: int = 128, dropout: float = 0.5):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ConfigError(f"model.adapter.pool: 'max' or 'avg', got {pool!r}")
        self.n_features = dict(n_features)
        self.hidden, self.pool_size, self.pool_kind = hidden, pool_size, pool
        self.bottleneck, self.dropout_p = bottleneck, dropout
        self.embedders = nn.ModuleDict({s: self._embedder() for s in self.n_features})

    def _embedder(self) -> nn.Module:
        return nn.Sequential(LowRankResidualAdapter(self.pool_size, self.bottleneck),
                             nn.Linear(self.pool_size, self.hidden), nn.LayerNorm(self.hidden), nn.GELU(),
                             nn.Dropout(self.dropout_p))

    @property
    def subjects(self) -> list[str]:
        return list(self.n_features)

    def add_subject(self, subject: str, n_features: int) -> None:
        """A freshly initialised embedder for a new subject (adaptation, MindBridge's "reset")."""
        self.n_features[subject] = n_features
        self.embedders[subject] = self._embedder()

    def pool(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """``(B, F_max)`` -> ``(B, pool_size)``: each row pooled over its own subject's voxels."""
        pooled = responses.new_zeros((len(subjects), self.pool_size))
        fn = nn.functional.adaptive_max_pool1d if self.pool_kind == "max" else nn.functional.adaptive_avg_pool1d
        subjects = list(subjects)
        for s in dict.fromkeys(subjects):
            if s not in self.n_features:
                raise UnknownNameError(f"no adapter for subject {s!r}; the model has {self.subjects}")
            rows = subject_rows(subjects, s, responses.device)
            x = responses.index_select(0, rows)[:, None, : self.n_features[s]]
            pooled = pooled.index_copy(0, rows, fn(x, self.pool_size)[:, 0].to(pooled.dtype))
        return pooled

    def embed(self, pooled: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """Pooled ``(B, pool_size)`` -> ``(B, hidden)`` through each row's subject embedder."""
        return _route(pooled, subjects, self.embedders, self.hidden)

    def forward(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        return self.embed(self.pool(responses, subjects), subjects)


class SubjectBuilder(nn.Module):
    """MindBridge's per-subject builder B_s (docs/methods/mindbridge.md §2): shared-space ``(B, hidden)`` back to the
    subject's pooled voxel space ``(B, pool_size)``: ``Linear -> LayerNorm -> GELU ->
    LowRankResidualAdapter``. Used for the brain-reconstruction and cycle losses only."""

    def __init__(self, subjects: Sequence[str], hidden: int, pool_size: int = 8192, bottleneck: int = 128):
        super().__init__()
        self.hidden, self.pool_size, self.bottleneck = hidden, pool_size, bottleneck
        self.builders = nn.ModuleDict({s: self._builder() for s in subjects})

    def _builder(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.hidden, self.pool_size), nn.LayerNorm(self.pool_size), nn.GELU(),
                             LowRankResidualAdapter(self.pool_size, self.bottleneck))

    def add_subject(self, subject: str) -> None:
        self.builders[subject] = self._builder()

    def forward(self, embedded: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        return _route(embedded, subjects, self.builders, self.pool_size)
