"""Sweep summary on fake job folders: one row per job, failed jobs, the best row, atomic files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from braindecode_fw.ops.sweep_summary import SweepSummary, write_sweep_summary


def _job(sweep: Path, num: int, value: float | None = None, *, overrides: list[str], ok: bool = True) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if ok:
        (job / "result.json").write_text(json.dumps({
            "task": "train", "optimized_metric": "test/brain_to_image_top1", "value": value,
            "metrics": {"test/brain_to_image_top1": value}, "overrides": overrides, "run_dir": str(job)}))
    return job


def _fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    _job(sweep, 0, 0.30, overrides=["experiment=synthetic_smoke", "optim.optimizer.lr=0.001"])
    _job(sweep, 1, None, overrides=["experiment=synthetic_smoke", "optim.optimizer.lr=0.1"], ok=False)
    _job(sweep, 2, 0.45, overrides=["experiment=synthetic_smoke", "optim.optimizer.lr=0.0003"])
    _job(sweep, 10, 0.40, overrides=["experiment=synthetic_smoke", "optim.optimizer.lr=0.003"])
    (sweep / ".submitit").mkdir()  # not a job folder
    (sweep / "multirun.yaml").write_text("{}")
    return sweep


def test_summary_rows_failed_job_and_best(tmp_path):
    sweep = _fake_sweep(tmp_path)
    rows = write_sweep_summary(sweep, "maximize")
    assert [r["job"] for r in rows] == [0, 1, 2, 10]  # numeric order, not 0, 1, 10, 2
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert [r["best"] for r in rows] == [False, False, True, False]
    assert rows[1]["overrides"] == ["experiment=synthetic_smoke", "optim.optimizer.lr=0.1"]  # from .hydra
    with open(sweep / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["job"] for t in table] == ["0", "1", "2", "10"]
    assert table[2]["best"] == "*" and float(table[2]["value"]) == 0.45 and table[1]["value"] == ""
    assert table[2]["overrides"] == "experiment=synthetic_smoke optim.optimizer.lr=0.0003"
    assert table[2]["run_dir"] == str(sweep / "2") and table[1]["status"] == "failed"
    md = (sweep / "sweep_summary.md").read_text()
    assert "4 jobs: 3 ok, 1 failed" in md and "Overrides of every job: `experiment=synthetic_smoke`" in md
    assert "| 2 | ok **best** | 0.45 | `optim.optimizer.lr=0.0003` |" in md
    assert "| 1 | failed |  | `optim.optimizer.lr=0.1` |" in md
    assert not list(sweep.glob("*.tmp-*"))  # written via temp file + rename

    rows = write_sweep_summary(sweep, "minimize")
    assert [r["job"] for r in rows if r["best"]] == [0]


def test_callback_takes_the_sweepers_direction(tmp_path):
    sweep = _fake_sweep(tmp_path)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"direction": "minimize"}}})
    SweepSummary().on_multirun_end(config=cfg)
    with open(sweep / "sweep_summary.csv") as f:
        assert [r["job"] for r in csv.DictReader(f) if r["best"]] == ["0"]
    SweepSummary(direction="maximize").on_multirun_end(config=cfg)
    with open(sweep / "sweep_summary.csv") as f:
        assert [r["job"] for r in csv.DictReader(f) if r["best"]] == ["2"]


def test_all_failed_sweep_has_no_best(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, overrides=["seed=1"], ok=False)
    rows = write_sweep_summary(sweep)
    assert rows[0]["status"] == "failed" and not rows[0]["best"]
    assert "1 job: 0 ok, 1 failed" in (sweep / "sweep_summary.md").read_text()
