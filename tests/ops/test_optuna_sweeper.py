"""The bdf_optuna sweeper end to end on a stand-in task (tests/ops/fake_train.py: the real CLI wrapper
and braindecode_fw/conf/train.yaml, no training): failed trials, command-line search space, resume from sqlite,
non-float returns, and submitit requeues that keep the job's run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

FAKE = Path(__file__).with_name("fake_train.py")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "BDF_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}
    for k in ("BDF_LOG_DIR", "BDF_DEBUG", "FAKE_FAIL_JOBS", "FAKE_USER_ERROR_JOBS", "FAKE_RETURN_NONE", "FAKE_WAIT_DIR"):
        if k not in extra:
            env.pop(k, None)
    return env


def _fake(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE), "-m", *args], capture_output=True, text=True,
                          env=_env(tmp_path, **env), cwd=tmp_path, timeout=300)


def _results(sweep: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))


def _values(sweep: Path) -> dict[int, float]:
    return {int(p.parent.name): json.loads(p.read_text())["value"] for p in sweep.glob("*/result.json")}


def _sweeps(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "logs" / "train" / "multiruns").iterdir())


def test_search_with_a_failed_trial_and_command_line_space(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _fake(["hparams_search=synthetic_optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.n_jobs=2", "loss.temperature=choice(0.04,0.05)", "trainer.max_epochs=1"],
                 tmp_path, FAKE_FAIL_JOBS="1", FAKE_USER_ERROR_JOBS="2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "trial 1 (job 1) failed: RuntimeError: fake failure of job 1; told Optuna FAIL, continuing" in out
    assert "bdf-train: error: fake.key: fake user error in job 2" in out  # the CLI's one-line error ...
    assert "trial 2 (job 2) failed: TrialFailed: the job exited with status 2" in out  # ... fails only its trial
    res = _results(sweep)
    assert res["n_trials"] == 4 and res["n_failed"] == 2 and res["n_complete"] == 2
    assert res["direction"] == "maximize" and res["study_name"] == "synthetic_optuna"
    best = res["best_params"]
    assert set(best) == {"optim.optimizer.lr", "model.hidden", "loss.temperature"}
    assert 1e-4 <= best["optim.optimizer.lr"] <= 3e-3 and best["model.hidden"] in (256, 512, 1024)
    assert best["loss.temperature"] in (0.04, 0.05)  # the command line replaced the preset's interval
    values = _values(sweep)
    assert sorted(values) == [0, 3] and res["best_value"] == max(values.values())
    assert res["best_run_dir"] == str(sweep / str(res["best_trial"]))
    assert "Best" in out or "best parameters" in out
    for job in range(4):  # fixed command-line overrides reach every job
        overrides = OmegaConf.load(sweep / str(job) / ".hydra" / "overrides.yaml")
        assert "trainer.max_epochs=1" in overrides
    rows = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[2].startswith("1,failed,") and rows[3].startswith("2,failed,")
    assert [r.split(",")[0] for r in rows[1:] if ",*," in r] == [str(res["best_trial"])]
    study = optuna.load_study(study_name="synthetic_optuna", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]


def test_search_resumes_from_its_storage(tmp_path):
    """A fixed storage file + study name: each invocation gets a new sweep dir and continues the study."""
    storage = f"sqlite:///{tmp_path}/studies/search.db"
    args = ["hparams_search=synthetic_optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resume",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    first = _fake(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _fake(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing after 2 earlier trials" in second.stdout + second.stderr
    study = optuna.load_study(study_name="resume", storage=storage)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    sweep1, sweep2 = _sweeps(tmp_path)  # default sweep dirs: one per invocation
    assert sorted(_values(sweep1)) == [0, 1] and sorted(_values(sweep2)) == [2, 3]  # job number = trial number
    res = _results(sweep2)
    assert res["n_trials"] == 4 and res["n_trials_this_run"] == 2
    assert res["best_value"] == max([*_values(sweep1).values(), *_values(sweep2).values()])


def test_search_resumes_in_its_sweep_dir(tmp_path):
    """The preset's storage (<sweep dir>/optuna.db): rerunning with the same hydra.sweep.dir continues
    the study there, with new job folders after the old ones."""
    sweep = tmp_path / "sweep"
    args = ["hparams_search=synthetic_optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2"]
    for _ in range(2):
        proc = _fake(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="synthetic_optuna", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 4
    assert sorted(_values(sweep)) == [0, 1, 2, 3]
    assert _results(sweep)["n_trials"] == 4
    assert len((sweep / "sweep_summary.csv").read_text().splitlines()) == 5


def test_non_float_return_names_optimized_metric(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _fake(["hparams_search=synthetic_optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.n_jobs=2"], tmp_path, FAKE_RETURN_NONE="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "not a float" in out and "`optimized_metric`" in out and "optimized_metric=test/brain_to_image_top1" in out
    study = optuna.load_study(study_name="synthetic_optuna", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # none left RUNNING


def test_submitit_requeue_keeps_the_run_dir(tmp_path):
    """Preempt both jobs of a submitit_local Optuna batch (SIGUSR2, as SLURM sends before a time
    limit): submitit requeues them in new processes, and the requeued jobs get the same
    ``<sweep dir>/<job>`` although the sweep dir is ``${now:...}_${bdf_uid:}`` (re-resolved it would
    differ): the master config travels pickled with its resolver cache, and Hydra's
    load_sweep_config copies that cache into each job's config."""
    waits = tmp_path / "waits"
    waits.mkdir()
    args = ["hparams_search=synthetic_optuna", "launcher=submitit_local", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2"]
    proc = subprocess.Popen([sys.executable, str(FAKE), "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(tmp_path, FAKE_WAIT_DIR=str(waits)),
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(list(waits.glob("*.pid"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        pids = sorted(waits.glob("*.pid"))
        assert len(pids) == 2, proc.stdout.read() if proc.poll() is not None else "jobs did not start"
        time.sleep(1.5)  # cross a second boundary: a re-resolved ${now:} would change
        for p in pids:
            os.kill(int(p.read_text()), signal.SIGUSR2)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (sweep,) = _sweeps(tmp_path)
    for job in (0, 1):
        attempts = (sweep / str(job) / "attempts.txt").read_text().split("\n")[:-1]
        assert len(attempts) == 2, attempts  # the preempted attempt and the requeued one
        (pid1, dir1), (pid2, dir2) = (a.split(" ", 1) for a in attempts)
        assert pid1 != pid2 and dir1 == dir2 == str(sweep / str(job))
    logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
    assert len(logs) == 2 and all("Requeued job" in t and "Job completed successfully" in t for t in logs)
    assert _results(sweep)["n_complete"] == 2
    assert (sweep / "sweep_summary.csv").read_text().count(",ok,") == 2


@pytest.mark.parametrize("bad, needle", [("hydra.sweeper.direction=up", "direction"),
                                         ("optim.optimizer.lr=interval(1,0)", "search space")])
def test_config_errors_are_clear(tmp_path, bad, needle):
    proc = _fake(["hparams_search=synthetic_optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  "hydra.sweeper.n_trials=1", bad], tmp_path)
    assert proc.returncode != 0 and needle in proc.stdout + proc.stderr
