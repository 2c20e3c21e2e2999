"""BrainDataModule on MEG stores: (trials, sensors, times) responses, sensor padding across subjects,
repetition averaging in both modes, geometry, and the store's MEG validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.data.meg_layout import sensor_positions, things_meg_channel_names
from braindecode_fw.data.store import StoreValidationError, StoreWriter, TrialTable, open_store

N_TIMES = 9


def write_meg_store(root, sensors=(6, 5), n_times=N_TIMES, seed=0, geometry=True):
    """Two subjects with ``sensors`` channels: 8 train, 2 val, and 3 test images × 3 repetitions each."""
    rng = np.random.default_rng(seed)
    names = things_meg_channel_names()
    with StoreWriter(root, name="tiny_meg", modality="meg") as w:
        w.write_images(rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), ids=[f"img{i}" for i in range(20)])
        for s_i, n_sensors in enumerate(sensors):
            images = np.concatenate([np.arange(10) + 10 * s_i % 10, np.repeat([15, 16, 17], 3)])
            split = np.array(["train"] * 8 + ["val"] * 2 + ["test"] * 9)
            repeat = np.concatenate([np.zeros(10, int), np.tile([0, 1, 2], 3)])
            n = len(images)
            trials = TrialTable(trial_id=np.arange(n), image_index=images, session=np.arange(n) // 10,
                                run=np.zeros(n, int), repeat=repeat, split=split)
            w.write_subject(
                f"sub{s_i}", trials, rng.standard_normal((n, n_sensors, n_times)).astype(np.float32),
                **(dict(sensor_names=names[:n_sensors], sensor_positions=sensor_positions(names[:n_sensors]),
                        sfreq=120.0, tmin=-0.5) if geometry else {}))
        w.finalize(provenance={"source": "test", "zscore_at_load": False})
    return root


@pytest.fixture
def meg_dm(tmp_path):
    dm = BrainDataModule(write_meg_store(tmp_path / "store"), None, batch_size=4, eval_batch_size=5,
                         cache_dir=tmp_path / "cache")
    dm.setup()
    return dm


def test_batches_pad_sensors_and_keep_time(meg_dm):
    assert meg_dm.zscore is False  # zscore=auto follows provenance.zscore_at_load
    assert meg_dm.n_features == {"sub0": 6, "sub1": 5}
    assert meg_dm.response_shapes == {"sub0": (6, N_TIMES), "sub1": (5, N_TIMES)}
    store = open_store(meg_dm.store_path)
    batch = next(iter(meg_dm.train_dataloader()))
    assert batch.responses.shape == (4, 6, N_TIMES)
    for row, (s, img) in enumerate(zip(batch.subject, batch.image_index.tolist(), strict=True)):
        sd = store.subjects[s]
        t = np.flatnonzero((sd.trials.image_index == img) & (sd.trials.split == "train"))[0]
        c = sd.responses.shape[1]
        np.testing.assert_array_equal(batch.responses[row, :c].numpy(), sd.responses[t])
        assert not batch.responses[row, c:].any()  # padded sensors are zeros


@pytest.mark.parametrize("mode", ["inputs", "outputs"])
def test_test_repetitions(tmp_path, mode):
    dm = BrainDataModule(write_meg_store(tmp_path / "store"), None, batch_size=4, eval_batch_size=6,
                         cache_dir=tmp_path / "cache", repeat_averaging=mode)
    dm.setup()
    store = open_store(dm.store_path)
    batch = next(iter(dm.test_dataloader()))
    assert len(batch) == 6  # 3 images × 2 subjects
    for row, (s, img) in enumerate(zip(batch.subject, batch.image_index.tolist(), strict=True)):
        sd = store.subjects[s]
        reps = sd.responses[np.flatnonzero(sd.trials.image_index == img)]
        c = reps.shape[1]
        if mode == "inputs":
            np.testing.assert_allclose(batch.responses[row, :c].numpy(), reps.mean(0), rtol=1e-6, atol=1e-6)
        else:
            assert batch.responses.shape == (6, 3, 6, N_TIMES) and batch.repeat_mask[row].all()
            np.testing.assert_array_equal(batch.responses[row, :, :c].numpy(), reps)


def test_sensor_geometry_and_zscoring(tmp_path):
    dm = BrainDataModule(write_meg_store(tmp_path / "store"), None, batch_size=4, zscore=True,
                         cache_dir=tmp_path / "cache")
    dm.setup()
    geo = dm.sensor_geometry("sub1")
    assert geo["names"] == things_meg_channel_names()[:5] and geo["sfreq"] == 120.0 and geo["tmin"] == -0.5
    assert geo["positions"].shape == (5, 2) and (geo["positions"] >= 0).all() and (geo["positions"] <= 1).all()
    # z-scoring statistics per (sensor, time) from the session's training trials
    assert dm.stats["sub0"].mean.shape == (2, 6, N_TIMES)
    store = open_store(dm.store_path)
    train = store.subjects["sub0"].responses[:8]
    np.testing.assert_allclose(dm.stats["sub0"].mean[0], train.mean(0), rtol=1e-5, atol=1e-6)


def test_subjects_with_different_window_lengths_fail_naming_them(tmp_path):
    root = write_meg_store(tmp_path / "a")
    other = write_meg_store(tmp_path / "b", n_times=N_TIMES + 1)
    # splice a subject with longer windows into the first store (validation passes: shapes are per subject)
    np.save(root / "subjects" / "sub1" / "responses.npy", np.load(other / "subjects" / "sub1" / "responses.npy"))
    dm = BrainDataModule(root, None, batch_size=4, cache_dir=tmp_path / "cache")
    dm.setup()
    with pytest.raises(ValueError, match=r"only the first \(feature/sensor\) axis may differ"):
        next(iter(dm.train_dataloader()))


def test_store_validation_names_missing_meg_geometry(tmp_path):
    root = write_meg_store(tmp_path / "store", geometry=False)
    with pytest.raises(StoreValidationError, match=r"subjects/sub0/geometry.npz: missing file"):
        open_store(root)
    root = write_meg_store(tmp_path / "store2")
    g = dict(np.load(root / "subjects" / "sub1" / "geometry.npz"))
    g["sensor_positions"] = g["sensor_positions"][:4]
    np.savez(root / "subjects" / "sub1" / "geometry.npz", **g)
    with pytest.raises(StoreValidationError, match=r"sensor_positions shape \(4, 2\), expected \(5, 2\)"):
        open_store(root)


def test_meg_batch_feeds_the_brain_module(meg_dm):
    """Store -> datamodule -> MEGDecoder with the store's geometry (padded sensors invalid)."""
    from braindecode_fw.models.meg import build_meg_decoder

    decoder = build_meg_decoder(meg_dm.n_features, {"z": (4,)}, n_times=N_TIMES, spatial_channels=8, n_harmonics=4,
                                hidden=8, depth=2, backbone_out=16)
    meg_dm.store = open_store(meg_dm.store_path)
    decoder.configure_from_data(meg_dm)
    assert decoder.sensor_valid.sum(1).tolist() == [6, 5]
    batch = next(iter(meg_dm.train_dataloader()))
    out = decoder(batch.responses, batch.subject)
    assert out["z"].shape == out["regression/z"].shape == (4, 4)
    bad = build_meg_decoder(meg_dm.n_features, {"z": (4,)}, n_times=N_TIMES + 2, spatial_channels=8, n_harmonics=4,
                            hidden=8, depth=2, backbone_out=16)
    with pytest.raises(ValueError, match=r"model.n_times=11 but sub0's windows .* have 9 samples"):
        bad.configure_from_data(meg_dm)
    test = next(iter(meg_dm.test_dataloader()))
    assert torch.isfinite(decoder(test.responses, test.subject)["z"]).all()


