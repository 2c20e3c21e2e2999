"""Resume: which checkpoint and run directory, crash-safe checkpoint files, and a run killed with
SIGKILL inside a checkpoint save then continued with ckpt_path=last ends bitwise equal to an uninterrupted run — parameters,
test metrics — while W&B, MLflow, CSV and TensorBoard continue the same run without doubled steps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from braindecode_fw.ops.faults import ENV as FAULT_ENV
from braindecode_fw.ops.resume import (
    AtomicCheckpointIO,
    config_differences,
    latest_checkpoint,
    resolve_resume,
)
from tests.conftest import TINY_MODEL, TINY_WORLD
from tests.ops.test_loggers import OFFLINE, _csv_epochs, _scalars
from tests.tasks.test_cli import _assert_one_line_error, _run


def _touch_ckpt(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_resolve_resume(tmp_path):
    task = tmp_path / "logs" / "train"
    fresh = task / "runs" / "new"
    assert resolve_resume(None, "auto", fresh, task) == (None, fresh)
    own = _touch_ckpt(fresh / "checkpoints" / "last.ckpt", 100)  # a requeued job finds its own checkpoint
    assert resolve_resume(None, "auto", fresh, task) == (str(own), fresh)
    assert resolve_resume(None, "never", fresh, task) == (None, fresh)
    newest = _touch_ckpt(task / "multiruns" / "sweep" / "3" / "checkpoints" / "last.ckpt", 200)
    assert latest_checkpoint(task) == newest
    assert resolve_resume("last", "auto", tmp_path / "other", task) == (str(newest), newest.parent.parent)
    assert resolve_resume(str(own), "auto", tmp_path / "other", task) == (str(own), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no run under .*empty has checkpoints/last.ckpt"):
        resolve_resume("last", "auto", fresh, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="ckpt_path: checkpoint not found at .*missing.ckpt"):
        resolve_resume(str(tmp_path / "missing.ckpt"), "auto", fresh, task)
    with pytest.raises(ValueError, match="resume: one of"):
        resolve_resume(None, "always", fresh, task)


def test_atomic_checkpoint_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # stands in for a kill during the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_config_differences():
    old = {"model": {"hidden": 32, "depth": 2}, "seed": 1, "paths": {"output_dir": "a"}, "ckpt_path": None}
    new = {"model": {"hidden": 64, "depth": 2}, "seed": 1, "paths": {"output_dir": "b"}, "ckpt_path": "last",
           "extra": 1}
    assert config_differences(old, new) == ["extra", "model.hidden"]


ARGS = [*TINY_WORLD, *TINY_MODEL, "logger=many", "trainer.max_epochs=8", "callbacks.image_grid.every_n_epochs=2"]


def _start(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "BDF_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", **OFFLINE, **(env or {})}
    exe = Path(sys.executable).parent / "bdf-train"
    return subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _final(run_dir: Path) -> tuple[dict, dict, list]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    result = json.loads((run_dir / "result.json").read_text())
    rows = json.loads((run_dir / "retrieval.json").read_text())["rows"]
    return ckpt["state_dict"], result["metrics"], rows


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    full = _run("bdf-train", ARGS, tmp_path / "full", env=OFFLINE)
    assert full.returncode == 0, full.stderr[-4000:]
    full_dir = Path(full.stdout.split("run directory :")[1].split()[0])

    # the same run, killed with SIGKILL (no clean-up of any kind) at the worst moment of its 4th
    # save of last.ckpt (epoch 3): torch.save has filled the temporary, which is not yet renamed over
    # epoch 2's checkpoint (the fault point of AtomicCheckpointIO, braindecode_fw/ops/faults.py)
    proc = _start(tmp_path / "killed", ARGS, env={FAULT_ENV: "checkpoint.written:last.ckpt@4"})
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what it started (loggers' helpers), as an OOM kill would
    runs = tmp_path / "killed" / "logs" / "train" / "runs"
    (run_dir,) = runs.iterdir()
    assert not (run_dir / "result.json").exists()
    ckpts = run_dir / "checkpoints"
    previous = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert previous["epoch"] == 2  # the previous checkpoint, intact
    assert len(list(ckpts.glob("last.ckpt.tmp-*"))) == 1  # the complete new one it did not rename

    resumed = _run("bdf-train", [*ARGS, "ckpt_path=last"], tmp_path / "killed", env=OFFLINE)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert Path(resumed.stdout.split("run directory :")[1].split()[0]) == run_dir  # continued in place

    params_full, metrics_full, rows_full = _final(full_dir)
    params_res, metrics_res, rows_res = _final(run_dir)
    assert params_full.keys() == params_res.keys()
    for name in params_full:
        assert torch.equal(params_full[name], params_res[name]), name  # bitwise
    assert metrics_res == metrics_full and rows_res == rows_full

    # the dashboards continue the same run: one W&B id, one MLflow run, every epoch once
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two processes, one run id
    wandb_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert all(p.name.endswith(wandb_id) for p in (run_dir / "wandb").glob("offline-run-*"))
    db = sqlite3.connect(run_dir / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone() == (1,)
    steps = [s for (s,) in db.execute("select step from metrics where key='val/brain_to_image_top1'")]
    db.close()
    assert len(set(steps)) == 8
    assert _csv_epochs(run_dir, "val/brain_to_image_top1") == list(range(8))
    assert _scalars(run_dir, "val/brain_to_image_top1") == _scalars(full_dir, "val/brain_to_image_top1")
    assert not [p for pattern in ("*.tmp-*", "*.partial-*", "*.old-*") for p in run_dir.rglob(pattern)]


def test_check_resume_config_rules():
    from braindecode_fw.ops.resume import check_resume_config

    old = {"model": {"hidden": 512}, "trainer": {"max_epochs": 2, "devices": 1}, "optim": {"optimizer": {"lr": 1e-3}}}
    more_devices = {"model": {"hidden": 512}, "trainer": {"max_epochs": 2, "devices": 4},
                    "optim": {"optimizer": {"lr": 1e-3}}}
    assert check_resume_config(old, more_devices, resume_from="a.ckpt", continued_run=Path("run")) == [
        "trainer.devices"]
    more_epochs = {**old, "trainer": {"max_epochs": 5, "devices": 1}}  # the schedule's length was fixed by it
    with pytest.raises(ValueError, match=r"trainer.max_epochs \(2 -> 5\)"):
        check_resume_config(old, more_epochs, resume_from="a.ckpt", continued_run=Path("run"))
    wider = {**more_devices, "model": {"hidden": 1024}}
    with pytest.raises(ValueError, match=r"^ckpt_path=last: the latest run run was started with another config: "
                                         r"model.hidden \(512 -> 1024\)\. Continue it"):
        check_resume_config(old, wider, resume_from="a.ckpt", continued_run=Path("run"))
    assert check_resume_config(old, wider, resume_from="a.ckpt", continued_run=Path("run"),
                               allow_changes=True) == ["model.hidden", "trainer.devices"]
    with pytest.raises(ValueError, match=r"^ckpt_path: a.ckpt was trained with another model.hidden \(512 -> 1024\); "
                                         r"its weights .*\(init_from=a.ckpt copies"):
        check_resume_config(old, wider, resume_from="a.ckpt", continued_run=None)
    other_lr = {**old, "optim": {"optimizer": {"lr": 3e-4}}}  # a new run from a file may change the recipe
    assert check_resume_config(old, other_lr, resume_from="a.ckpt", continued_run=None) == ["optim.optimizer.lr"]


@pytest.mark.slow
def test_ckpt_path_last_never_writes_into_a_run_of_another_config(tmp_path):
    """ckpt_path=last with another model is refused before anything touches the finished run; with
    its own settings it continues that run and files this job's own Hydra folder inside it (no
    empty extra run folder); a truncated checkpoint file is named."""
    from tests.conftest import run_cli

    base = [*TINY_WORLD, *TINY_MODEL, "logger=csv", "reconstruction.enabled=false", "trainer.max_epochs=1"]
    first = run_cli("bdf-train", base, tmp_path)
    assert first.returncode == 0, first.stderr
    runs = tmp_path / "logs" / "train" / "runs"
    (run,) = runs.iterdir()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    other = run_cli("bdf-train", [*base, "model.hidden=48", "ckpt_path=last"], tmp_path)
    _assert_one_line_error(other)
    assert f"the latest run {run} was started with another config: model.hidden (32 -> 48)" in other.stderr, other.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # not a byte changed
    assert sorted(runs.iterdir()) == [run]  # the refused job left no stub folder either

    more = run_cli("bdf-train", [*base, "ckpt_path=last"], tmp_path)
    assert more.returncode == 0, more.stderr
    assert sorted(runs.iterdir()) == [run]
    (filed,) = (run / "continued").iterdir()
    assert (filed / ".hydra" / "overrides.yaml").is_file() and any(filed.glob("*.log"))
    assert _csv_epochs(run, "val/loss") == [0]  # finished already: nothing trained twice

    cut = tmp_path / "cut.ckpt"
    last = run / "checkpoints" / "last.ckpt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    r = run_cli("bdf-train", [*base, f"ckpt_path={cut}"], tmp_path)
    _assert_one_line_error(r)
    assert f"ckpt_path: {cut} is not a readable checkpoint of tensors" in r.stderr, r.stderr
