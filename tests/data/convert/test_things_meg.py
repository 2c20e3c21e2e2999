"""THINGS-MEG converter on the miniature BIDS fixture of braindecode_fw/data/convert/things_meg_fixture.py (real names, columns, index bases)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mne
import numpy as np
import pytest
from PIL import Image

from braindecode_fw.data.convert.things_meg import ThingsMEGInputError, convert_things_meg
from braindecode_fw.data.convert.things_meg_fixture import write_things_meg_fixture
from braindecode_fw.data.meg_layout import (
    MISSING_POSITION,
    things_meg_channel_names,
    valid_positions,
)
from braindecode_fw.data.store import open_store
from braindecode_fw.errors import OutputExistsError

MEG = "sub-BIGMEG1/ses-01/meg"
RUN = "sub-BIGMEG1_ses-01_task-main_run-{:02d}"


def _cfg(fx: dict, store: Path, **kw) -> dict:
    return {"root": str(fx["root"]), "images_root": str(fx["images_root"]), "store": str(store),
            "image_size": 24, "progress": False, "val_fraction": 0.3, **kw}


def _events(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict:
    """1 subject, 1 session, 2 runs of 20 trials (14 exp, 3 test, 3 catch). Read-only."""
    return write_things_meg_fixture(tmp_path_factory.mktemp("things") / "ds004212")


@pytest.fixture(scope="module")
def converted(fx, tmp_path_factory):
    store = tmp_path_factory.mktemp("stores") / "things_meg"
    return store, convert_things_meg(_cfg(fx, store))


@pytest.fixture(scope="module")
def unclamped(fx, tmp_path_factory):
    store = tmp_path_factory.mktemp("stores") / "unclamped"
    convert_things_meg(_cfg(fx, store, clamp=None))
    return store


@pytest.fixture
def fx_copy(fx, tmp_path) -> dict:
    """A writable copy of the fixture (the FIF files are linked, not copied)."""
    dst = tmp_path / "copy"
    shutil.copytree(fx["root"], dst / "ds004212", ignore=shutil.ignore_patterns("*.fif"))
    for src in Path(fx["root"]).rglob("*.fif"):
        (dst / "ds004212" / src.relative_to(fx["root"])).symlink_to(src)
    shutil.copytree(fx["images_root"], dst / "THINGS-images")
    return {**fx, "root": dst / "ds004212", "images_root": dst / "THINGS-images"}


# ---- store content -------------------------------------------------------------------------------


def test_shapes_geometry_and_provenance(converted):
    store, summary = converted
    st = open_store(store)  # validates
    assert st.modality == "meg" and list(st.subjects) == ["BIGMEG1"]
    sub = st.subjects["BIGMEG1"]
    assert sub.responses.shape == (34, 272, 181) and sub.responses.dtype == np.float32
    geo = sub.sensor_geometry()
    assert geo["names"] == things_meg_channel_names() and geo["names"][0] == "MLC11"
    assert geo["sfreq"] == 120.0 and geo["tmin"] == pytest.approx(-0.5)
    assert valid_positions(geo["positions"]).sum() == 272
    assert not np.isclose(geo["positions"], MISSING_POSITION).any()
    assert (geo["positions"] >= 0).all() and (geo["positions"] <= 1).all()
    prov = st.meta["provenance"]
    assert prov["source"] == "things_meg" and prov["zscore_at_load"] is False
    assert prov["onset_source"] == "events_tsv" and prov["input"] == "raw" and prov["clamp"] == 20
    assert prov["subject_index"] == {"BIGMEG1": 0} and prov["split"] == "benchetrit"
    assert prov["window"] == {"tmin": -0.5, "tmax": 1.0, "n_times": 181}
    stats = sub.statistics()
    assert stats["layout"] == "CTF-275" and stats["n_runs"] == 2 and stats["onset_source"] == "events_tsv"
    assert stats["n_catch_dropped"] == 6 and stats["split_counts"]["test"] == 6
    assert "BIGMEG1" in summary["report"] and "CTF-275" in summary["report"]


def test_trials_splits_and_repeats_follow_events_tsv(converted, fx):
    store, _ = converted
    st = open_store(store)
    t = st.subjects["BIGMEG1"].trials
    rows, row = [], 0
    for run in (1, 2):
        for e in _events(Path(fx["root"]) / MEG / f"{RUN.format(run)}_events.tsv"):
            if e["trial_type"] != "catch":
                rows.append({**e, "run": run - 1, "trial_id": row})
            row += 1
    assert len(t) == len(rows) == 34  # catch rows dropped
    np.testing.assert_array_equal(t.trial_id, [r["trial_id"] for r in rows])
    np.testing.assert_array_equal(t.run, [r["run"] for r in rows])
    assert (t.session == 0).all()
    source = np.asarray(st.image_metadata["source_ids"])
    np.testing.assert_array_equal(source[t.image_index], [int(float(r["value"])) for r in rows])
    test_cats = {r["things_category_nr"] for r in rows if r["trial_type"] == "test"}
    for r, split in zip(rows, t.split, strict=True):
        if r["trial_type"] == "test":
            assert split == "test"
        elif r["things_category_nr"] in test_cats:
            assert split == "test_large"
        else:
            assert split in ("train", "val")
    assert {"train", "val", "test", "test_large"} == set(t.split)
    test = t.split == "test"
    assert len(np.unique(t.image_index[test])) == 3
    for img in np.unique(t.image_index[test]):  # each test image once per run: repeats 0, 1
        np.testing.assert_array_equal(t.repeat[t.image_index == img], [0, 1])
    assert (t.repeat[~test] == 0).all()


def test_preprocessing_matches_an_mne_epochs_reference(unclamped, fx):
    """Resample the run, mne.Epochs with baseline (None, 0), robust scaling per run (all epochs)."""
    sub = open_store(unclamped).subjects["BIGMEG1"]
    x = np.asarray(sub.responses)
    offset = 0
    for run in (1, 2):
        raw = mne.io.read_raw_fif(Path(fx["root"]) / MEG / f"{RUN.format(run)}_meg.fif", preload=True, verbose="error")
        raw.pick("mag").resample(120.0, verbose="error")
        ev = _events(Path(fx["root"]) / MEG / f"{RUN.format(run)}_events.tsv")
        idx = np.round(np.asarray([int(e["sample"]) for e in ev]) / 1200.0 * 120.0).astype(int)
        events = np.c_[raw.first_samp + idx, np.zeros(len(idx), int), np.ones(len(idx), int)]
        epochs = mne.Epochs(raw, events, tmin=-0.5, tmax=1.0, baseline=(None, 0), preload=True, verbose="error")
        ref = epochs.get_data()
        assert ref.shape == (20, 272, 181) and len(epochs.times) == 181
        base = ref[..., epochs.times <= 0].mean(-1)
        assert np.abs(base).max() < 1e-6 * np.abs(ref).max()  # baseline mean ~ 0 before scaling
        flat = np.moveaxis(ref, 1, 0).reshape(272, -1)
        q25, q50, q75 = np.percentile(flat, [25, 50, 75], axis=1)
        keep = np.asarray([e["trial_type"] != "catch" for e in ev])
        expected = (ref[keep] - q50[:, None]) / (q75 - q25)[:, None]
        got = x[offset:offset + keep.sum()]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        # our own baseline: (b - median) / iqr with b's baseline mean 0 -> the same value in every epoch
        ours = got[..., epochs.times <= 0].mean(-1)  # (n_kept, 272)
        np.testing.assert_allclose(ours, np.broadcast_to(-q50 / (q75 - q25), ours.shape), atol=1e-4)
        offset += keep.sum()
    assert offset == len(x)
    assert np.abs(np.median(x, axis=(0, 2))).max() < 0.2  # robust-scaled: median ~ 0 per channel
    assert sub.statistics()["clamp_fraction"] == 0.0


def test_clamp_limits_values_and_counts_them(unclamped, fx, tmp_path):
    convert_things_meg(_cfg(fx, tmp_path / "c", clamp=0.5))
    sub = open_store(tmp_path / "c").subjects["BIGMEG1"]
    x, free = np.asarray(sub.responses), np.load(unclamped / "subjects/BIGMEG1/responses.npy")
    assert np.abs(x).max() == pytest.approx(0.5)
    np.testing.assert_array_equal(x, np.clip(free, -0.5, 0.5))
    assert sub.statistics()["clamp_fraction"] == pytest.approx(float(np.mean(np.abs(free) > 0.5)))
    assert 0.1 < sub.statistics()["clamp_fraction"] < 0.9


def test_images_are_the_fixture_jpegs_resized(converted, fx):
    store, _ = converted
    st = open_store(store)
    meta = st.image_metadata
    assert meta["source_ids"] == sorted(meta["source_ids"]) and len(set(meta["ids"])) == len(meta["ids"]) == 31
    assert st.images.shape == (31, 24, 24, 3)
    for i, (stem, caption) in enumerate(zip(meta["ids"], meta["captions"], strict=True)):
        concept = "_".join(stem.split("_")[:-1])
        assert caption == concept.replace("_", " ")
        with Image.open(Path(fx["images_root"]) / concept / f"{stem}.jpg") as im:
            expected = np.asarray(im.convert("RGB").resize((24, 24), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(st.images[i], expected)
    assert "pine tree" in meta["captions"]
    extra = st.extra("things_images")
    assert extra["test_concepts"] == [1, 101, 1260]  # aardvark, baby, pine_tree


def test_trigger_onsets_give_the_same_trials(converted, fx, tmp_path):
    store, _ = converted
    convert_things_meg(_cfg(fx, tmp_path / "trig", onset_source="trigger"))
    a, b = open_store(store), open_store(tmp_path / "trig")
    ta, tb = a.subjects["BIGMEG1"].trials, b.subjects["BIGMEG1"].trials
    for col in ("trial_id", "image_index", "session", "run", "repeat", "split"):
        np.testing.assert_array_equal(getattr(ta, col), getattr(tb, col))
    np.testing.assert_allclose(b.subjects["BIGMEG1"].responses, a.subjects["BIGMEG1"].responses, atol=1e-5)
    assert b.meta["provenance"]["onset_source"] == "trigger"
    assert all(r["trigger_minus_events_tsv_ms"] == 0.0 for r in b.subjects["BIGMEG1"].statistics()["runs"])


def test_trigger_lag_is_measured_and_shifts_the_epochs(tmp_path):
    """Triggers 150 ms after the events.tsv (photodiode) onsets, like the real data's hardware delay."""
    fx_lag = write_things_meg_fixture(tmp_path / "ds", n_runs=1, n_exp=4, trigger_lag=0.15, hebart=False)
    a = convert_things_meg(_cfg(fx_lag, tmp_path / "tsv"))
    b = convert_things_meg(_cfg(fx_lag, tmp_path / "trig", onset_source="trigger"))
    for summary in (a, b):
        assert summary["subjects"]["BIGMEG1"]["runs"][0]["trigger_minus_events_tsv_ms"] == pytest.approx(150.0)
    xa = np.load(tmp_path / "tsv/subjects/BIGMEG1/responses.npy")
    xb = np.load(tmp_path / "trig/subjects/BIGMEG1/responses.npy")
    assert xa.shape == xb.shape == (7, 272, 181) and not np.allclose(xa, xb)