def test_large_test_split_is_read_separately(tmp_path):
    """THINGS-MEG's large test set (split ``test_large``): never trained on, evaluated on its own."""
    root = write_meg_store(tmp_path / "store")
    trials_path = root / "subjects" / "sub0" / "trials.tsv"
    lines = trials_path.read_text().splitlines()
    header, rows = lines[0], [ln.split("\t") for ln in lines[1:]]
    col = header.split("\t").index("split")
    for r in rows[6:8]:  # two training trials become large-test trials
        r[col] = "test_large"
    trials_path.write_text("\n".join([header, *["\t".join(r) for r in rows]]) + "\n")
    dm = BrainDataModule(root, None, batch_size=4, cache_dir=tmp_path / "cache")
    dm.setup()
    assert dm.has_split("test_large") and not dm.has_split("nothing")
    assert dm.trial_counts("train") == {"sub0": 6, "sub1": 8}
    batch = next(iter(dm.eval_dataloader("test_large")))
    assert batch.subject == ["sub0", "sub0"] and batch.responses.shape == (2, 6, N_TIMES)
    assert sorted(batch.image_index.tolist()) == [6, 7]


def test_bad_meg_inputs_name_what_is_wrong(tmp_path, tiny_store):
    from braindecode_fw.models.meg import build_meg_decoder

    names = things_meg_channel_names()[:3]
    trials = TrialTable(trial_id=np.arange(2), image_index=np.zeros(2, int), session=np.zeros(2, int),
                        run=np.zeros(2, int), repeat=np.arange(2), split=np.array(["train", "test"]))
    with StoreWriter(tmp_path / "bad", name="bad", modality="meg") as w:
        with pytest.raises(ValueError, match=r"sensor_names needs sensor_positions, sfreq and tmin too"):
            w.write_subject("s", trials, np.zeros((2, 3, 4), np.float32), sensor_names=names)
        with pytest.raises(ValueError, match=r"sensor_positions: expected \(3, 2\), got \(2, 2\)"):
            w.write_subject("s", trials, np.zeros((2, 3, 4), np.float32), sensor_names=names,
                            sensor_positions=np.zeros((2, 2)), sfreq=120.0, tmin=-0.5)
    assert not (tmp_path / "bad").exists()  # nothing published after the failure
    decoder = build_meg_decoder({"subj01": 3}, {"z": (2,)}, n_times=4, spatial_channels=4, n_harmonics=2, hidden=4,
                                depth=1, backbone_out=8)
    with pytest.raises(ValueError, match=r"sensor positions must be \(C <= 3, 2\), got \(4, 2\)"):
        decoder.set_sensor_positions("subj01", np.zeros((4, 2)))
    fmri = BrainDataModule(tiny_store, None, cache_dir=tmp_path / "cache")
    fmri.setup()
    with pytest.raises(ValueError, match=r"the MEG brain module needs an MEG dataset; .* holds fmri data"):
        decoder.configure_from_data(fmri)
    with pytest.raises(KeyError, match=r"no target 'nope'"):
        fmri.target_statistics("nope")
