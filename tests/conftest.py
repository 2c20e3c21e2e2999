"""Shared fixtures: a tiny synthetic world in the real store format, Hydra composition helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import braindecode_fw  # noqa: F401  (registers the config resolvers, e.g. ${bdf_demo_weights:})

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "braindecode_fw" / "conf"  # the configs ship inside the package

# Overrides that shrink the synthetic world, the target encoder and the model to seconds on CPU.
TINY_WORLD = [
    "dataset.world.voxels_per_subject=[60,90]",
    "dataset.world.volume_shape=[10,12,10]",
    "dataset.world.image_size=32",
    "dataset.world.feature_resolution=8",
    "dataset.world.n_test_images=24",
    "dataset.world.n_train_images=120",
    "dataset.world.session_length=48",
    "dataset.world.runs_per_session=4",
    "dataset.world.oracle_subset_size=20",
    "dataset.world.oracle_n_subsets=5",
]
TINY_MODEL = [
    # the random token target and the plumbing generator, shrunk (the shipped tiny CLIP and generator
    # are the defaults; tests/demo/ and tests/tasks/test_default_run.py exercise them)
    "target=openclip_tiny",
    "generator=tiny_random",
    "target.model_overrides.vision_cfg.image_size=32",
    "target.model_overrides.vision_cfg.width=32",
    "target.model_overrides.vision_cfg.layers=1",
    "target.model_overrides.embed_dim=16",
    "target.preprocess.image_size=32",
    "model.hidden=32",
    "model.encoder.n_blocks=1",
    "data.batch_size=16",
    "evaluation.subset_size=20",
    "evaluation.n_subsets=5",
    "trainer.max_epochs=2",
    "generator.build_tiny.cross_attention_dim=32",
    "generator.build_tiny.image_size=32",
    "generator.steps=2",
]


def tiny_world_config():
    from braindecode_fw.data.synthetic.world import SyntheticWorldConfig

    return SyntheticWorldConfig(
        voxels_per_subject=[60, 90], volume_shape=[10, 12, 10], image_size=32, feature_resolution=8,
        n_test_images=24, n_train_images=120, session_length=48, runs_per_session=4,
        oracle_subset_size=20, oracle_n_subsets=5,
    )


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A generated tiny synthetic world (2 subjects, 60/90 voxels). Treat as read-only."""
    from braindecode_fw.data.synthetic.world import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(tiny_world_config(), root)
    return root


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> Path:
    """A writable copy of the tiny world, for corrupting."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def compose_config(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)
