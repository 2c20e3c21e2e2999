"""Raw-NSD converter on the miniature fixture of braindecode_fw/data/convert/nsd_fixture.py (real paths, dtypes, axis orders, index bases)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat, savemat

from braindecode_fw.data.convert.nsd import (
    NSDInputError,
    apply_validation,
    check_real_invariants,
    convert_nsd,
    looks_real,
)
from braindecode_fw.data.convert.nsd_fixture import fixture_colour, write_nsd_fixture
from braindecode_fw.data.normalization import fit_session_stats
from braindecode_fw.data.store import open_store
from braindecode_fw.errors import OutputExistsError

BETAS = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
ROI = "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz"
EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"


def _cfg(root: Path, store: Path, **kw) -> dict:
    return {"root": str(root), "store": str(store), "image_size": 32, "progress": False, **kw}


@pytest.fixture(scope="module")
def nsd_root(tmp_path_factory) -> Path:
    """Subject 1, sessions 1-2, NIfTI + HDF5 betas, captions. Read-only."""
    root = tmp_path_factory.mktemp("nsd") / "nsd"
    write_nsd_fixture(root)
    return root


@pytest.fixture(scope="module")
def converted(nsd_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("stores") / "nsd"
    summary = convert_nsd(_cfg(nsd_root, store, captions=str(nsd_root / "COCO_73k_annots_curated.npy")))
    return store, summary


@pytest.fixture
def root_copy(nsd_root, tmp_path) -> Path:
    """A writable copy of the fixture (the big stimulus brick is linked, not copied)."""
    dst = tmp_path / "nsd"
    shutil.copytree(nsd_root, dst, ignore=shutil.ignore_patterns("nsd_stimuli.hdf5"))
    (dst / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5").symlink_to(
        nsd_root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5")
    return dst


def _design(root: Path):
    mat = loadmat(str(root / EXPDESIGN), squeeze_me=True)
    return mat["masterordering"].astype(int), mat["subjectim"].astype(int), mat["sharedix"].astype(int)


# ------------------------------------------------------------------------------------------------


def test_trial_and_voxel_counts(converted, nsd_root):
    store, summary = converted
    st = open_store(store)
    subj = st.subjects["subj01"]
    assert subj.responses.shape == (2 * 750, 8) and subj.responses.dtype == np.float32
    roi = np.asarray(nib.load(str(nsd_root / ROI)).dataobj)
    assert (roi == -1).any() and (roi == 0).any()
    ijk = subj.load_array("geometry")["voxel_ijk"]
    np.testing.assert_array_equal(ijk, np.argwhere(roi == 1))  # C-order over X,Y,Z; no -1/0 voxel
    assert (roi[tuple(ijk.T)] == 1).all()
    mask = np.asarray(nib.load(str(store / "subjects/subj01/mask.nii.gz")).dataobj)
    assert mask.sum() == 8 and mask.shape == roi.shape
    np.testing.assert_allclose(subj.load_array("geometry")["affine"],
                               nib.load(str(nsd_root / "nsddata/ppdata/subj01/func1pt8mm/brainmask.nii.gz")).affine)
    assert np.bincount(subj.trials.session).tolist() == [750, 750]
    assert summary["subjects"]["subj01"]["n_trials"] == 1500 and "subj01" in summary["report"]


def test_trial_to_image_mapping_matches_expdesign(converted, nsd_root):
    store, _ = converted
    st = open_store(store)
    t = st.subjects["subj01"].trials
    mo, subjectim, _ = _design(nsd_root)
    g = np.arange(1500)
    np.testing.assert_array_equal(t.trial_id, g)
    expected_73k = subjectim[0, mo[g] - 1] - 1  # 1-based 10k index and 1-based 73k id -> 0-based
    source = np.asarray(st.image_metadata["source_ids"])
    np.testing.assert_array_equal(source[t.image_index], expected_73k)
    np.testing.assert_array_equal(t.split == "test", mo[g] <= 1000)
    # runs: 12 per session, 63/62 trials, 0-based
    assert np.bincount(t.run[:750]).tolist() == [63, 62] * 6


def test_int16_over_300_scaling_on_a_known_voxel(converted, nsd_root):
    store, _ = converted
    st = open_store(store)
    ijk = st.subjects["subj01"].load_array("geometry")["voxel_ijk"]
    img = nib.load(str(nsd_root / BETAS / "betas_session02.nii.gz"))
    assert img.get_data_dtype() == np.int16
    raw = np.asarray(img.dataobj)
    v, trial = 5, 123
    x, y, z = ijk[v]
    assert raw[x, y, z, trial] != 0
    assert st.subjects["subj01"].responses[750 + trial, v] == pytest.approx(raw[x, y, z, trial] / 300.0, rel=1e-6)


def test_hdf5_betas_equal_nifti_betas(converted, nsd_root, tmp_path):
    store, _ = converted
    convert_nsd(_cfg(nsd_root, tmp_path / "h5", beta_format="hdf5"))
    with h5py.File(nsd_root / BETAS / "betas_session01.hdf5") as f:
        assert f["betas"].shape == (750, 4, 5, 6)  # (750, Z, Y, X)
    a = np.load(store / "subjects/subj01/responses.npy")
    b = np.load(tmp_path / "h5/subjects/subj01/responses.npy")
    np.testing.assert_array_equal(a, b)


def test_repetitions_grouped_with_one_and_two_repeat_images(converted):
    store, _ = converted
    t = open_store(store).subjects["subj01"].trials
    counts = {}
    for img in np.unique(t.image_index[t.split == "test"]):
        rows = np.flatnonzero(t.image_index == img)
        assert (t.split[rows] == "test").all()
        np.testing.assert_array_equal(t.repeat[rows], np.arange(len(rows)))  # chronological 0,1,2
        counts[int(img)] = len(rows)
    n = np.bincount(list(counts.values()))
    assert n[3] >= 5 and (n[1] >= 1 or n[2] >= 1)


def test_zscore_statistics_from_training_trials_only(converted):
    store, _ = converted
    subj = open_store(store).subjects["subj01"]
    t, r = subj.trials, np.asarray(subj.responses)
    train = t.split == "train"
    stats = fit_session_stats(r, t.session, train)
    for s in (0, 1):
        rows = (t.session == s) & train
        z = stats.apply(r[rows], t.session[rows])
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
        np.testing.assert_allclose(stats.mean[s], r[rows].mean(0), rtol=1e-5, atol=1e-6)
        with_test = r[t.session == s].mean(0)
        assert not np.allclose(stats.mean[s], with_test, atol=1e-6)  # test trials would change it


def test_ncsnr_matches_nsd_formula(converted):
    store, _ = converted
    subj = open_store(store).subjects["subj01"]
    t, r = subj.trials, np.asarray(subj.responses, dtype=np.float64)
    z = np.empty_like(r)
    for s in np.unique(t.session):  # NSD: z-score each session over its trials
        m = t.session == s
        z[m] = (r[m] - r[m].mean(0)) / r[m].std(0)
    groups = [np.flatnonzero(t.image_index == i)[:3] for i in np.unique(t.image_index)]
    groups = [g for g in groups if len(g) == 3]
    data = np.stack([z[g] for g in groups])  # (images, 3, voxels)
    expected = np.empty(r.shape[1])
    for v in range(r.shape[1]):
        noise_var = np.mean([np.var(data[i, :, v], ddof=1) for i in range(len(groups))])
        total_var = np.var(data[:, :, v])
        expected[v] = np.sqrt(max(total_var - noise_var, 0.0)) / np.sqrt(noise_var)
    np.testing.assert_allclose(subj.load_array("ncsnr"), expected, rtol=1e-4)
    assert subj.statistics()["ncsnr"]["images"] == len(groups)


def test_images_are_the_expdesign_images_resized(converted, nsd_root):
    store, _ = converted
    st = open_store(store)
    assert st.images.shape[1:] == (32, 32, 3) and st.meta["image_size"] == 32
    t = st.subjects["subj01"].trials
    mo, subjectim, _ = _design(nsd_root)
    ids = subjectim[0, mo[t.trial_id] - 1] - 1
    np.testing.assert_array_equal(st.images[t.image_index][:, 5, 7], fixture_colour(ids))
    with h5py.File(nsd_root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5") as f:
        assert f["imgBrick"].shape == (73000, 425, 425, 3)
        from PIL import Image

        direct = np.asarray(Image.fromarray(f["imgBrick"][ids[0]]).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(st.images[t.image_index[0]], direct)
    # only the images the converted trials use
    assert st.meta["n_images"] == len(np.unique(ids))


def test_captions_and_coco_ids(converted, nsd_root):
    store, _ = converted
    st = open_store(store)
    caps = np.load(nsd_root / "COCO_73k_annots_curated.npy", allow_pickle=True)
    src = st.image_metadata["source_ids"]
    for k in (0, 10):
        expected = next((c for c in caps[src[k]] if c), "")
        assert st.image_metadata["captions"][k] == expected
    extra = st.extra("nsd_images")
    import csv

    with open(nsd_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv") as f:
        rows = list(csv.DictReader(f))
    assert extra["coco_id"][3] == int(rows[src[3]]["cocoId"]) and extra["nsd_id"] == src


def test_val_split_is_by_image_and_recorded(converted):
    store, _ = converted
    st = open_store(store)
    t = st.subjects["subj01"].trials
    val_imgs, train_imgs = set(t.image_index[t.split == "val"]), set(t.image_index[t.split == "train"])
    assert val_imgs and not val_imgs & train_imgs
    assert not val_imgs & set(t.image_index[t.split == "test"])
    frac = len(val_imgs) / (len(val_imgs) + len(train_imgs))
    assert 0.04 < frac < 0.2
    prov = st.meta["provenance"]
    assert prov["val"] == {"fraction": 0.1, "seed": 0, "rule": "hash of 0-based 73k id"}
    assert prov["test_convention"] == "new" and "splitmix64" in prov["split_rule"]
    assert "percent signal change" in prov["normalisation"]


def test_legacy_and_new_test_conventions(tmp_path):
    root = tmp_path / "nsd"
    write_nsd_fixture(root, sessions=(1, 38), hdf5=False, captions=False)
    new = convert_nsd(_cfg(root, tmp_path / "new", sessions=[1, 38]))
    legacy = convert_nsd(_cfg(root, tmp_path / "legacy", sessions=[1, 38], test_convention="legacy"))
    tn = open_store(tmp_path / "new").subjects["subj01"].trials
    tl = open_store(tmp_path / "legacy").subjects["subj01"].trials
    assert sorted(set(tn.session)) == [0, 37] and sorted(set(tl.session)) == [0]
    assert new["subjects"]["subj01"]["n_test_trials"] > legacy["subjects"]["subj01"]["n_test_trials"]
    np.testing.assert_array_equal(tl.split, tn.split[:750])
    prov = json.loads((tmp_path / "legacy/dataset.json").read_text())["provenance"]
    assert prov["test_convention"] == "legacy" and prov["sessions_dropped"] == {"subj01": [38]}


def test_roi_file_and_labels_and_ncsnr_threshold(nsd_root, tmp_path):
    convert_nsd(_cfg(nsd_root, tmp_path / "prf", roi={"file": "prf-visualrois", "labels": [1, 2]}))
    prf = np.asarray(nib.load(str(nsd_root / "nsddata/ppdata/subj01/func1pt8mm/roi/prf-visualrois.nii.gz")).dataobj)
    st = open_store(tmp_path / "prf")
    assert st.subjects["subj01"].n_features == int(np.isin(prf, [1, 2]).sum())
    full = open_store(tmp_path / "prf").subjects["subj01"].load_array("ncsnr")
    thr = float(np.median(full))
    convert_nsd(_cfg(nsd_root, tmp_path / "thr", roi={"file": "prf-visualrois", "labels": [1, 2]},
                     ncsnr_threshold=thr, dtype="float16"))
    sub = open_store(tmp_path / "thr").subjects["subj01"]
    assert sub.n_features == int((full > thr).sum()) and sub.responses.dtype == np.float16
    assert (sub.load_array("ncsnr") > thr).all()
    assert not (tmp_path / "thr/subjects/subj01/roi_all_tmp.npy").exists()
    assert json.loads((tmp_path / "thr/dataset.json").read_text())["provenance"]["ncsnr_threshold"] == thr


def test_rerun_is_a_noop_unless_forced(nsd_root, tmp_path):
    store = tmp_path / "nsd"
    first = convert_nsd(_cfg(nsd_root, store))
    assert not first["noop"]
    stamp = (store / "dataset.json").stat().st_mtime_ns
    again = convert_nsd(_cfg(nsd_root, store))
    assert again["noop"] and "up to date" in again["report"]
    assert (store / "dataset.json").stat().st_mtime_ns == stamp
    forced = convert_nsd(_cfg(nsd_root, store, force=True))
    assert not forced["noop"] and (store / "dataset.json").stat().st_mtime_ns != stamp
    with pytest.raises(OutputExistsError, match=r"prepared from another configuration: dataset.val_fraction "
                                                 r"0.1 -> 0.2; .*dataset.replace=true"):
        convert_nsd(_cfg(nsd_root, store, val_fraction=0.2))  # another configuration: refused, store kept
    assert open_store(store).version == forced["store_version"]
    other = convert_nsd(_cfg(nsd_root, store, val_fraction=0.2, replace=True))
    assert not other["noop"] and other["store_version"] != forced["store_version"]


def test_stale_partial_of_dead_process_is_removed(nsd_root, tmp_path):
    store = tmp_path / "nsd"
    stale = tmp_path / "nsd.partial-99999999"
    (stale / "subjects/subj01").mkdir(parents=True)
    (stale / "subjects/subj01/responses.npy").write_bytes(b"half")
    convert_nsd(_cfg(nsd_root, store))
    assert not stale.exists()
    assert open_store(store).subjects["subj01"].responses.shape == (1500, 8)


def test_killed_conversion_then_rerun(root_copy, tmp_path):
    """A conversion killed mid-way leaves no store; the next run cleans up and completes."""
    store = tmp_path / "store"
    code = ("import sys; from braindecode_fw.data.convert.nsd import convert_nsd; "
            f"convert_nsd({{'root': {str(root_copy)!r}, 'store': {str(store)!r}, 'image_size': 425, "
            "'progress': False, 'image_chunk': 1})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while not list(tmp_path.glob("store.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.exists()
    assert list(tmp_path.glob("store.partial-*")), "the kill came too late to leave a partial store"
    convert_nsd(_cfg(root_copy, store))
    assert not list(tmp_path.glob("store.partial-*"))
    assert open_store(store).subjects["subj01"].responses.shape == (1500, 8)


# ---- bad input: clear error naming the file, no store, no partial dir --------------------------


def _truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _bad_missing_session(root):
    (root / BETAS / "betas_session02.nii.gz").unlink()
    return "betas_session02.nii.gz", {"sessions": [1, 2]}


def _bad_mask_shape(root):
    nib.save(nib.Nifti1Image(np.ones((6, 5, 3), np.int16), np.eye(4)), str(root / ROI))
    return "nsdgeneral.nii.gz", {}


def _bad_truncated_hdf5(root):
    _truncate(root / BETAS / "betas_session02.hdf5")
    return "betas_session02.hdf5", {"beta_format": "hdf5"}


def _bad_truncated_nifti(root):
    _truncate(root / BETAS / "betas_session02.nii.gz", 0.6)
    return "betas_session02.nii.gz", {}


def _bad_nan_betas(root):
    p = root / BETAS / "betas_session01.nii.gz"
    img = nib.load(str(p))
    data = np.asarray(img.dataobj).astype(np.float32) / 300
    data[2, 2, 2, 10] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    return "betas_session01.nii.gz", {}


def _bad_expdesign_shape(root):
    mat = loadmat(str(root / EXPDESIGN))
    mat = {k: v for k, v in mat.items() if not k.startswith("__")}
    mat["subjectim"] = mat["subjectim"][:7]
    savemat(root / EXPDESIGN, mat)
    return "nsd_expdesign.mat", {}


def _bad_responses_mismatch(root):
    p = root / "nsddata/ppdata/subj01/behav/responses.tsv"
    lines = p.read_text().splitlines()
    cells = lines[5].split("\t")
    cells[4] = str(int(cells[4]) + 1)
    lines[5] = "\t".join(cells)
    p.write_text("\n".join(lines) + "\n")
    return "responses.tsv", {}


def _bad_responses_rows(root):
    p = root / "nsddata/ppdata/subj01/behav/responses.tsv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:100] + lines[101:]) + "\n")  # session 1 loses a row
    return "responses.tsv: session 1 has 749 rows, expected 750", {}


def _bad_missing_session_of_all(root):
    (root / BETAS / "betas_session02.nii.gz").unlink()  # dataset.sessions=null: every session, so 2 as well
    return "betas_session02.nii.gz missing (dataset.sessions=null converts every session of subj01", {}


STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def _replace_stimuli(root: Path, shape: tuple[int, ...], dtype=np.uint8) -> None:
    """Another ``nsd_stimuli.hdf5`` (the copy links the fixture's: unlink, never write through it)."""
    p = root / STIMULI
    p.unlink()
    with h5py.File(p, "w") as f:
        f.create_dataset("imgBrick", shape=shape, dtype=dtype, chunks=(1, *shape[1:]))


def _bad_stimuli_image_size(root):
    _replace_stimuli(root, (73000, 256, 256, 3))
    return ("nsd_stimuli.hdf5: dataset 'imgBrick' is uint8 (73000, 256, 256, 3), expected uint8 "
            "(73000, 425, 425, 3)"), {}


def _bad_stimuli_dtype(root):
    _replace_stimuli(root, (73000, 425, 425, 3), np.float32)
    return "nsd_stimuli.hdf5: dataset 'imgBrick' is float32 (73000, 425, 425, 3), expected uint8", {}


def _bad_stimuli_truncated(root):
    src = (root / STIMULI).resolve()
    (root / STIMULI).unlink()
    (root / STIMULI).write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return "nsd_stimuli.hdf5: cannot be opened as HDF5, truncated or corrupted", {}


BAD_INPUTS = [_bad_missing_session, _bad_missing_session_of_all, _bad_mask_shape, _bad_truncated_hdf5,
              _bad_truncated_nifti, _bad_nan_betas, _bad_expdesign_shape, _bad_responses_mismatch,
              _bad_responses_rows, _bad_stimuli_image_size, _bad_stimuli_dtype, _bad_stimuli_truncated]
#: refused by the plan/validate phases: nothing may be written (not even a partial folder) before
CAUGHT_BEFORE_WRITING = {_bad_missing_session, _bad_missing_session_of_all, _bad_mask_shape, _bad_expdesign_shape,
                         _bad_responses_mismatch, _bad_responses_rows, _bad_stimuli_image_size,
                         _bad_stimuli_dtype, _bad_stimuli_truncated}


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=[f.__name__[5:] for f in BAD_INPUTS])
def test_bad_input_names_the_file_and_creates_no_store(root_copy, tmp_path, corrupt, monkeypatch):
    fname, extra = corrupt(root_copy)
    store = tmp_path / "out" / "nsd"
    if corrupt in CAUGHT_BEFORE_WRITING:
        import braindecode_fw.data.convert.base as base

        def no_writer(*args, **kwargs):
            raise AssertionError(f"{corrupt.__name__}: a StoreWriter was opened before the input was refused")

        monkeypatch.setattr(base, "StoreWriter", no_writer)
    with pytest.raises(NSDInputError) as err:
        convert_nsd(_cfg(root_copy, store, **extra))
    assert fname in str(err.value)
    assert not store.exists()
    assert not list(store.parent.glob("nsd.partial-*")) if store.parent.exists() else True


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="dataset.root: not set"):
        convert_nsd({"root": None, "store": str(tmp_path / "s")})
    with pytest.raises(ValueError, match="dataset.beta_version"):
        convert_nsd(_cfg(tmp_path, tmp_path / "s", beta_version="b4"))


