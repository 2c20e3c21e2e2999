"""Multi-process helpers: rank queries and an all-gather that keeps gradients.

Contrastive losses need every rank's rows as candidates, or the number of negatives (and with it
the loss and the result) depends on the GPU count (docs/operations.md, "Multi-GPU"; brainmagick's README warns
about exactly this). :func:`gather_rows` concatenates the rows of all ranks in rank order and sends
the gradient of every gathered row back to the rank that produced it.

Gradient bookkeeping: every rank computes the same loss ``L`` over the gathered batch; the backward
pass sums ``∂L/∂x_r`` over the ``W`` ranks (``W·∂L/∂x_r``) and DDP averages parameter gradients over
``W``, so each step applies exactly ``∂L/∂θ`` of the single-process loss over the global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def global_rank() -> int:
    """This process's rank: from torch.distributed once initialised, else from the launcher's
    environment (``RANK``, ``LOCAL_RANK`` with ``NODE_RANK``, ``SLURM_PROCID``), 0 otherwise — so
    it is right before Lightning sets up the process group (e.g. when the run directory is made)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if os.environ.get("LOCAL_RANK", "").isdigit():
        # Lightning's subprocess launcher sets LOCAL_RANK/NODE_RANK (+ WORLD_SIZE) for its children
        local, node = int(os.environ["LOCAL_RANK"]), int(os.environ.get("NODE_RANK", "0") or 0)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        return local + node * per_node if per_node else local
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) the incoming gradient and returns
    this rank's slice. Only all_reduce is needed, which every backend (gloo, NCCL) supports."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, *shape)`` on each of ``W`` ranks -> ``(W·B, *shape)`` (rank order), differentiable.
    Identity in a single process. Every rank must pass the same shape (equal batch sizes: the
    subject-balanced sampler guarantees it)."""
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"gather_rows: ranks hold different batch sizes {[int(s) for s in sizes]}; "
                           "contrastive gathering needs equal per-rank batches")
    if x.requires_grad:
        return _GatherRows.apply(x)
    parts = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def gather_block_diagonal(labels: torch.Tensor) -> torch.Tensor:
    """Per-rank ``(B, B)`` soft labels (mixing partners are always on the same rank) -> the global
    ``(W·B, W·B)`` block-diagonal label matrix."""
    if not is_distributed():
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.block_diag(*parts)
