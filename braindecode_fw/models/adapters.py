"""Subject-specific input parts: map each subject's own feature space to a shared hidden space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class SubjectLinearAdapter(nn.Module):
    """One linear map per subject, ``(batch, n_voxels_s) -> (batch, hidden)``.

    MindEye2's "ridge" shared-subject functional alignment (methods.md §3.2): ``nn.Linear`` with
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

    def forward(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """responses ``(B, F_max)`` (or ``(B, R, F_max)``), subjects: ``B`` ids -> ``(B, hidden)``
        (or ``(B, R, hidden)``)."""
        out = responses.new_zeros((*responses.shape[:-1], self.hidden))
        subjects = list(subjects)
        for s in dict.fromkeys(subjects):
            if s not in self.linears:
                raise KeyError(f"no adapter for subject {s!r}; the model has {self.subjects}")
            rows = torch.tensor([i for i, x in enumerate(subjects) if x == s], device=responses.device)
            x = responses.index_select(0, rows)[..., : self.n_features[s]]
            out = out.index_copy(0, rows, self.linears[s](self.dropout(x)).to(out.dtype))
        return out