def test_attributes_without_session_and_run_columns_align_in_acquisition_order(converted, fx_copy, tmp_path):
    p = Path(fx_copy["root"]) / "sourcedata/sample_attributes_P1.csv"
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c not in ("session_nr", "run_nr")]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    convert_things_meg(_cfg(fx_copy, tmp_path / "s"))
    ref = open_store(converted[0])
    st = open_store(tmp_path / "s")
    np.testing.assert_array_equal(st.subjects["BIGMEG1"].trials.trial_id, ref.subjects["BIGMEG1"].trials.trial_id)
    assert st.image_metadata == ref.image_metadata
    with open(p, "w", newline="") as f:  # one row short: the count no longer matches the events
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows[:-1])
    with pytest.raises(ThingsMEGInputError, match=r"sample_attributes_P1\.csv: 39 rows, expected 40"):
        convert_things_meg(_cfg(fx_copy, tmp_path / "s2"))


def test_trigger_count_mismatch_names_the_run_file(fx_copy, tmp_path):
    path = Path(fx_copy["root"]) / MEG / f"{RUN.format(2)}_meg.fif"
    raw = mne.io.read_raw_fif(path, preload=True, verbose="error")
    stim = raw.copy().pick("UPPT001").get_data()[0]
    first = int(np.flatnonzero(stim == 64)[0])
    raw._data[raw.ch_names.index("UPPT001"), first:first + 10] = 0  # drop one image pulse
    path.unlink()
    raw.save(path, verbose="error")
    store = tmp_path / "out" / "things_meg"
    with pytest.raises(ThingsMEGInputError, match=r"run-02_meg\.fif: 20 UPPT001 triggers, expected 21"):
        convert_things_meg(_cfg(fx_copy, store, onset_source="trigger"))
    assert not store.exists() and not list(store.parent.glob("things_meg.partial-*"))
    convert_things_meg(_cfg(fx_copy, store))  # events.tsv onsets do not need the triggers


