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


@pytest.mark.parametrize("name", ["evaluate", "prepare", "bench", "adapt"])
def test_other_primary_configs_compose(name):
    overrides = ["ckpt=x.ckpt"] if name in ("evaluate", "adapt") else []
    overrides += ["subject=subj09"] if name == "adapt" else []
    cfg = compose_config(name, overrides)
    assert cfg.task_name == name


def test_default_objects_instantiate(tmp_path):
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
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    kinds = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
    for name, node in cfg.logger.items():
        assert isinstance(instantiate(node, save_dir=str(tmp_path)), kinds[name])
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


@pytest.mark.parametrize("option", _options("adaptation"))
def test_adaptation_presets_compose(option):
    cfg = compose_config("adapt", ["ckpt=x.ckpt", "subject=subj09", f"adaptation={option}"])
    assert cfg.adaptation.trainable in ("new_subject", "all") and cfg.adaptation.sources in ("none", "all")


@pytest.mark.parametrize(("experiment", "extra"), [("mindbridge_synthetic", []), ("mindeye2_synthetic", []),
                                                   ("mindeye2_nsd", ["convnext_tokens", "vae_latent"]),
                                                   ("mindbridge_nsd", ["clip_text_tokens"]),
                                                   ("sttm_synthetic", ["clip_image", "clip_text"]),
                                                   ("sttm_nsd", ["clip_text"])])
def test_method_experiments_build_their_decoders(experiment, extra):
    """The method recipes compose, name their extra targets, and their decoders build (real-scale
    recipes on the meta device) with the loss's outputs present."""
    import torch

    cfg = compose_config("train", [f"experiment={experiment}"])
    assert sorted(n.feature_name for n in cfg.extra_targets.values()) == extra
    shapes = {"clip_image_tokens": (64, 128), "clip_text_tokens": (16, 128), "vae_latent": (4, 28, 28),
              "clip_image": (128,), "clip_text": (128,), "convnext_tokens": (49, 512)}
    if experiment.endswith("_nsd"):
        shapes["clip_image_tokens"] = (256, 1664) if "mindeye2" in experiment else (257, 768)
        shapes["clip_text_tokens"], shapes["clip_text"] = (77, 768), (768,)
    wanted = {"clip_image_tokens", *extra}
    with torch.device("meta"):
        decoder = instantiate(cfg.model)(n_features={"subj01": 1200, "subj02": 1600},
                                         target_shapes={k: v for k, v in shapes.items() if k in wanted})
        out = decoder(torch.zeros(2, 1600), ["subj01", "subj02"], targets={k: torch.zeros(2, *shapes[k]) for k in wanted})
    objective = instantiate(cfg.loss)
    for name, term in objective.terms.items():
        key = term.output if term.kind != "aux" else f"loss/{term.target or name}"
        assert key in out, (name, key, sorted(out))
        if term.kind != "aux":  # the output (or its selected token) matches the target's shape
            pred = out[key] if term.output_index is None else out[key][:, term.output_index]
            y = torch.zeros(2, *shapes[term.target])
            y = y if term.target_index is None else y[:, term.target_index]
            assert pred.shape == y.shape, (name, pred.shape, y.shape)
