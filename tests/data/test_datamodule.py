"""BrainDataModule: balanced epoch-seeded batches, z-scoring, repetition averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import BrainDataModule, SubjectBalancedBatchSampler
from braindecode_fw.data.normalization import fit_session_stats
from braindecode_fw.data.store import open_store


@pytest.fixture
def dm(tiny_store, tmp_path):
    m = BrainDataModule(tiny_store, None, batch_size=10, eval_batch_size=7, cache_dir=tmp_path)
    m.setup()
    return m


def test_balanced_and_epoch_seeded():
    groups = [np.arange(0, 30), np.arange(30, 40), np.arange(40, 100)]
    s = SubjectBalancedBatchSampler(groups, batch_size=9, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == len(s) == 100 // 9
    for b in e0:
        assert [sum(1 for i in b if g[0] <= i <= g[-1]) for g in groups] == [3, 3, 3]
    assert list(s) == e0  # same (seed, epoch): same batches, as after a resume
    s.set_epoch(1)
    assert list(s) != e0
    # the small subject is cycled: each of its items appears before any appears twice
    seen = [i for b in e0 for i in b if 30 <= i < 40]
    assert sorted(seen[:10]) == list(range(30, 40))
    # two ranks split the batches without overlap
    r0 = SubjectBalancedBatchSampler(groups, 9, 3, num_replicas=2, rank=0)
    r1 = SubjectBalancedBatchSampler(groups, 9, 3, num_replicas=2, rank=1)
    assert len(r0) == len(r1) == 5 and list(r0)[0] == e0[0] and list(r1)[0] == e0[1]
    with pytest.raises(ValueError, match="data.batch_size=2 must be >= the number of subjects"):
        SubjectBalancedBatchSampler(groups, 2)


def test_train_batches_zscored_with_training_stats(dm, tiny_store):
    batch = next(iter(dm.train_dataloader()))
    assert batch.subject.count("subj01") == batch.subject.count("subj02") == 5
    assert batch.responses.shape == (10, 90)
    store = open_store(tiny_store)
    for i, s in enumerate(batch.subject):
        sub = store.subjects[s]
        row = np.flatnonzero((sub.trials.image_index == int(batch.image_index[i])) & (sub.trials.split == "train"))
        t = sub.trials
        st = fit_session_stats(np.asarray(sub.responses), t.session, t.split == "train")
        ref = st.apply(np.asarray(sub.responses[row]), t.session[row])[0]
        np.testing.assert_allclose(batch.responses[i, : sub.n_features].numpy(), ref, rtol=1e-5, atol=1e-5)
        assert (batch.responses[i, sub.n_features :] == 0).all()  # padding
    # training statistics only: the z-scored training trials of a session have mean 0
    sub = store.subjects["subj01"]
    t = sub.trials
    z = dm.stats["subj01"].apply(np.asarray(sub.responses), t.session)
    sel = (t.session == 1) & (t.split == "train")
    np.testing.assert_allclose(z[sel].mean(0), 0, atol=1e-4)
    assert abs(z[(t.session == 1) & (t.split == "test")].mean()) > 1e-4


def test_test_items_average_repetitions(dm):
    ds = dm.repeated_dataset("test")
    assert len(ds) == 2 * 24 and ds.rows.shape[1] == 3 and (ds.rows >= 0).all()
    item = ds.__getitems__([0, 30])
    sub_rows = ds.rows[0]
    reader = dm.readers[0]
    ref = reader.read(sub_rows, zscore=True).mean(0)
    np.testing.assert_allclose(item.responses[0, :60].numpy(), ref, rtol=1e-5, atol=1e-6)
    dm.repeat_averaging = "outputs"
    ds2 = dm.repeated_dataset("test")
    item2 = ds2.__getitems__([0, 30])
    assert item2.responses.shape == (2, 3, 90) and item2.repeat_mask.all()
    torch.testing.assert_close(item2.responses[0].mean(0)[:60], item.responses[0, :60])


def test_unknown_subject(tiny_store, tmp_path):
    m = BrainDataModule(tiny_store, None, subjects=["subj01", "subj09"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data.subjects: unknown subject\(s\) \['subj09'\]"):
        m.setup()


def test_bad_repeat_averaging(tiny_store):
    with pytest.raises(ValueError, match="data.repeat_averaging"):
        BrainDataModule(tiny_store, None, repeat_averaging="median")


def test_pickles_without_copying_memmaps(dm):
    import pickle

    ds, _ = dm._trial_dataset("train")
    ds.__getitems__([0])  # open the memory maps
    blob = pickle.dumps(ds)
    assert len(blob) < 2_000_000
    assert all(r._arr is None for r in pickle.loads(blob).readers)


def test_session_budget_and_eval_subjects(tiny_store, tmp_path):
    """`train_budget` keeps a subject's first k sessions (training and validation trials);
    `eval_subjects` restricts validation and test; bad budgets name the key."""
    store = open_store(tiny_store)
    t = store.subjects["subj02"].trials
    train = t.split == "train"
    first_two = np.unique(t.session)[:2]
    dm = BrainDataModule(tiny_store, None, batch_size=8, train_budget={"subj02": {"sessions": 2}},
                         eval_subjects=["subj02"], cache_dir=tmp_path)
    dm.setup()
    counts = dm.trial_counts("train")
    assert counts["subj02"] == int((train & np.isin(t.session, first_two)).sum()) < int(train.sum())
    assert counts["subj01"] == int((store.subjects["subj01"].trials.split == "train").sum())  # no budget
    seen = set()
    for batch in dm.train_dataloader():
        for s, i in zip(batch.subject, batch.image_index.tolist(), strict=True):
            if s == "subj02":
                seen.add(i)
    allowed = set(t.image_index[train & np.isin(t.session, first_two)].tolist())
    assert seen and seen <= allowed
    assert set(next(iter(dm.test_dataloader())).subject) == {"subj02"}
    assert dm.trial_counts("val") == {"subj02": int(((t.split == "val") & np.isin(t.session, first_two)).sum())}
    saved = dm.budget_trials()["subj02"]
    assert set(saved["session"].tolist()) <= set(first_two.tolist()) and set(saved["split"].tolist()) == {"train", "val"}
    assert len(saved["row"]) == counts["subj02"] + dm.trial_counts("val")["subj02"]
    with pytest.raises(ValueError, match=r"data.train_budget: subject\(s\) \['subj09'\] are not among"):
        BrainDataModule(tiny_store, None, train_budget={"subj09": {"sessions": 1}}, cache_dir=tmp_path).setup()
    with pytest.raises(ValueError, match=r"data.train_budget.subj01.sessions: a positive whole number, got 0"):
        BrainDataModule(tiny_store, None, train_budget={"subj01": {"sessions": 0}}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data.train_budget.subj01: give exactly one of \['sessions', 'minutes', "
                                         r"'trials'\], got \{'sessions': 1, 'trials': 5\}"):
        BrainDataModule(tiny_store, None, train_budget={"subj01": {"sessions": 1, "trials": 5}}, cache_dir=tmp_path)


def test_trial_and_minute_budgets_follow_presentation_order(tiny_store, tmp_path):
    """`trials: n` = the first n training trials in presentation order; `minutes: m` = every trial
    of the first m·60/trial_seconds presented; validation stops at the same point."""
    t = open_store(tiny_store).subjects["subj01"].trials
    order = np.lexsort((np.arange(len(t)), t.run, t.session))  # independent of the module
    train_in_order = order[t.split[order] == "train"]
    dm = BrainDataModule(tiny_store, None, train_budget={"subj01": {"trials": 7}}, cache_dir=tmp_path)
    dm.setup()
    saved = dm.budget_trials()["subj01"]
    assert sorted(saved["row"][saved["split"] == "train"].tolist()) == sorted(train_in_order[:7].tolist())
    last = int(np.flatnonzero(order == train_in_order[6])[0])
    assert set(saved["row"].tolist()) == {int(r) for r in order[: last + 1] if t.split[r] in ("train", "val")}
    assert dm.trial_counts("train")["subj01"] == 7
    dm = BrainDataModule(tiny_store, None, train_budget={"subj01": {"minutes": 1.5}}, trial_seconds=6,
                         cache_dir=tmp_path)  # 15 trials presented
    dm.setup()
    first = order[:15]
    assert dm.trial_counts("train")["subj01"] == int((t.split[first] == "train").sum())


def _vgg(name: str):
    from braindecode_fw.targets.multiscale import VggMultiScaleTokenEncoder

    return VggMultiScaleTokenEncoder(weights="random:0", feature_name=name, image_size=16, batch_size=4)


def test_online_targets_equal_cached_ones(tiny_store, tmp_path):
    """An online target (encoded on the batch's device after transfer) equals the same encoder's
    cached target, batch by batch; nothing is cached for it; stored-target readers refuse it."""
    m = BrainDataModule(tiny_store, _vgg("vgg_cached"), extra_target_encoders=[_vgg("vgg_tokens")],
                        online_targets=["vgg_tokens"], batch_size=6, eval_batch_size=5, cache_dir=tmp_path)
    m.setup()
    assert m.target_shapes["vgg_tokens"] == m.target_shapes["vgg_cached"] == (8**2 + 7**2 + 4**2 + 2**2 + 1, 512)  # 16 px
    assert sorted(p.name for p in tmp_path.rglob("*.npy")) == [p.name for p in tmp_path.rglob("vgg_cached-*.npy")]
    store = open_store(tiny_store)
    for loader in (m.train_dataloader(), m.val_dataloader(), m.test_dataloader()):
        batch = next(iter(loader))
        assert "vgg_tokens" not in batch.targets and batch.images.dtype == torch.uint8
        np.testing.assert_array_equal(batch.images.numpy(), np.asarray(store.images)[batch.image_index.numpy()])
        batch = m.on_after_batch_transfer(batch, 0)  # the Lightning hook
        torch.testing.assert_close(batch.targets["vgg_tokens"], batch.targets["vgg_cached"], rtol=1e-4, atol=1e-4)
    import pickle

    ds, _ = m._trial_dataset("train")
    ds.__getitems__([0])  # opens the image memory map; workers get its path, not a copy of the images
    assert ds.stimuli._arr is not None and len(pickle.dumps(ds.stimuli)) < 10_000
    assert pickle.loads(pickle.dumps(ds.stimuli))._arr is None
    with pytest.raises(ValueError, match="target_statistics: target 'vgg_tokens' is computed online"):
        m.target_statistics("vgg_tokens")
    with pytest.raises(ValueError, match="subject_arrays: target 'vgg_tokens' is computed online"):
        m.subject_arrays("subj01", "vgg_tokens")
    # without online targets, batches carry no images
    plain = BrainDataModule(tiny_store, _vgg("vgg_cached"), batch_size=6, cache_dir=tmp_path)
    plain.setup()
    assert next(iter(plain.train_dataloader())).images is None


def test_online_target_errors(tiny_store, tmp_path):
    with pytest.raises(ValueError, match=r"data.online_targets: \['vgg_x'\] are not targets of this run"):
        BrainDataModule(tiny_store, _vgg("vgg_cached"), online_targets=["vgg_x"], cache_dir=tmp_path).setup()
    with pytest.raises(ValueError, match="the primary target 'vgg_cached' is scored by retrieval"):
        BrainDataModule(tiny_store, _vgg("vgg_cached"), online_targets=["vgg_cached"], cache_dir=tmp_path).setup()
