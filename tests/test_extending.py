"""docs/extending.md's worked example runs as written: a lab's own converter, decoder trunk and
loss config in a folder outside the package (docs/examples/lab_extension), used through
``--config-dir`` without editing braindecode_fw."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.tasks.test_cli import _assert_one_line_error, _run

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "lab_extension"
CONF = EXAMPLE / "conf"


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def raw(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    try:
        from my_lab.folder_dataset import write_example_raw_data
    finally:
        sys.path.remove(str(EXAMPLE))
    return write_example_raw_data(tmp_path / "raw")


@pytest.mark.slow
def test_lab_converter_decoder_and_loss_from_their_own_folder(raw, tmp_path):
    proc = _run("bdf-prepare", ["--config-dir", str(CONF), "dataset=lab_folder", f"dataset.root={raw}"],
                tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "subjA: 80 voxels, trials {'train': 90, 'val': 10, 'test': 20}" in proc.stdout
    store = tmp_path / "data" / "prepared" / "lab_folder"
    meta = json.loads((store / "dataset.json").read_text())
    assert meta["subjects"] == ["subjA", "subjB"] and meta["n_images"] == 60

    proc = _run("bdf-train", ["--config-dir", str(CONF), "experiment=lab_gated", "trainer.max_epochs=3"],
                tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "logs" / "train" / "runs").iterdir())
    result = json.loads((run / "result.json").read_text())
    assert 0.0 <= result["metrics"]["test/brain_to_image_top1"] <= 1.0
    ckpt = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert "decoder.encoder.blocks.0.gate.weight" in keys  # the lab's trunk, not the shipped one
    assert ckpt["braindecode_fw"]["config"]["loss"]["terms"]["regression"]["kind"] == "normalized_mse"


def test_lab_converter_errors_name_the_file_and_write_nothing(raw, tmp_path, monkeypatch):
    # in this process (no fresh interpreter importing Lightning for each error): the lab's folder on
    # sys.path stands in for the PYTHONPATH of _env(); the full example above runs as console scripts
    monkeypatch.syspath_prepend(str(EXAMPLE))
    trials = raw / "subjB" / "trials.csv"
    rows = list(csv.reader(trials.open()))
    rows[5][2] = "training"
    with trials.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    proc = run_cli("bdf-prepare", ["--config-dir", str(CONF), "dataset=lab_folder", f"dataset.root={raw}"], tmp_path)
    _assert_one_line_error(proc, "subjB/trials.csv:6: split 'training', expected one of ('train', 'val', 'test')")
    assert not (tmp_path / "data" / "prepared").exists() or not any((tmp_path / "data" / "prepared").iterdir())
    proc = run_cli("bdf-prepare", ["--config-dir", str(CONF), "dataset=lab_folder", f"dataset.root={raw}",
                                "dataset.converter=my_lab.nowhere:convert"], tmp_path)
    _assert_one_line_error(proc, "dataset.converter: cannot import 'my_lab.nowhere'")
    proc = run_cli("bdf-prepare", ["--config-dir", str(CONF), "dataset=lab_folder", f"dataset.root={raw}",
                                "dataset.converter=convert_folder_dataset"], tmp_path)
    _assert_one_line_error(proc, "dataset.converter: expected 'package.module:function', got 'convert_folder_dataset'")


def test_lab_converter_rerun_is_a_noop_and_another_configuration_is_refused(raw, tmp_path, monkeypatch):
    # the example's fingerprint (its keys + the input files' names and sizes) makes a re-run a no-op;
    # other keys are refused, naming them, until dataset.replace=true
    monkeypatch.syspath_prepend(str(EXAMPLE))
    args = ["--config-dir", str(CONF), "dataset=lab_folder", f"dataset.root={raw}"]
    assert run_cli("bdf-prepare", args, tmp_path).returncode == 0
    store = tmp_path / "data" / "prepared" / "lab_folder"
    version = json.loads((store / "dataset.json").read_text())["version"]
    again = run_cli("bdf-prepare", args, tmp_path)
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stderr[-2000:]
    proc = run_cli("bdf-prepare", [*args, "dataset.image_size=32"], tmp_path)
    _assert_one_line_error(proc, f"dataset.store: {store} already holds the lab folder store 'lab_folder' version "
                                 f"{version} prepared from another configuration: dataset.image_size 64 -> 32")
    assert "dataset.replace=true" in proc.stderr and "dataset.name=<new name>" in proc.stderr
    assert json.loads((store / "dataset.json").read_text())["version"] == version
    replaced = run_cli("bdf-prepare", [*args, "dataset.image_size=32", "dataset.replace=true"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((store / "dataset.json").read_text())["image_size"] == 32
