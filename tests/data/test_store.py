"""Prepared store: round trip, every validator error, atomic publication."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from braindecode_fw.data.store import StoreValidationError, StoreWriter, TrialTable, open_store


def _write_small(root, *, n_trials=6, n_vox=5, responses=None, trials=None, n_images=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(n_images, 8, 8, 3), dtype=np.uint8)
    trials = trials or TrialTable(
        trial_id=np.arange(n_trials), image_index=np.arange(n_trials) % n_images,
        session=np.arange(n_trials) // 3, run=np.zeros(n_trials, int), repeat=np.arange(n_trials) // n_images,
        split=np.array(["train"] * (n_trials - 2) + ["test"] * 2),
    )
    responses = rng.standard_normal((n_trials, n_vox)).astype(np.float32) if responses is None else responses
    ijk = np.stack([np.arange(n_vox), np.zeros(n_vox, int), np.ones(n_vox, int)], 1)
    with StoreWriter(root, name="tiny", modality="fmri") as w:
        w.write_images(images, ids=[f"im{i}" for i in range(n_images)], captions=[f"c{i}" for i in range(n_images)])
        w.write_subject("subj01", trials, responses, voxel_ijk=ijk, affine=np.diag([1.8, 1.8, 1.8, 1.0]), volume_shape=(8, 2, 3),
                        statistics={"note": "x"})
        w.finalize(provenance={"source": "test"})
    return images, trials, responses, ijk


def test_round_trip(tmp_path):
    root = tmp_path / "store"
    images, trials, responses, ijk = _write_small(root)
    store = open_store(root)
    assert store.name == "tiny" and store.modality == "fmri" and len(store.version) == 16
    np.testing.assert_array_equal(store.images, images)
    assert store.image_metadata["captions"][2] == "c2"
    sub = store.subjects["subj01"]
    assert isinstance(sub.responses, np.memmap)
    np.testing.assert_array_equal(sub.responses, responses)
    for name, col in trials.columns().items():
        np.testing.assert_array_equal(getattr(sub.trials, name), col)
    geo = sub.load_array("geometry")
    np.testing.assert_array_equal(geo["voxel_ijk"], ijk)
    mask = nib.load(sub.directory / "mask.nii.gz")
    assert mask.shape == (8, 2, 3) and int(mask.get_fdata().sum()) == 5
    assert mask.get_fdata()[tuple(ijk.T)].all()
    np.testing.assert_allclose(mask.affine, np.diag([1.8, 1.8, 1.8, 1.0]))
    assert sub.statistics() == {"note": "x"}


def test_version_changes_with_content(tmp_path):
    _write_small(tmp_path / "a")
    _write_small(tmp_path / "b", n_images=5)
    assert open_store(tmp_path / "a").version != open_store(tmp_path / "b").version


def _problems(root) -> list[str]:
    with pytest.raises(StoreValidationError) as e:
        open_store(root)
    return e.value.problems


def test_missing_store_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepared store not found: .*nowhere"):
        open_store(tmp_path / "nowhere")


def test_missing_dataset_json(tmp_path):
    _write_small(tmp_path / "s")
    (tmp_path / "s" / "dataset.json").unlink()
    assert _problems(tmp_path / "s") == ["dataset.json: missing file (not a prepared store)"]


def test_unknown_format_version(tmp_path):
    _write_small(tmp_path / "s")
    p = tmp_path / "s" / "dataset.json"
    meta = json.loads(p.read_text())
    meta["format_version"] = 7
    p.write_text(json.dumps(meta))
    (problem,) = _problems(tmp_path / "s")
    assert problem.startswith("dataset.json: format_version: unknown version 7")


@pytest.mark.parametrize("missing", ["subjects/subj01/responses.npy", "subjects/subj01/trials.tsv",
                                     "images/images.npy", "images/metadata.json"])
def test_missing_files(tmp_path, missing):
    _write_small(tmp_path / "s")
    (tmp_path / "s" / missing).unlink()
    assert f"{missing}: missing file" in _problems(tmp_path / "s")


def test_shape_mismatch_between_trials_and_responses(tmp_path):
    _write_small(tmp_path / "s")
    np.save(tmp_path / "s/subjects/subj01/responses.npy", np.zeros((5, 5), np.float32))
    (p,) = _problems(tmp_path / "s")
    assert p == "subjects/subj01/trials.tsv: 6 trials but responses.npy has 5 rows (shape (5, 5))"


def test_wrong_dtype_and_ndim(tmp_path):
    _write_small(tmp_path / "s")
    np.save(tmp_path / "s/subjects/subj01/responses.npy", np.zeros((6, 5, 2), np.int32))
    probs = _problems(tmp_path / "s")
    assert any("dtype int32, expected float16 or float32" in p for p in probs)
    assert any("3-D array (6, 5, 2), expected 2-D for modality 'fmri'" in p for p in probs)


def test_image_index_out_of_range(tmp_path):
    t = TrialTable(np.arange(6), np.array([0, 1, 2, 3, 4, 9]), np.zeros(6, int), np.zeros(6, int),
                   np.zeros(6, int), np.array(["train"] * 6))
    _write_small(tmp_path / "s", trials=t)
    (p,) = _problems(tmp_path / "s")
    assert p == "subjects/subj01/trials.tsv: image_index: 2 value(s) outside [0, 4), e.g. 4"


def test_nan_inf_in_responses(tmp_path):
    r = np.zeros((6, 5), np.float32)
    r[1, 2], r[4, 0] = np.nan, np.inf
    _write_small(tmp_path / "s", responses=r)
    assert _problems(tmp_path / "s") == ["subjects/subj01/responses.npy: contains 2 NaN/Inf values"]


def test_duplicate_trial_ids_and_bad_split(tmp_path):
    t = TrialTable(np.array([0, 1, 1, 3, 4, 5]), np.zeros(6, int), np.zeros(6, int), np.zeros(6, int),
                   np.zeros(6, int), np.array(["train"] * 5 + ["holdout"]))
    _write_small(tmp_path / "s", trials=t)
    probs = _problems(tmp_path / "s")
    assert "subjects/subj01/trials.tsv: trial_id: 1 duplicated id(s), e.g. 1" in probs
    assert any("split: unknown value 'holdout'" in p for p in probs)


def test_corrupted_responses_file(tmp_path):
    _write_small(tmp_path / "s")
    p = tmp_path / "s/subjects/subj01/responses.npy"
    p.write_bytes(p.read_bytes()[:100])  # truncated
    (problem,) = _problems(tmp_path / "s")
    assert problem.startswith("subjects/subj01/responses.npy: cannot be read as a .npy array")


def test_every_problem_reported_at_once(tmp_path):
    r = np.zeros((6, 5), np.float32)
    r[0, 0] = np.nan
    t = TrialTable(np.array([0, 0, 2, 3, 4, 5]), np.array([0, 1, 2, 3, 0, 99]), np.zeros(6, int),
                   np.zeros(6, int), np.zeros(6, int), np.array(["train"] * 6))
    _write_small(tmp_path / "s", responses=r, trials=t)
    (tmp_path / "s/images/metadata.json").unlink()
    with pytest.raises(StoreValidationError, match="4 problems") as e:
        open_store(tmp_path / "s")
    assert len(e.value.problems) == 4
    assert str(e.value).count("\n") == 0  # one line


def test_failed_write_leaves_nothing(tmp_path):
    root = tmp_path / "store"
    with pytest.raises(RuntimeError), StoreWriter(root, name="x", modality="fmri") as w:
        w.write_images(np.zeros((2, 4, 4, 3), np.uint8), ids=["a", "b"])
        raise RuntimeError("killed")
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_write_never_opens(tmp_path):
    """A process killed mid-write leaves only a .partial directory, which is never opened."""
    root = tmp_path / "store"
    w = StoreWriter(root, name="x", modality="fmri").__enter__()
    w.write_images(np.zeros((2, 4, 4, 3), np.uint8), ids=["a", "b"])
    # no finalize, no __exit__: as after SIGKILL
    with pytest.raises(FileNotFoundError, match="incomplete write"):
        open_store(root)


def test_overwrite_replaces_atomically(tmp_path):
    root = tmp_path / "s"
    _write_small(root)
    with pytest.raises(FileExistsError):
        StoreWriter(root, name="x", modality="fmri").__enter__()
    v1 = open_store(root).version
    with StoreWriter(root, name="tiny", modality="fmri", overwrite=True) as w:
        w.write_images(np.zeros((2, 4, 4, 3), np.uint8), ids=["a", "b"])
        w.finalize(provenance={})
    store = open_store(root)
    assert store.version != v1 and store.subjects == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="modality must be one of"):
        StoreWriter(tmp_path / "s", name="x", modality="eeg")
    with StoreWriter(tmp_path / "s", name="x", modality="fmri") as w:
        with pytest.raises(ValueError, match=r"images must be uint8 \(n, h, w, 3\), got float32"):
            w.write_images(np.zeros((2, 4, 4, 3), np.float32), ids=["a", "b"])
        with pytest.raises(ValueError, match="images/metadata.json: captions has 1 entries, expected 2"):
            w.write_images(np.zeros((2, 4, 4, 3), np.uint8), ids=["a", "b"], captions=["c"])
        with pytest.raises(ValueError, match=r"write_images\(\) must be called before finalize"):
            w.finalize(provenance={})


def test_every_writer_removes_what_a_killed_writer_left(tmp_path):
    """A killed bdf-prepare (any converter, or the synthetic world generator) leaves
    ``<store>.partial-<pid>``; the next StoreWriter of that store removes it, and refuses to start
    beside a writer that is still alive."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    root = tmp_path / "store"
    stale = tmp_path / f"store.partial-{dead_pid}"
    (stale / "subjects").mkdir(parents=True)
    (stale / "subjects" / "big.npy").write_bytes(b"\0" * 1024)
    _write_small(root)
    assert not stale.exists() and len(open_store(root).images) == 4
    alive = tmp_path / f"store.partial-{os.getppid()}"
    alive.mkdir()
    with pytest.raises(FileExistsError, match=rf"store.partial-{os.getppid()}: another process \(pid "):
        with StoreWriter(root, name="x", modality="fmri", overwrite=True):
            pass
    assert alive.exists()  # never removed while its writer lives
