"""Brain-IT end to end on the tiny world (docs/methods/brainit.md §2–3, §7): bdf-train runs stage 0
(universal encoder + shared voxel clusters, saved with the run and scored against the simulator),
a second run reuses that stage 0, and bdf-adapt transfers to a new subject by training only its
voxel embeddings, started from its nearest reference voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from braindecode_fw.models.voxel_clusters import VoxelClusters
from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli
from tests.tasks.test_cli import _assert_one_line_error

BRAINIT_TINY = [
    # both branches on the shipped tiny CLIP's embedding and online VGG tokens; stage 0 on a shrunk
    # random ViT's tokens
    *[o for o in TINY_MODEL if not o.startswith(("model.", "target", "generator"))],
    "experiment=brainit_synthetic_lowlevel", "model.dim=16", "model.heads=2", "model.depth=1", "model.n_clusters=4",
    "model.voxels_per_step=40", "model.universal_encoder.dim=8", "model.universal_encoder.embed_dim=8",
    "model.stage0.epochs=2", "model.stage0.voxels_per_sample=40", "model.stage0.covariance_type=diag",
    "extra_targets.tokens.model_overrides.vision_cfg.image_size=32",
    "extra_targets.tokens.model_overrides.vision_cfg.width=32",
    "extra_targets.tokens.model_overrides.vision_cfg.layers=1", "extra_targets.tokens.model_overrides.embed_dim=16",
    "extra_targets.tokens.preprocess.image_size=32",
    "logger=csv", "reconstruction.enabled=false",
]


def _checkpoint(proc) -> str:
    return proc.stdout.split("checkpoint    :")[1].split()[0]


@pytest.mark.slow
def test_brainit_stage0_train_reuse_and_transfer(tmp_path):
    train = run_cli("bdf-train", [*TINY_WORLD, *BRAINIT_TINY, "data.subjects=[subj01]"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    src = _checkpoint(train)
    run_dir = Path(src).parents[1]
    stage0 = run_dir / "stage0"
    clusters = VoxelClusters.load(stage0 / "voxel_clusters.npz")
    assert clusters.subjects == ["subj01"] and clusters.n_clusters == 4 and len(clusters.labels["subj01"]) == 60
    report = __import__("json").loads((stage0 / "report.json").read_text())
    assert len(report["history"]) == 2 and "val_voxel_r_mean" in report
    agreement = report["functional_agreement"]  # scored against the simulator's functional labels
    assert {"ari", "random_ari", "anatomical_ari"} <= set(agreement)
    state = torch.load(src, weights_only=True)["state_dict"]
    labels = state["decoder.branches.semantic.labels_subj01"]
    # the low-level branch trained on online VGG tokens (565 × 512 at 32 px), never cached
    assert state["decoder.branches.lowlevel.queries"].shape == (565, 16)
    assert state["decoder.branches.semantic.queries"].shape == (1, 16)  # the tiny CLIP embedding, one query
    assert not list(tmp_path.rglob("vgg_tokens-*.npy"))
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/lowlevel" in header and "val/loss" in header
    assert torch.equal(labels, torch.from_numpy(clusters.labels["subj01"]))  # the checkpoint carries them
    # the universal encoder was frozen after stage 0: BIT training did not move it
    saved_encoder = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(stage0 / "universal_encoder.safetensors"))
    for k, v in saved_encoder.items():
        torch.testing.assert_close(state[f"decoder.universal_encoder.{k}"], v, msg=k)

    # continuing the run (ckpt_path=last) keeps the stage 0 it started with
    resumed = run_cli("bdf-train", [*TINY_WORLD, *BRAINIT_TINY, "data.subjects=[subj01]", "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "universal encoder epoch" not in resumed.stdout + resumed.stderr
    np.testing.assert_array_equal(VoxelClusters.load(stage0 / "voxel_clusters.npz").labels["subj01"],
                                  clusters.labels["subj01"])
    assert len(__import__("json").loads((stage0 / "report.json").read_text())["history"]) == 2

    # a second run reuses the saved stage 0 instead of training it again
    again = run_cli("bdf-train", [*TINY_WORLD, *BRAINIT_TINY, "data.subjects=[subj01]", "trainer.max_epochs=1",
                               f"model.stage0.load_from={stage0}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "universal encoder epoch" not in again.stdout + again.stderr
    state2 = torch.load(_checkpoint(again), weights_only=True)["state_dict"]
    assert torch.equal(state2["decoder.branches.semantic.labels_subj01"], labels)

    # transfer: new voxel embeddings only, nearest-voxel start
    proc = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj02", "budget.sessions=1", "adaptation=brainit_transfer",
                              "adaptation.nearest_voxel.encoder_epochs=2", "trainer.max_epochs=1", "logger=csv",
                              "batch_size=16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Brain-IT transfer of subj02" in proc.stdout + proc.stderr
    after = torch.load(_checkpoint(proc), weights_only=True)["state_dict"]
    new_labels = after["decoder.branches.semantic.labels_subj02"]
    assert new_labels.shape == (90,) and 0 <= int(new_labels.min()) and int(new_labels.max()) < 4
    # every subj02 voxel inherited the cluster of a subj01 voxel: only labels subj01 has occur
    assert set(new_labels.tolist()) <= set(labels.tolist())
    shared = [k for k in state if "subj02" not in k and not k.startswith("decoder.universal_encoder.")]
    assert shared and all(torch.equal(state[k], after[k]) for k in shared)  # everything shared is frozen
    assert "decoder.branches.semantic.voxels.embeddings.subj02" in after
    ev = run_cli("bdf-evaluate", [f"ckpt={_checkpoint(proc)}"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]

    wrong = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj02", "adaptation=brainit_transfer",
                               "adaptation.init_bias_from=subj01", "trainer.max_epochs=1"], tmp_path)
    _assert_one_line_error(wrong, "adaptation.init_bias_from: Brain-IT has no adapter bias")


@pytest.mark.slow
def test_nearest_voxel_init_needs_brainit(tiny_subj01_run, tmp_path):
    train, _ = tiny_subj01_run  # any non-Brain-IT model of subj01 (2 epochs; shared with test_adapt)
    assert train.returncode == 0, train.stderr[-3000:]
    proc = run_cli("bdf-adapt", [f"ckpt={_checkpoint(train)}", "subject=subj02", "adaptation.init=nearest_voxel",
                              "trainer.max_epochs=1"], tmp_path)
    _assert_one_line_error(proc, "adaptation.init: nearest_voxel is Brain-IT's transfer (model=brainit)")


def test_stage0_load_errors(tmp_path):
    from braindecode_fw.models import brainit_stage0
    from braindecode_fw.models.brainit import build_brainit_decoder

    decoder = build_brainit_decoder({"subj01": 6}, {"clip_image_tokens": (3, 4)},
                                    branches={"semantic": {"target": "clip_image_tokens"}, "lowlevel": None},
                                    dim=8, heads=2, depth=1, n_clusters=2, stage0={"features": "clip_image_tokens"},
                                    universal_encoder={"dim": 4, "embed_dim": 4})
    other = VoxelClusters(labels={"subj09": np.zeros(6, dtype=np.int64)}, centers=np.zeros((2, 4), np.float32),
                          embeddings={}, n_clusters=2)
    other.save(tmp_path / "voxel_clusters.npz")
    with pytest.raises(KeyError, match="has no clusters for subject 'subj01'; it covers \\['subj09'\\]"):
        brainit_stage0.load(decoder, tmp_path)
    three = VoxelClusters(labels={"subj01": np.zeros(6, dtype=np.int64)}, centers=np.zeros((3, 4), np.float32),
                          embeddings={}, n_clusters=3)
    three.save(tmp_path / "voxel_clusters.npz")
    with pytest.raises(ValueError, match="has 3 clusters, model.n_clusters is 2"):
        brainit_stage0.load(decoder, tmp_path)
    with pytest.raises(ValueError, match=r"model.branches.semantic.target: 'missing' must be a token target"):
        build_brainit_decoder({"subj01": 6}, {"clip_image_tokens": (3, 4)},
                              branches={"semantic": {"target": "missing"}})
    with pytest.raises(ValueError, match=r"token_sampling: the scales hold 7190 tokens"):
        build_brainit_decoder({"subj01": 6}, {"vgg_tokens": (100, 4)},
                              branches={"lowlevel": {"target": "vgg_tokens",
                                                     "token_sampling": {"image_size": 112, "per_scale": [1] * 5}}})


def test_stage0_features_must_be_stored():
    from types import SimpleNamespace

    from braindecode_fw.models import brainit_stage0
    from braindecode_fw.models.brainit import build_brainit_decoder

    decoder = build_brainit_decoder({"subj01": 6}, {"clip_image_tokens": (3, 4)},
                                    branches={"semantic": {"target": "clip_image_tokens"}},
                                    dim=8, heads=2, depth=1, n_clusters=2, stage0={"features": "clip_image_tokens"},
                                    universal_encoder={"dim": 4, "embed_dim": 4})
    dm = SimpleNamespace(target_shapes={"clip_image_tokens": (3, 4)}, online_targets=["clip_image_tokens"])
    with pytest.raises(ValueError, match="model.stage0.features: 'clip_image_tokens' is computed online"):
        brainit_stage0.configure(decoder, dm, {"features": "clip_image_tokens"})
