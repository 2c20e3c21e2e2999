"""Contrastive gathering across processes: gradients equal the single-process loss over the global
batch; the CLI's DDP run (2 gloo processes) sees as many negatives as one process with the doubled
batch, and only rank zero writes run-level files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braindecode_fw.losses import InfoNCELoss, bimixco_loss, mixco_soft_labels
from braindecode_fw.ops.distributed import gather_block_diagonal, gather_rows, global_rank

WORLD, LOCAL_B, DIM = 2, 4, 8


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(WORLD * LOCAL_B, DIM, generator=g)
    target = torch.randn(WORLD * LOCAL_B, DIM, generator=g)
    beta = torch.rand(WORLD * LOCAL_B, generator=g)
    return pred, target, beta


def _local_labels(beta: torch.Tensor, rank: int) -> torch.Tensor:
    """Soft labels of one rank: rows paired with the next row of the same rank (cyclic)."""
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    partner = (torch.arange(LOCAL_B) + 1) % LOCAL_B
    return mixco_soft_labels(beta[rows], partner)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        pred, target, beta = _inputs()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        local = pred[rows].clone().requires_grad_(True)
        gathered = gather_rows(local)
        info = InfoNCELoss(temperature=0.1)(gathered, gather_rows(target[rows]))
        labels = gather_block_diagonal(_local_labels(beta, rank))
        mix = bimixco_loss(gathered, gather_rows(target[rows]), labels, temperature=0.1)
        (info + mix).backward()
        torch.save({"grad": local.grad, "loss": (info + mix).detach(), "n": len(gathered), "rank": global_rank()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_gradients_equal_the_global_batch_loss(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    pred, target, beta = _inputs()
    full = pred.clone().requires_grad_(True)
    labels = torch.block_diag(*[_local_labels(beta, r) for r in range(WORLD)])
    loss = InfoNCELoss(temperature=0.1)(full, target) + bimixco_loss(full, target, labels, temperature=0.1)
    loss.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["n"] == WORLD * LOCAL_B and got["rank"] == rank
        torch.testing.assert_close(got["loss"], loss.detach())  # every rank computes the global loss
        # the backward sums over ranks (W × ∂L/∂x_r); DDP's gradient average divides by W again
        torch.testing.assert_close(got["grad"] / WORLD, full.grad[rank * LOCAL_B:(rank + 1) * LOCAL_B])


def test_single_process_is_identity():
    x = torch.randn(3, 5, requires_grad=True)
    assert gather_rows(x) is x
    labels = torch.eye(3)
    assert gather_block_diagonal(labels) is labels


def test_rank_from_launcher_environment(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert global_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert global_rank() == 5
    monkeypatch.setenv("SLURM_PROCID", "7")
    assert global_rank() == 7


def _negatives(run_dir: Path) -> set[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {float(r["train/negatives"]) for r in csv.DictReader(f) if r.get("train/negatives")}


@pytest.mark.slow
def test_ddp_two_processes_same_negatives_as_doubled_batch(tmp_path):
    from tests.conftest import TINY_MODEL, TINY_WORLD
    from tests.tasks.test_cli import _run

    common = [*TINY_WORLD, *[o for o in TINY_MODEL if not o.startswith("data.batch_size")], "logger=csv",
              "trainer.max_epochs=2", "reconstruction.enabled=false", "callbacks.image_grid=null"]
    ddp = _run("bdf-train", [*common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"], tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    one = _run("bdf-train", [*common, "data.batch_size=16"], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-4000:]
    ddp_runs = list((tmp_path / "ddp" / "logs" / "train" / "runs").iterdir())
    assert len(ddp_runs) == 1, ddp_runs  # both ranks share one run directory
    one_run = next((tmp_path / "one" / "logs" / "train" / "runs").iterdir())
    assert _negatives(ddp_runs[0]) == _negatives(one_run) == {15.0}
    assert (ddp_runs[0] / "result.json").is_file() and ddp.stdout.count("run directory :") == 1


def test_fsdp_and_ddp_presets_build():
    """trainer=fsdp builds its strategy with a size-based wrap policy (FSDP itself needs GPUs: Lightning
    refuses the CPU); trainer=ddp asks for all GPUs of the node."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from tests.conftest import compose_config

    GlobalHydra.instance().clear()
    cfg = compose_config("train", ["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    big, small = torch.nn.Linear(4000, 4000), torch.nn.Linear(10, 10)
    assert policy(module=big, recurse=False, nonwrapped_numel=sum(p.numel() for p in big.parameters()))
    assert not policy(module=small, recurse=False, nonwrapped_numel=110)
    GlobalHydra.instance().clear()
    ddp = compose_config("train", ["trainer=ddp"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.accelerator) == ("ddp", -1, "gpu")
    GlobalHydra.instance().clear()
