"""Console scripts: one-line errors for bad input, and a tiny train -> checkpoint -> evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli

BIN = Path(sys.executable).parent


def _run(cmd: str, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BDF_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    env.pop("BDF_DEBUG", None)
    exe = BIN / cmd if (BIN / cmd).exists() else shutil.which(cmd)
    assert exe, f"{cmd} is not installed (pip install -e .)"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("bdf-")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_dataset_root(tmp_path):
    proc = _run("bdf-train", [f"dataset.store={tmp_path}/nowhere", "dataset.auto_prepare=false"], tmp_path)
    _assert_one_line_error(proc, "bdf-train: error:", "dataset.store: prepared store not found at",
                           "nowhere", "bdf-prepare dataset=synthetic")
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a failed run left a stub run folder"


def test_typo_config_key(tmp_path):
    proc = _run("bdf-train", ["optim.optimizer.lrr=0.1"], tmp_path)
    _assert_one_line_error(proc, "unknown config key 'optim.optimizer.lrr'",
                           "did you mean 'optim.optimizer.lr'?")


def test_unknown_group_option(tmp_path):
    proc = _run("bdf-train", ["model=residual_mpl"], tmp_path)
    _assert_one_line_error(proc, "model/residual_mpl", "residual_mlp")


def test_typo_in_constructor_argument(tmp_path, store_copy):
    proc = run_cli("bdf-train", [*_store_args(store_copy), "+loss.temprature=1"], tmp_path)
    _assert_one_line_error(proc, "cannot build", "braindecode_fw.losses.", "temprature")


def _store_args(store):
    return [f"dataset.store={store}", "dataset.auto_prepare=false", *TINY_WORLD, *TINY_MODEL]


def test_unknown_subject(tmp_path, store_copy):
    proc = run_cli("bdf-train", [*_store_args(store_copy), "data.subjects=[subj01,subj09]"], tmp_path)
    _assert_one_line_error(proc, "data.subjects: unknown subject(s) ['subj09']")


def test_corrupted_responses(tmp_path, store_copy):
    p = store_copy / "subjects/subj02/responses.npy"
    p.write_bytes(p.read_bytes()[:200])
    proc = run_cli("bdf-train", _store_args(store_copy), tmp_path)
    _assert_one_line_error(proc, "invalid prepared store", "subjects/subj02/responses.npy: cannot be read")


def test_mismatched_shapes(tmp_path, store_copy):
    p = store_copy / "subjects/subj01/responses.npy"
    np.save(p, np.load(p)[:-5])
    proc = run_cli("bdf-train", _store_args(store_copy), tmp_path)
    _assert_one_line_error(proc, "subjects/subj01/trials.tsv: 192 trials but responses.npy has 187 rows")


def test_nan_responses(tmp_path, store_copy):
    p = store_copy / "subjects/subj01/responses.npy"
    r = np.load(p)
    r[3, 4] = np.nan
    np.save(p, r)
    proc = run_cli("bdf-train", _store_args(store_copy), tmp_path)
    _assert_one_line_error(proc, "subjects/subj01/responses.npy: contains 1 NaN/Inf values")


@pytest.mark.slow
def test_train_checkpoint_evaluate_round_trip(tiny_train_run, tmp_path):
    proc, _ = tiny_train_run  # bdf-train [*TINY_WORLD, *TINY_MODEL, "logger=csv"], shared with test_reconstruct
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "brain→image top-1" in out and "oracle b→i" in out and "dashboard" not in out
    run_dir = Path(out.split("run directory :")[1].split()[0])
    ckpt = Path(out.split("checkpoint    :")[1].split()[0])
    assert ckpt.exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "config_resolved.yaml").exists()
    assert (run_dir / "csv" / "metrics.csv").exists()
    from PIL import Image

    grid = Image.open(run_dir / "reconstructions_grid.png")  # the tiny generator's preview after training
    assert grid.size == (2 + 2 * 98, 14 + 8 * 98 + 2) and "reconstructions: " in out
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)  # safe loading works
    assert loaded["braindecode_fw"]["n_features"] == {"subj01": 60, "subj02": 90}
    # bdf-train trained with the fast path's fused AdamW (braindecode_fw/pipeline/fast_path.py)
    assert {g["fused"] for g in loaded["optimizer_states"][0]["param_groups"]} == {True}
    trained = json.loads((run_dir / "retrieval.json").read_text())
    rows = {r["subject"]: r for r in trained["rows"]}
    assert set(rows) == {"subj01", "subj02", "mean"}
    assert rows["mean"]["chance_top1"] == pytest.approx(1 / 20)
    assert 0 < rows["mean"]["oracle_brain_to_image_top1"] <= 1

    ev = run_cli("bdf-evaluate", [f"ckpt={ckpt}", "retrieval.subset_size=20", "retrieval.n_subsets=5"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-4000:]
    ev_dir = Path(ev.stdout.split("results: ")[1].split()[0])
    again = json.loads((ev_dir / "retrieval.json").read_text())
    assert again["rows"] == trained["rows"]  # the checkpoint reproduces the training-time evaluation
    csv_text = (ev_dir / "retrieval.csv").read_text().splitlines()
    assert csv_text[0].startswith("subject,n_test_images,brain_to_image_top1")
    assert len(csv_text) == 4

    bad = run_cli("bdf-evaluate", [f"ckpt={tmp_path}/missing.ckpt"], tmp_path)
    _assert_one_line_error(bad, "ckpt: checkpoint not found")


def test_prepare_reports_ncsnr_and_oracle(tmp_path):
    from braindecode_fw.data.store import open_store

    store = tmp_path / "world"
    proc = run_cli("bdf-prepare", [*TINY_WORLD, f"dataset.store={store}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ncsnr p5/p50/p95 (measured, NSD formula)" in proc.stdout
    assert "mean oracle top-1: brain→image" in proc.stdout and f"prepared store: {store}" in proc.stdout
    opened = open_store(store)
    med = float(np.median(opened.subjects["subj01"].load_array("ncsnr")))
    assert f"{med:.3f}" in proc.stdout.splitlines()[1]


def test_wrong_optimized_metric(tmp_path, store_copy):
    proc = run_cli("bdf-train", [*_store_args(store_copy), "logger=csv", "optimized_metric=test/accuracy"], tmp_path)
    _assert_one_line_error(proc, "optimized_metric: 'test/accuracy' was not produced; available:",
                           "test/brain_to_image_top1")


def _user_config_folder(root: Path) -> Path:
    """A lab's own config folder: a new model option and an experiment using it (nothing edited in
    the package)."""
    conf = root / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "wide_mlp.yaml").write_text(
        "defaults:\n  - residual_mlp\n  - _self_\nhidden: 96\n")
    (conf / "experiment" / "lab_run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: wide_mlp\ntrainer:\n  max_epochs: 3\n")
    return conf


def test_user_config_dir_adds_experiments_and_models(tmp_path):
    conf = _user_config_folder(tmp_path)
    for flag in (["--config-dir", str(conf)], [f"hydra.searchpath=[file://{conf}]"]):
        proc = _run("bdf-train", [*flag, "experiment=lab_run", "--cfg", "job", "--resolve"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        import yaml

        cfg = yaml.safe_load(proc.stdout)
        assert cfg["trainer"]["max_epochs"] == 3 and cfg["model"]["hidden"] == 96
        assert cfg["model"]["encoder"]["_target_"] == "braindecode_fw.models.encoders.ResidualMLP"
    # the pre-check sees the user's folder too: a typo there is still one line with a suggestion
    proc = _run("bdf-train", ["--config-dir", str(conf), "experiment=lab_run", "model.hiden=3"], tmp_path)
    _assert_one_line_error(proc, "unknown config key 'model.hiden'", "did you mean 'model.hidden'?")
    proc = _run("bdf-train", ["--config-dir", str(tmp_path / "nope"), "experiment=lab_run"], tmp_path)
    _assert_one_line_error(proc, "--config-dir: folder not found:", "nope")
    proc = _run("bdf-train", ["experiment=lab_run"], tmp_path)  # without the folder: not found, options listed
    _assert_one_line_error(proc, "experiment/lab_run", "synthetic_smoke")


def test_config_tree_ships_inside_the_package():
    """Every config is under the package (so a wheel carries it) and declared as package data."""
    import tomllib

    import braindecode_fw
    from braindecode_fw.cli import CONF_DIR

    pkg = Path(braindecode_fw.__file__).parent
    assert CONF_DIR == pkg / "conf" and (CONF_DIR / "train.yaml").is_file()
    repo = pkg.parent
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["braindecode_fw"]
    shipped = {p for g in globs for p in pkg.glob(g)}
    on_disk = {p for p in CONF_DIR.rglob("*") if p.is_file()}
    assert on_disk and on_disk == shipped, sorted(str(p) for p in on_disk ^ shipped)


@pytest.mark.parametrize(("args", "needle"), [
    (["dataset.world.seed=abc"], "dataset.world.seed: expected an integer, got 'abc'"),
    (["dataset=nsd", "dataset.chunk_trials=abc"], "dataset.chunk_trials: expected an integer, got 'abc'"),
    (["dataset=nsd", "dataset.chunk_trials=-5"], "dataset.chunk_trials: expected an integer >= 1, got -5"),
])
def test_prepare_wrong_type_or_range_is_a_one_line_error(tmp_path, args, needle):
    # braindecode_fw/schema.py checks every field of the config dataclasses before any work starts
    store = tmp_path / "store"
    proc = run_cli("bdf-prepare", [*args, f"dataset.store={store}"], tmp_path)
    _assert_one_line_error(proc, "bdf-prepare: error:", needle)
    assert not store.exists()


@pytest.mark.parametrize("cmd,args,needle", [
    ("bdf-train", ["trainer.max_epochs=abc"], "trainer.max_epochs: expected an integer or null, got 'abc'"),
    ("bdf-train", ["trainer.max_epochs=0"], "trainer.max_epochs: expected an integer or null >= 1, got 0"),
    ("bdf-train", ["optim.optimizer.lr=fast"], "optim.optimizer.lr: expected a number, got 'fast'"),
    ("bdf-train", ["optim.optimizer.lr=-1e-3"], "optim.optimizer.lr: expected a number > 0, got -0.001"),
    ("bdf-train", ["data.batch_size=0"], "data.batch_size: expected an integer >= 1, got 0"),
    ("bdf-train", ["evaluation.subset_size=abc"], "evaluation.subset_size: expected an integer, got 'abc'"),
    ("bdf-train", ["optimized_metric=brain_to_image_top1"],
     "optimized_metric: 'brain_to_image_top1' is not a metric a job reports; those start with 'test/' or 'val/'"),
    ("bdf-evaluate", ["retrieval.subset_size=1", "ckpt=x.ckpt"], "retrieval.subset_size: expected an integer >= 2, got 1"),
    ("bdf-reconstruct", ["n_samples=0", "ckpt=x.ckpt"], "n_samples: expected an integer >= 1, got 0"),
])
def test_core_keys_wrong_type_or_range_before_any_work(tmp_path, cmd, args, needle):
    """braindecode_fw/schema.py CORE_KEYS: checked right after composition, so no data is prepared
    and no run folder is created."""
    proc = _run(cmd, args, tmp_path)
    _assert_one_line_error(proc, f"{cmd}: error:", needle)
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()