def test_image_number_mismatch_is_counted_and_events_tsv_wins(converted, fx_copy, tmp_path, caplog):
    p = Path(fx_copy["root"]) / "sourcedata/sample_attributes_P1.csv"
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    k = next(i for i, r in enumerate(rows) if r["trial_type"] == "exp")
    rows[k]["things_image_nr"] = "99999"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    convert_things_meg(_cfg(fx_copy, tmp_path / "m"))
    st = open_store(tmp_path / "m")
    assert st.subjects["BIGMEG1"].statistics()["attribute_mismatches"] == 1
    assert "things_image_nr differs from events.tsv value on 1 exp/test row" in caplog.text
    ref = open_store(converted[0])
    assert st.image_metadata == ref.image_metadata
    np.testing.assert_array_equal(st.subjects["BIGMEG1"].trials.image_index, ref.subjects["BIGMEG1"].trials.image_index)


def test_hebart_epochs_input(converted, fx, tmp_path):
    store, _ = converted
    summary = convert_things_meg(_cfg(fx, tmp_path / "heb", input="hebart_epochs"))
    st = open_store(tmp_path / "heb")
    sub = st.subjects["BIGMEG1"]
    assert sub.responses.shape == (34, 271, 169)
    geo = sub.sensor_geometry()
    assert "MRO11" not in geo["names"] and len(geo["names"]) == 271
    assert geo["tmin"] == pytest.approx(-0.1) and valid_positions(geo["positions"]).all()
    raw_t = open_store(store).subjects["BIGMEG1"].trials
    for col in ("trial_id", "image_index", "session", "run", "repeat", "split"):
        np.testing.assert_array_equal(getattr(sub.trials, col), getattr(raw_t, col))
    prov = st.meta["provenance"]
    assert prov["input"] == "hebart_epochs" and prov["window"]["n_times"] == 169
    assert np.abs(sub.responses).max() <= 20.0 and "hebart_epochs" in summary["report"]


