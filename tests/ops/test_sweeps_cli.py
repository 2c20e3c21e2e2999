"""Real ``bdf-train -m`` sweeps on the tiny synthetic world: a 2-job submitit_local multirun and a
3-trial Optuna search, each with the sweep summary."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY_MODEL, TINY_WORLD

BIN = Path(sys.executable).parent


def _bdf_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BDF_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("BDF_DEBUG", None)
    env.pop("BDF_LOG_DIR", None)
    exe = BIN / "bdf-train" if (BIN / "bdf-train").exists() else shutil.which("bdf-train")
    assert exe, "bdf-train is not installed (pip install -e .)"
    return subprocess.run([str(exe), "-m", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)


def _tiny(store: Path, *, drop: tuple[str, ...] = ()) -> list[str]:
    model = [o for o in TINY_MODEL if o.split("=")[0] not in drop]
    return [f"dataset.store={store}", "dataset.auto_prepare=false", *TINY_WORLD, *model, "logger=csv",
            "reconstruction.enabled=false"]


def _sweep_dir(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    return sweep


def _summary(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path, tiny_store):
    proc = _bdf_train(["launcher=submitit_local", "seed=1,2", *_tiny(tiny_store)], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep = _sweep_dir(tmp_path)
    for job, seed in ((0, 1), (1, 2)):
        result = json.loads((sweep / str(job) / "result.json").read_text())
        assert result["optimized_metric"] == "test/brain_to_image_top1" and 0 <= result["value"] <= 1
        assert f"seed={seed}" in result["overrides"] and result["run_dir"] == str(sweep / str(job))
        assert (sweep / str(job) / ".hydra" / "config.yaml").exists()
    logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
    assert len(logs) == 2 and all("Job completed successfully" in t for t in logs)
    rows = _summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert sum(r["best"] == "*" for r in rows) == 1


@pytest.mark.slow
def test_optuna_search_returns_best_parameters(tmp_path, tiny_store):
    # the preset's space (lr, hidden, temperature) with the hidden sizes made tiny on the command line
    args = ["hparams_search=synthetic_optuna", "hydra.sweeper.n_trials=3", "model.hidden=choice(16,32)",
            *_tiny(tiny_store, drop=("model.hidden",))]
    proc = _bdf_train(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    sweep = _sweep_dir(tmp_path)
    res = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    best = res["best_params"]
    assert set(best) == {"optim.optimizer.lr", "model.hidden", "loss.temperature"}
    assert 1e-4 <= best["optim.optimizer.lr"] <= 3e-3 and 0.02 <= best["loss.temperature"] <= 0.2
    assert best["model.hidden"] in (16, 32)
    values = [json.loads((sweep / str(j) / "result.json").read_text())["value"] for j in range(3)]
    assert res["best_value"] == max(values) and res["direction"] == "maximize" and res["n_trials"] == 3
    assert "best parameters" in out
    rows = _summary(sweep)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert [r["job"] for r in rows if r["best"]] == [str(res["best_trial"])]
