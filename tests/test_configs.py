"""Every config group option composes; the CPU-sized ones instantiate."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.conftest import CONF, TINY_MODEL, TINY_WORLD, compose_config

GROUPS = ["dataset", "data", "target", "model", "loss", "optim", "trainer", "logger", "callbacks", "experiment",
          "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config("train", [f"{group}={option}"])
    assert cfg.task_name == "train"
    if group in ("experiment", "debug"):
        return
    node = cfg[group]
    assert node is not None and len(node) > 0


@pytest.mark.parametrize("name", ["evaluate", "prepare", "bench"])
def test_other_primary_configs_compose(name):
    overrides = ["ckpt=x.ckpt"] if name == "evaluate" else []
    cfg = compose_config(name, overrides)
    assert cfg.task_name == name


def test_default_objects_instantiate():
    cfg = compose_config("train", TINY_WORLD + TINY_MODEL)
    enc = instantiate(cfg.target)
    assert enc.feature_name == "clip_image_tokens" and enc.output_shape == (16, 32)
    decoder = instantiate(cfg.model)(n_features={"subj01": 60, "subj02": 90},
                                     target_shapes={"clip_image_tokens": (16, 32)})
    assert decoder.heads["clip_image_tokens"].target_shape == (16, 32)
    assert instantiate(cfg.loss).temperature == pytest.approx(cfg.loss.temperature)
    opt = instantiate(cfg.optim.optimizer)(params=decoder.parameters())
    sched = instantiate(cfg.optim.scheduler)(optimizer=opt, total_steps=100)
    assert sched.total_steps == 100
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == 2
    for name, node in cfg.logger.items():
        assert type(instantiate(node, save_dir="/tmp")).__name__.lower().startswith(name.replace("_", ""))
    ckpt = instantiate(cfg.callbacks.model_checkpoint)
    assert ckpt.monitor == "val/brain_to_image_top1"


def test_nsd_scale_preset_has_nsd_shapes():
    cfg = compose_config("train", ["dataset=synthetic_nsd_scale"])
    w = cfg.dataset.world
    assert len(w.voxels_per_subject) == 8 and min(w.voxels_per_subject) >= 12000
    assert max(w.voxels_per_subject) <= 18000
    assert w.n_test_images == 1000
    assert (w.n_train_images * w.train_repetitions + w.n_test_images * w.test_repetitions) == 30000
    assert cfg.dataset.store.endswith("synthetic_nsd_scale")
    from omegaconf import OmegaConf

    from braindecode_fw.data.synthetic.world import SyntheticWorldConfig

    world = SyntheticWorldConfig.from_mapping(OmegaConf.to_container(w))  # validates
    assert world.subjects[-1] == "subj08"
    runs = (np.arange(750) * world.runs_per_session) // world.session_length
    assert sorted(set(np.bincount(runs).tolist())) == [62, 63]  # NSD's runs of 62/63 trials
