"""debug=...: fast_dev_run runs one batch without checkpoints or loggers, overfit reuses a few batches
until the loss falls, profiler writes its report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli


def _run_dir(proc) -> Path:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.split("run directory :")[1].split()[0])


@pytest.mark.slow
def test_debug_configs(tmp_path):
    fast = _run_dir(run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "debug=fast_dev_run"], tmp_path / "fast"))
    assert not (fast / "checkpoints").exists() and not (fast / "csv").exists()
    assert (fast / "retrieval.json").is_file()  # the test evaluation still runs

    prof = _run_dir(run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "debug=profiler"], tmp_path / "prof"))
    report = (prof / "profile" / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report

    over = _run_dir(run_cli("bdf-train", [*TINY_WORLD, *TINY_MODEL, "debug=overfit", "trainer.max_epochs=30"],
                         tmp_path / "over"))
    with open(over / "csv" / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 10
    assert losses[-1] < 0.75 * losses[0]  # the same 4 batches are memorised
