"""Rows of a mixed-subject batch: which rows belong to a subject, as an index tensor on the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def subject_rows(subjects: Sequence[str], subject: str, device: torch.device | str) -> torch.Tensor:
    """``(n,)`` int64 indices of the rows of ``subjects`` (the batch's subject ids) equal to ``subject``,
    on ``device``.

    On a GPU the indices travel through pinned memory with ``non_blocking=True``: a copy from
    ordinary (pageable) host memory waits for every kernel queued before it, i.e. one host
    synchronisation per subject per step, which stalls the training step (docs/benchmarks.md,
    "Fast path"). torch's caching host allocator keeps the pinned buffer alive until the copy is done.
    """
    rows = torch.tensor([i for i, s in enumerate(subjects) if s == subject], dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)
