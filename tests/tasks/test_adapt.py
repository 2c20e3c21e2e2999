"""bdf-adapt on the tiny world: MindBridge trained on subj01 and subj03, subj02 added from one session with
reset-tuning; frozen parts unchanged, budget respected, checkpoint reusable; one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from braindecode_fw.data.store import open_store
from tests.conftest import TINY_MODEL, TINY_WORLD, run_cli
from tests.tasks.test_cli import _assert_one_line_error

MB_TINY = ["experiment=mindbridge_synthetic", "model.adapter.pool_size=32", "model.adapter.bottleneck=4",
           "model.builder.bottleneck=4", "logger=csv", "reconstruction.enabled=false"]


@pytest.mark.slow
def test_adapt_new_subject_reset_tuning(tmp_path):
    # MindBridge adapts from a multi-subject model (the cycle loss needs a source subject's builder)
    three = [*TINY_WORLD, "dataset.world.voxels_per_subject=[60,90,70]"]
    train = run_cli("bdf-train", [*three, *TINY_MODEL, *MB_TINY, "data.subjects=[subj01,subj03]"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    src = train.stdout.split("checkpoint    :")[1].split()[0]
    args = [f"ckpt={src}", "subject=subj02", "budget.sessions=1", "adaptation=reset_tuning", "trainer.max_epochs=2",
            "logger=csv", "batch_size=16"]
    proc = run_cli("bdf-adapt", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "subj02" in proc.stdout.split("Retrieval on held-out")[1] and "subj01  " not in proc.stdout
    store = open_store(tmp_path / "data" / "prepared" / "synthetic")
    t = store.subjects["subj02"].trials
    train_rows = t.split == "train"
    first = np.unique(t.session[train_rows])[0]
    n_budget = int((train_rows & (t.session == first)).sum())
    assert f"adapting to subj02: {n_budget} training trials (1 sessions), sources ['subj01', 'subj03']" in proc.stdout + proc.stderr
    ckpt = proc.stdout.split("checkpoint    :")[1].split()[0]
    assert Path(ckpt).exists()
    before = torch.load(src, weights_only=True)["state_dict"]
    after = torch.load(ckpt, weights_only=True)
    assert after["braindecode_fw"]["n_features"] == {"subj01": 60, "subj03": 70, "subj02": 90}
    assert after["braindecode_fw"]["config"]["adaptation"]["subject"] == "subj02"
    shared = [k for k in before if "subj02" not in k]
    assert shared and all(torch.equal(before[k], after["state_dict"][k]) for k in shared)  # frozen
    new = [k for k in after["state_dict"] if ".subj02." in k]
    assert any(k.startswith("decoder.builder.builders.subj02.") for k in new)
    assert any(k.startswith("decoder.adapter.embedders.subj02.") for k in new)
    # the trials learned from, and the comparison with the pretrained subject
    run_dir = Path(ckpt).parents[1]
    table = np.genfromtxt(run_dir / "adaptation_trials.tsv", delimiter="\t", names=True, dtype=None, encoding="utf-8")
    assert set(table["session"].tolist()) == {first} and int((table["split"] == "train").sum()) == n_budget
    report = (run_dir / "adaptation_report.md").read_text()
    assert "| subj01 | pretrained | all |" in report and "| subj02 | adapted | 1 sessions |" in report
    # the adapted checkpoint is an ordinary one
    ev = run_cli("bdf-evaluate", [f"ckpt={ckpt}"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]

    again = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj01", "trainer.max_epochs=1"], tmp_path)
    _assert_one_line_error(again, "subject: subj01 is already in the checkpoint (subjects ['subj01', 'subj03'])")
    ridge = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj02", "adaptation=finetune_all", "trainer.max_epochs=1"],
                 tmp_path)
    _assert_one_line_error(ridge, "adaptation.init_bias_from: only a linear (ridge) adapter has a bias to copy")
    ridge = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj02", "adaptation.init=ridge", "trainer.max_epochs=1"],
                 tmp_path)
    _assert_one_line_error(ridge, "adaptation.init: ridge needs a linear (ridge) adapter, the model has "
                                  "PooledSubjectEmbedder")


@pytest.mark.slow
def test_adapt_ridge_initialisation_from_a_trial_budget(tiny_subj01_run, tmp_path):
    """`adaptation.init=ridge` solves the new linear adapter in closed form before training;
    a `trials` budget keeps exactly that many training trials."""
    train, _ = tiny_subj01_run  # the tiny model on subj01, 2 epochs; shared with test_brainit_train
    assert train.returncode == 0, train.stderr[-3000:]
    src = train.stdout.split("checkpoint    :")[1].split()[0]
    proc = run_cli("bdf-adapt", [f"ckpt={src}", "subject=subj02", "budget.sessions=null", "budget.trials=40",
                              "adaptation.init=ridge", "trainer.max_epochs=1", "logger=csv"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "adapting to subj02: 40 training trials (40 trials)" in log
    assert re.search(r"ridge initialisation of subj02: target->hidden alpha \S+ \(\d+ source trials\), "
                     r"voxels->hidden alpha \S+ \(40 trials\)", log)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("trainable", "some", "adaptation.trainable: one of ('new_subject', 'all'), got 'some'"),
    ("sources", "few", "adaptation.sources: one of ('none', 'all'), got 'few'"),
    ("init", "pca", "adaptation.init: one of (None, 'ridge', 'nearest_voxel'), got 'pca'"),
    ("budget.sessions", "0", "budget.sessions: a positive whole number, got 0"),
    ("budget.trials", "5", "budget: give exactly one of ['sessions', 'minutes', 'trials'], got {'sessions': 1, 'trials': 5}"),
])
def test_adaptation_options_are_checked(key, value, message):
    from braindecode_fw.tasks.adapt import adapt
    from tests.conftest import compose_config

    override = f"{key}={value}" if key.startswith("budget.") else f"adaptation.{key}={value}"
    cfg = compose_config("adapt", ["ckpt=x.ckpt", "subject=subj09", override])
    with pytest.raises(ValueError, match=re.escape(message)):
        adapt(cfg)