def test_hebart_epochs_without_metadata_use_the_sample_attributes(fx, fx_copy, tmp_path):
    path = Path(fx_copy["root"]) / "derivatives/preprocessed/preprocessed_P1-epo.fif"
    epochs = mne.read_epochs(path, preload=True, verbose="error")
    epochs.metadata = None
    path.unlink()
    epochs.save(path, verbose="error")
    convert_things_meg(_cfg(fx, tmp_path / "ref", input="hebart_epochs"))
    convert_things_meg(_cfg(fx_copy, tmp_path / "csv", input="hebart_epochs"))
    a, b = open_store(tmp_path / "ref"), open_store(tmp_path / "csv")
    np.testing.assert_array_equal(a.subjects["BIGMEG1"].responses, b.subjects["BIGMEG1"].responses)
    for col in ("trial_id", "image_index", "split"):
        np.testing.assert_array_equal(getattr(a.subjects["BIGMEG1"].trials, col),
                                      getattr(b.subjects["BIGMEG1"].trials, col))


def test_rerun_is_a_noop_unless_forced(fx, tmp_path):
    store = tmp_path / "s"
    cfg = _cfg(fx, store, input="hebart_epochs")
    assert not convert_things_meg(cfg)["noop"]
    stamp = (store / "dataset.json").stat().st_mtime_ns
    again = convert_things_meg(cfg)
    assert again["noop"] and "up to date" in again["report"]
    assert (store / "dataset.json").stat().st_mtime_ns == stamp
    assert not convert_things_meg({**cfg, "force": True})["noop"]
    with pytest.raises(OutputExistsError, match=r"prepared from another configuration: dataset.clamp 20.0 -> 5.0"):
        convert_things_meg({**cfg, "clamp": 5})  # another configuration: refused
    assert not convert_things_meg({**cfg, "clamp": 5, "replace": True})["noop"]