# ---- validation against the real dataset's invariants ------------------------------------------


def test_real_invariants_with_real_sized_numbers():
    shared = {1: np.arange(1000), 2: np.arange(1000)}
    ok = check_real_invariants(1, sessions=range(1, 41), trials_per_session={s: 750 for s in range(1, 41)},
                               n_test_trials=3000, n_nsdgeneral_voxels=15724, shared_ids=shared)
    assert ok == []
    assert check_real_invariants(4, sessions=range(1, 28), trials_per_session={1: 750}, n_test_trials=1985,
                                 test_convention="legacy", n_nsdgeneral_voxels=13153) == []
    bad = check_real_invariants(3, sessions=range(1, 33), trials_per_session={1: 750, 2: 749},
                                n_test_trials=2300, n_nsdgeneral_voxels=15000,
                                shared_ids={1: np.arange(1000), 3: np.arange(1, 1001)})
    text = "; ".join(bad)
    assert "session 2 has 749 trials" in text and "15000 voxels, expected 15226" in text
    assert "2300 shared1000 test trials, expected 2371" in text and "subj03: shared1000 image ids differ" in text
    # partial subjects: the test-trial count is not checkable
    assert check_real_invariants(1, sessions=[1, 2], trials_per_session={1: 750, 2: 750}, n_test_trials=150) == []
    with pytest.raises(NSDInputError, match="validation failed"):
        apply_validation(bad, "fail")
    apply_validation(bad, "warn")
    apply_validation(bad, "off")
    assert looks_real(1, (81, 104, 83)) and not looks_real(1, (6, 5, 4)) and not looks_real(2, (81, 104, 83))


