"""braindecode_fw/conf/launcher presets compose, resolve, and turn into the sbatch script we expect (nothing is submitted)."""

from __future__ import annotations

import os
import stat

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import braindecode_fw.cli  # noqa: F401 - registers the ${bdf_uid:} resolver of hydra.sweep.dir
from tests.conftest import compose_config

SLURM = {  # preset: (gpus_per_node == tasks_per_node == trainer.devices, nodes == trainer.num_nodes, strategy)
    "slurm_1gpu": (1, 1, None),
    "slurm_8gpu": (8, 1, "ddp"),
    "slurm_multinode": (8, 2, "ddp"),
}


@pytest.fixture(autouse=True)
def _reset_hydra_config():
    yield
    HydraConfig.instance().cfg = None  # do not leak this test's ${hydra:...} context into others


def _compose(tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("BDF_ROOT", str(tmp_path))
    monkeypatch.delenv("BDF_LOG_DIR", raising=False)
    cfg = compose_config("train", overrides)
    HydraConfig.instance().set_config(cfg)  # trainer.devices reads ${hydra:launcher...}
    return cfg, OmegaConf.to_container(cfg.hydra.launcher, resolve=True), OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("preset", sorted(SLURM))
def test_slurm_preset_composes(preset, tmp_path, monkeypatch):
    gpus, nodes, strategy = SLURM[preset]
    cfg, launcher, trainer = _compose(tmp_path, monkeypatch, [
        f"launcher={preset}", "hydra.launcher.partition=gpu_a100", "hydra.launcher.account=proj42"])
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert launcher["partition"] == "gpu_a100" and launcher["account"] == "proj42" and launcher["qos"] is None
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == gpus
    assert launcher["nodes"] == nodes
    assert launcher["timeout_min"] >= 60 and launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0
    assert launcher["mem_gb"] and launcher["cpus_per_task"]
    assert launcher["submitit_folder"].startswith(str(tmp_path / "logs" / "train" / "multiruns"))
    assert trainer["accelerator"] == "gpu"
    assert trainer["devices"] == launcher["tasks_per_node"] and trainer["num_nodes"] == launcher["nodes"]
    assert trainer.get("strategy") == strategy


def test_multinode_node_count_follows_the_launcher(tmp_path, monkeypatch):
    _, launcher, trainer = _compose(tmp_path, monkeypatch, ["launcher=slurm_multinode", "hydra.launcher.nodes=4"])
    assert launcher["nodes"] == trainer["num_nodes"] == 4
    assert trainer["devices"] == launcher["tasks_per_node"] == 8


def test_submitit_local_preset(tmp_path, monkeypatch):
    cfg, launcher, trainer = _compose(tmp_path, monkeypatch, ["launcher=submitit_local"])
    assert launcher["_target_"].endswith("submitit_launcher.LocalLauncher")
    assert launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1 and launcher["timeout_min"] <= 60
    assert trainer["devices"] == 1 and trainer["accelerator"] == "auto"  # the trainer is left alone


class _Captured(Exception):
    pass


def test_slurm_preset_sbatch_script(tmp_path, monkeypatch):
    """Run the launcher's own parameter mapping up to submission; check the sbatch lines."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (fake_bin / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    captured = {}

    class Recording(submitit.AutoExecutor):
        def map_array(self, fn, *iterables):
            captured["sbatch"] = self._executor._make_submission_file_text("python -u -m submitit.core._submit", "x")
            captured["max_num_timeout"] = self._executor.max_num_timeout
            raise _Captured

    monkeypatch.setattr(submitit, "AutoExecutor", Recording)
    cfg, _, _ = _compose(tmp_path, monkeypatch, ["launcher=slurm_multinode", "hydra.launcher.partition=gpu_a100",
                                                 "hydra.launcher.qos=high"])
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    node.pop("_target_")
    launcher = SlurmLauncher(**node)
    launcher.config = cfg
    with pytest.raises(_Captured):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    text = captured["sbatch"]
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=gpu_a100", "--qos=high", "--signal=USR2@120", "--time=1440", "--mem=480GB",
                 "--job-name=bdf-train"]:
        assert f"#SBATCH {line}" in text, (line, text)
    assert captured["max_num_timeout"] == 3