def test_stale_partial_of_dead_process_is_removed(fx, tmp_path):
    stale = tmp_path / "s.partial-99999999"
    (stale / "subjects").mkdir(parents=True)
    convert_things_meg(_cfg(fx, tmp_path / "s", input="hebart_epochs"))
    assert not stale.exists() and (tmp_path / "s/dataset.json").exists()


def test_prepare_task_with_the_composed_config(fx, tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from braindecode_fw.data.prepare import prepare
    from tests.conftest import compose_config

    GlobalHydra.instance().clear()
    try:
        cfg = compose_config("prepare", ["dataset=things_meg", f"dataset.root={fx['root']}",
                                         f"dataset.images_root={fx['images_root']}", f"dataset.store={tmp_path / 'p'}",
                                         "dataset.image_size=16", "dataset.progress=false",
                                         "dataset.input=hebart_epochs", "dataset.subjects=[1]"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.dataset.kind == "things_meg" and cfg.dataset.clamp == 20 and cfg.dataset.sfreq == 120
    summary = prepare(cfg.dataset)
    assert "BIGMEG1" in summary["report"]
    assert open_store(tmp_path / "p").meta["provenance"]["subjects"] == ["BIGMEG1"]


@pytest.mark.slow
def test_bdf_prepare_cli(fx, tmp_path):
    from tests.conftest import run_cli as _run  # in this process: no second import of Lightning

    store = tmp_path / "prepared" / "things_meg"
    args = ["dataset=things_meg", f"dataset.root={fx['root']}", f"dataset.images_root={fx['images_root']}",
            f"dataset.store={store}", "dataset.image_size=16", "dataset.progress=false"]
    proc = _run("bdf-prepare", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BIGMEG1" in proc.stdout and "CTF-275" in proc.stdout
    assert open_store(store).subjects["BIGMEG1"].responses.shape == (34, 272, 181)
    again = _run("bdf-prepare", args, tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout


# ---- bad input: clear error naming the file or key, no store ----------------------------------------


def _drop_column(fx: dict) -> tuple[str, dict]:
    p = Path(fx["root"]) / MEG / f"{RUN.format(1)}_events.tsv"
    rows = [ln.split("\t") for ln in p.read_text().splitlines()]
    j = rows[0].index("value")
    p.write_text("\n".join("\t".join(r[:j] + r[j + 1:]) for r in rows) + "\n")
    return r"run-01_events\.tsv: missing column\(s\) \['value'\]", {}


def _missing_image(fx: dict) -> tuple[str, dict]:
    (Path(fx["images_root"]) / "pine_tree" / "pine_tree_19s.jpg").unlink()
    return r"pine_tree/pine_tree_19s\.jpg: missing image file .*dataset\.images_root", {}


def _attribute_rows(fx: dict) -> tuple[str, dict]:
    p = Path(fx["root"]) / "sourcedata/sample_attributes_P1.csv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:5] + lines[6:]) + "\n")
    return r"sample_attributes_P1\.csv: 19 rows with session_nr=1, run_nr=1, expected 20", {}


def _missing_events(fx: dict) -> tuple[str, dict]:
    (Path(fx["root"]) / MEG / f"{RUN.format(2)}_events.tsv").unlink()
    return r"run-02_events\.tsv: missing file", {}


def _missing_derivative(fx: dict) -> tuple[str, dict]:
    (Path(fx["root"]) / "derivatives/preprocessed/preprocessed_P1-epo.fif").unlink()
    return r"preprocessed_P1-epo\.fif: missing file", {"input": "hebart_epochs"}


def _unknown_subject(fx: dict) -> tuple[str, dict]:
    return r"sub-BIGMEG9: missing subject folder \(dataset\.subjects", {"subjects": ["BIGMEG9"]}


def _missing_session(fx: dict) -> tuple[str, dict]:
    return r"dataset\.sessions: sub-BIGMEG1 has no run of session\(s\) \[2\]", {"sessions": 2}


def _missing_run(fx: dict) -> tuple[str, dict]:
    (Path(fx["root"]) / MEG / f"{RUN.format(2)}_meg.fif").unlink()  # dataset.sessions=null: every run
    return (r"1 run\(s\) of sub-BIGMEG1 missing: sub-BIGMEG1/ses-01/meg/sub-BIGMEG1_ses-01_task-main_run-02_meg\.ds "
            r"\(a _meg\.ds folder or _meg\.fif file each; dataset\.sessions=null converts every session"), {}


def _missing_run_of_a_named_session(fx: dict) -> tuple[str, dict]:
    (Path(fx["root"]) / MEG / f"{RUN.format(1)}_meg.fif").unlink()
    return r"run-01_meg\.ds .*dataset\.sessions=\[1\] converts whole sessions", {"sessions": [1]}


BAD = [_drop_column, _missing_image, _attribute_rows, _missing_events, _missing_derivative, _unknown_subject,
       _missing_session, _missing_run, _missing_run_of_a_named_session]


@pytest.mark.parametrize("corrupt", BAD, ids=[f.__name__[1:] for f in BAD])
def test_bad_input_names_the_file_and_creates_no_store(fx_copy, tmp_path, corrupt):
    pattern, extra = corrupt(fx_copy)
    store = tmp_path / "out" / "things_meg"
    with pytest.raises(ThingsMEGInputError, match=pattern):
        convert_things_meg(_cfg(fx_copy, store, **extra))
    assert not store.exists()


def test_config_errors_name_the_key(fx, tmp_path):
    with pytest.raises(ValueError, match="dataset.root: not set"):
        convert_things_meg({"store": str(tmp_path / "s")})
    with pytest.raises(ValueError, match="dataset.images_root: not set"):
        convert_things_meg({"root": str(fx["root"]), "store": str(tmp_path / "s")})
    with pytest.raises(ValueError, match="dataset.onset_source"):
        convert_things_meg(_cfg(fx, tmp_path / "s", onset_source="photodiode"))
    with pytest.raises(ValueError, match=r"unknown THINGS-MEG converter key\(s\) \['clip'\]"):
        convert_things_meg(_cfg(fx, tmp_path / "s", clip=5))
    with pytest.raises(ValueError, match="dataset.clamp"):
        convert_things_meg(_cfg(fx, tmp_path / "s", clamp=0))


def test_original_split_keeps_all_exp_for_training(fx, tmp_path):
    convert_things_meg(_cfg(fx, tmp_path / "o", split="original", input="hebart_epochs", val_fraction=0.0))
    st = open_store(tmp_path / "o")
    t = st.subjects["BIGMEG1"].trials
    assert sorted(set(t.split)) == ["test", "train"] and (t.split == "train").sum() == 28
    assert st.meta["provenance"]["split"] == "original"


def test_two_subjects_two_sessions(tmp_path):
    fx2 = write_things_meg_fixture(tmp_path / "ds", subjects=("BIGMEG1", "BIGMEG2"), n_sessions=2, n_runs=1,
                                   n_exp=6, seed=3)
    summary = convert_things_meg(_cfg(fx2, tmp_path / "s", dtype="float16"))
    st = open_store(tmp_path / "s")
    assert list(st.subjects) == ["BIGMEG1", "BIGMEG2"]
    assert st.meta["provenance"]["subject_index"] == {"BIGMEG1": 0, "BIGMEG2": 1}
    for label in ("BIGMEG1", "BIGMEG2"):
        sub = st.subjects[label]
        t = sub.trials
        assert sub.responses.shape == (18, 272, 181) and sub.responses.dtype == np.float16
        assert np.bincount(t.session).tolist() == [9, 9] and (t.run == 0).all()
        for img in np.unique(t.image_index[t.split == "test"]):
            np.testing.assert_array_equal(t.repeat[t.image_index == img], [0, 1])
            np.testing.assert_array_equal(t.session[t.image_index == img], [0, 1])
    assert summary["subjects"]["BIGMEG2"]["sessions"] == [1, 2]
    only2 = convert_things_meg(_cfg(fx2, tmp_path / "s2", subjects=[2], sessions=[2], input="hebart_epochs"))
    t2 = open_store(tmp_path / "s2").subjects["BIGMEG2"].trials
    assert list(only2["subjects"]) == ["BIGMEG2"] and (t2.session == 1).all() and len(t2) == 9
    assert json.loads((tmp_path / "s2/dataset.json").read_text())["provenance"]["sessions"] == {"BIGMEG2": [2]}
