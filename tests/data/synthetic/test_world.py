"""The synthetic world: determinism and the properties docs/architecture.md §5 promises."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.data.store import open_store
from braindecode_fw.data.synthetic import scenes
from braindecode_fw.data.synthetic.world import SyntheticWorldConfig, generate_world
from tests.conftest import tiny_world_config


def test_deterministic_from_seed(tiny_store, tmp_path):
    generate_world(tiny_world_config(), tmp_path / "again")
    a, b = open_store(tiny_store), open_store(tmp_path / "again")
    assert a.version == b.version
    np.testing.assert_array_equal(a.images, b.images)
    for s in a.subjects:
        np.testing.assert_array_equal(a.subjects[s].responses, b.subjects[s].responses)
    cfg = tiny_world_config()
    cfg.seed = 1
    generate_world(cfg, tmp_path / "other")
    c = open_store(tmp_path / "other")
    assert c.version != a.version
    assert not np.array_equal(c.subjects["subj01"].responses, a.subjects["subj01"].responses)


def test_design_is_nsd_like(tiny_store):
    store = open_store(tiny_store)
    cfg = tiny_world_config()
    assert list(store.subjects) == ["subj01", "subj02"]
    counts = [store.subjects[s].n_features for s in store.subjects]
    assert counts == [60, 90]  # voxel counts differ
    train_images = []
    for sub in store.subjects.values():
        t = sub.trials
        test_imgs, reps = np.unique(t.image_index[t.split == "test"], return_counts=True)
        np.testing.assert_array_equal(test_imgs, np.arange(cfg.n_test_images))  # the shared set
        assert (reps == 3).all()  # shown 3x
        own = np.unique(t.image_index[t.split != "test"])
        assert len(own) == cfg.n_train_images
        train_images.append(set(own.tolist()))
        assert len(np.unique(t.session)) == len(t) // cfg.session_length
        assert (np.bincount(t.session) == cfg.session_length).all()
        # test repetitions spread over sessions, not all in one
        assert len(np.unique(t.session[t.split == "test"])) > 1
        val = np.unique(t.image_index[t.split == "val"])
        assert len(val) == round(cfg.val_fraction * cfg.n_train_images)
    assert not train_images[0] & train_images[1]  # training images are subject-specific


def test_ncsnr_within_configured_range(tiny_store):
    cfg = tiny_world_config()
    store = open_store(tiny_store)
    for sub in store.subjects.values():
        measured = sub.load_array("ncsnr")
        truth = np.load(sub.directory / "simulator.npz")["ncsnr_true"]
        assert truth.min() >= cfg.ncsnr.min and truth.max() <= cfg.ncsnr.max
        assert np.median(truth) == pytest.approx(cfg.ncsnr.median, rel=0.25)
        # estimated from only 24 images x 3 repeats: noisy, but centred on the truth
        assert np.median(measured) == pytest.approx(np.median(truth), rel=0.35)
        assert np.corrcoef(measured, truth)[0, 1] > 0.5
        stats = sub.statistics()
        assert set(stats["ncsnr_measured_percentiles"]) == {"5", "25", "50", "75", "95"}


def test_ground_truth_kept(tiny_store):
    sub = open_store(tiny_store).subjects["subj02"]
    truth = np.load(sub.directory / "simulator.npz")
    v = sub.n_features
    assert truth["population"].shape == (v,) and set(np.unique(truth["population"])) == {0, 1}
    early = truth["population"] == 0
    assert np.isfinite(truth["rf_center"][early]).all() and np.isnan(truth["rf_center"][~early]).all()
    assert truth["semantic_tuning"].shape[0] == v and (truth["semantic_tuning"][early] == 0).all()
    assert truth["noise_sd"].shape == (v,) and truth["session_gain"].shape[1] == v
    # retinotopy: neighbouring early voxels have nearby receptive fields
    ijk = truth["voxel_ijk"][early].astype(float)
    rf = truth["rf_center"][early]
    d_vox = np.linalg.norm(ijk[:, None] - ijk[None], axis=-1).ravel()
    d_rf = np.linalg.norm(rf[:, None] - rf[None], axis=-1).ravel()
    assert np.corrcoef(d_vox, d_rf)[0, 1] > 0.3


def test_oracle_above_decoder_free_baselines(tiny_store):
    store = open_store(tiny_store)
    oracle = store.extra("oracle")
    assert oracle["chance_top1"] == pytest.approx(1 / 20)
    for s, sub in store.subjects.items():
        o = oracle["subjects"][s]
        assert o["brain_to_image_top1"] > 5 * oracle["chance_top1"]
        # baseline without the generative model: correlate raw trial-averaged responses with the
        # noise-free candidates; the likelihood-based oracle must do at least as well
        truth = np.load(sub.directory / "simulator.npz")
        t = sub.trials
        test = t.split == "test"
        resp = np.asarray(sub.responses[test], dtype=np.float64)
        avg = np.stack([resp[t.image_index[test] == i].mean(0) for i in range(24)])
        from braindecode_fw.metrics.retrieval import retrieval_accuracy

        base = retrieval_accuracy(avg - avg.mean(0), truth["test_noise_free"], subset_size=20, n_subsets=5)
        assert o["brain_to_image_top1"] >= base.mean("brain_to_image") - 1e-9
    assert set(oracle["mean"]) >= {"brain_to_image_top1", "image_to_brain_top1"}


def test_scenes_render_and_caption():
    rng = np.random.default_rng(0)
    sc = scenes.sample_scenes(50, rng)
    assert {len(s.objects) for s in sc} == {1, 2, 3}
    assert len(scenes.CATEGORIES) >= 8
    img = scenes.render_scene(sc[0], 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0
    cap = scenes.caption_scene(sc[0])
    o = sc[0].objects[0]
    assert scenes.CATEGORIES[o.category] in cap and list(scenes.COLOURS)[o.colour] in cap
    # every category renders a visible object of its colour
    for c in range(len(scenes.CATEGORIES)):
        obj = scenes.SceneObject(category=c, colour=0, size=2, x=0.5, y=0.5)
        im = scenes.render_scene(scenes.Scene((obj,), background=0, tint=0, texture_seed=0), 64)
        red = (im[..., 0] > 200) & (im[..., 1] < 80)
        assert red.sum() > 50, scenes.CATEGORIES[c]


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown synthetic-world key\(s\) \['n_voxel'\]"):
        SyntheticWorldConfig.from_mapping({"n_voxel": 3})
    with pytest.raises(ValueError, match="test_repetitions"):
        SyntheticWorldConfig.from_mapping({"test_repetitions": 1})