def test_sessions_as_count_and_out_of_range(nsd_root, tmp_path):
    summary = convert_nsd(_cfg(nsd_root, tmp_path / "one", sessions=1))
    assert summary["subjects"]["subj01"]["sessions"] == [1]
    assert open_store(tmp_path / "one").subjects["subj01"].responses.shape == (750, 8)
    with pytest.raises(ValueError, match=r"dataset.sessions: subj01 has sessions 1..40, got \[41\]"):
        convert_nsd(_cfg(nsd_root, tmp_path / "bad", sessions=[1, 41]))
    assert not (tmp_path / "bad").exists()


def test_validation_is_not_applied_to_the_fixture(nsd_root, tmp_path):
    summary = convert_nsd(_cfg(nsd_root, tmp_path / "nsd", validate="fail"))
    assert summary["subjects"]["subj01"]["n_voxels"] == 8


# ---- console scripts ------------------------------------------------------------------------------


def _run(cmd: str, args: list[str], tmp_path: Path):
    # in this process: a fresh interpreter would spend most of the test importing Lightning
    from tests.conftest import run_cli

    return run_cli(cmd, args, tmp_path)


@pytest.mark.slow
def test_bdf_prepare_then_bdf_train(nsd_root, tmp_path):
    """`bdf-prepare dataset=nsd` then one epoch of MindEye2's NSD recipe shrunk to tiny local models."""
    store = tmp_path / "prepared" / "nsd"
    proc = _run("bdf-prepare", ["dataset=nsd", f"dataset.root={nsd_root}", f"dataset.store={store}",
                                "dataset.image_size=32", "dataset.progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "subj01" in proc.stdout and "1500" in proc.stdout
    again = _run("bdf-prepare", ["dataset=nsd", f"dataset.root={nsd_root}", f"dataset.store={store}",
                                 "dataset.image_size=32", "dataset.progress=false"], tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    no_root = _run("bdf-prepare", ["dataset=nsd", f"dataset.store={tmp_path}/other"], tmp_path)
    assert no_root.returncode == 2 and "bdf-prepare: error: dataset.root: not set" in no_root.stderr
    from tests.conftest import TINY_MODEL

    tiny = [o for o in TINY_MODEL if not o.startswith(("generator.", "trainer.max_epochs"))]
    args = ["experiment=mindeye2_nsd", "dataset=nsd", f"dataset.store={store}", "target=openclip_tiny",
            "~extra_targets.vae", "~extra_targets.teacher", "trainer=cpu", "data.subjects=null", "model.lowlevel=null",
            "model.prior=null", "loss.terms.blur=null", "loss.terms.blur_cont=null", "loss.terms.prior=null",
            *tiny, "trainer.max_epochs=1"]
    proc = _run("bdf-train", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
