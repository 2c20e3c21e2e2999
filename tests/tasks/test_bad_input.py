"""The bad-input corpus: mistakes a new user makes with each console script, each of which must end
in exit code 2 and one line ``bdf-<cmd>: error: ...`` naming the key, file or field, what was given
and what was expected — and must leave nothing behind: no run folder, no store, no change to the
inputs it was pointed at.

Each case runs the real command inside this process (``tests.conftest.run_cli``) in a fresh
``BDF_ROOT``. Inputs shared between cases (a trained tiny run, fixtures in the real NSD,
THINGS-MEG and MindEye2 formats) are built once per module and hashed before and after every case.
More focused checks of single converters live next to them (tests/data/convert/).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, TINY_WORLD, checkpoint_of, run_cli


@dataclass(frozen=True)
class Case:
    """One bad input. ``args`` may hold ``{placeholders}`` filled from the module's shared inputs
    (``store``, ``ckpt``, ``ckpt1`` (subj01 only), ``run``, ``nsd``, ``things``, ``things_images``, ``mindeye2``) and from
    what ``setup`` returns; every string of ``needles`` must appear in the one error line."""

    cmd: str
    args: tuple[str, ...]
    needles: tuple[str, ...]
    setup: Callable[[Path, dict], dict] | None = None
    tiny: bool = True  # add the tiny world/model overrides (bdf-train, bdf-prepare synthetic)


# --- setups: each builds one broken input under the case's own folder and names it -------------

def _garbage_ckpt(tmp: Path, shared: dict) -> dict:
    p = tmp / "inputs" / "garbage.ckpt"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"this is not a checkpoint\n" * 10)
    return {"bad": str(p)}


def _truncated_ckpt(tmp: Path, shared: dict) -> dict:
    p = tmp / "inputs" / "truncated.ckpt"
    p.parent.mkdir(parents=True)
    data = Path(shared["ckpt"]).read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return {"bad": str(p)}


class _RunsCode:
    """Unpickling this runs ``os.system``: a checkpoint that attacks whoever loads it."""

    def __reduce__(self):
        return (os.system, ("echo PWNED > pwned.txt",))


def _pickle_payload_ckpt(tmp: Path, shared: dict) -> dict:
    import torch

    p = tmp / "inputs" / "payload.ckpt"
    p.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _RunsCode()}, p)
    return {"bad": str(p)}


def _zip_without_data_ckpt(tmp: Path, shared: dict) -> dict:
    p = tmp / "inputs" / "empty_zip.ckpt"
    p.parent.mkdir(parents=True)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/readme.txt", "no tensors here")
    return {"bad": str(p)}


def _a_file(tmp: Path, shared: dict) -> dict:
    p = tmp / "inputs" / "a_file.txt"
    p.parent.mkdir(parents=True)
    p.write_text("x")
    return {"bad": str(p)}


def _empty_folder(tmp: Path, shared: dict) -> dict:
    p = tmp / "inputs" / "empty"
    p.mkdir(parents=True)
    return {"bad": str(p)}


def _store_copy(tmp: Path, shared: dict, edit: Callable[[Path], None]) -> dict:
    dst = tmp / "inputs" / "store"
    shutil.copytree(shared["store"], dst)
    edit(dst)
    return {"bad": str(dst)}


def _store_without_dataset_json(tmp: Path, shared: dict) -> dict:
    return _store_copy(tmp, shared, lambda s: (s / "dataset.json").unlink())


def _store_with_broken_dataset_json(tmp: Path, shared: dict) -> dict:
    return _store_copy(tmp, shared, lambda s: (s / "dataset.json").write_text("{not json"))


def _store_with_truncated_responses(tmp: Path, shared: dict) -> dict:
    def edit(s: Path) -> None:
        p = s / "subjects" / "subj01" / "responses.npy"
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])

    return _store_copy(tmp, shared, edit)


def _store_with_images_missing(tmp: Path, shared: dict) -> dict:
    return _store_copy(tmp, shared, lambda s: (s / "images" / "images.npy").unlink())


def _nsd_copy(tmp: Path, shared: dict, edit: Callable[[Path], None]) -> dict:
    dst = tmp / "inputs" / "nsd"
    shutil.copytree(shared["nsd"], dst, symlinks=True)
    edit(dst)
    return {"bad": str(dst)}


def _nsd_without_expdesign(tmp: Path, shared: dict) -> dict:
    return _nsd_copy(tmp, shared, lambda r: (r / "nsddata/experiments/nsd/nsd_expdesign.mat").unlink())


def _nsd_without_mask(tmp: Path, shared: dict) -> dict:
    return _nsd_copy(tmp, shared, lambda r: (r / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").unlink())


def _nsd_with_garbage_stimuli(tmp: Path, shared: dict) -> dict:
    def edit(r: Path) -> None:
        p = r / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
        p.unlink()
        p.write_bytes(b"not hdf5" * 100)

    return _nsd_copy(tmp, shared, edit)


def _things_without(pattern: str) -> Callable[[Path, dict], dict]:
    """A setup: a copy of the THINGS-MEG fixture without the files matching ``pattern``."""

    def setup(tmp: Path, shared: dict) -> dict:
        dst = tmp / "inputs" / "things"
        shutil.copytree(shared["things"], dst, symlinks=True)
        for p in dst.rglob(pattern):
            p.unlink()
        return {"bad": str(dst)}

    return setup


_things_without_events = _things_without("*_events.tsv")
_things_without_run2 = _things_without("*_run-02_meg.*")


def _nsd_with_small_stimuli(tmp: Path, shared: dict) -> dict:
    def edit(r: Path) -> None:
        import h5py

        p = r / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
        p.unlink()  # a link to the shared fixture's: never write through it
        with h5py.File(p, "w") as f:  # a re-saved brick of smaller images (chunks allocated lazily)
            f.create_dataset("imgBrick", shape=(73000, 256, 256, 3), dtype="uint8", chunks=(1, 256, 256, 3))

    return _nsd_copy(tmp, shared, edit)


def _nsd_without_session2(tmp: Path, shared: dict) -> dict:
    return _nsd_copy(tmp, shared, lambda r: (r / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/"
                                                "betas_session02.nii.gz").unlink())


def _prepared_world(tmp: Path, shared: dict) -> dict:
    """The tiny world (seed 0) at a store path ending in its dataset.name, as bdf-prepare left it."""
    dst = tmp / "inputs" / "prepared" / "synthetic"
    shutil.copytree(shared["store"], dst)
    return {"bad": str(dst)}


def _mindeye2_without_betas(tmp: Path, shared: dict) -> dict:
    dst = tmp / "inputs" / "mindeye2"
    shutil.copytree(shared["mindeye2"], dst, symlinks=True)
    for p in dst.rglob("betas_all_subj01*.hdf5"):
        p.unlink()
    return {"bad": str(dst)}


W = tuple(TINY_WORLD)
S = ("dataset.store={bad}",)
#: the generator the tiny checkpoint was trained with (tests.conftest.TINY_MODEL)
R = tuple(a for a in TINY_MODEL if a.startswith("generator"))

CASES: dict[str, Case] = {
    # ---- bdf-prepare: the synthetic fMRI world ---------------------------------------------------
    "prepare/unknown-dataset": Case("bdf-prepare", ("dataset=nds",), ("dataset", "nds", "nsd")),
    "prepare/typo-world-key": Case("bdf-prepare", ("dataset.world.sed=3",), ("dataset.world.sed", "dataset.world.seed")),
    "prepare/seed-not-int": Case("bdf-prepare", ("dataset.world.seed=abc",), ("dataset.world.seed", "integer", "'abc'")),
    "prepare/image-size-zero": Case("bdf-prepare", ("dataset.world.image_size=0",), ("dataset.world.image_size", "0")),
    "prepare/voxels-negative": Case("bdf-prepare", ("dataset.world.voxels_per_subject=[60,-5]",), ("dataset.world.voxels_per_subject", "-5")),
    "prepare/volume-2d": Case("bdf-prepare", ("dataset.world.volume_shape=[10,12]",), ("dataset.world.volume_shape", "3")),
    "prepare/volume-too-small": Case("bdf-prepare", ("dataset.world.volume_shape=[2,2,2]",), ("dataset.world.voxels_per_subject", "dataset.world.volume_shape [2, 2, 2]")),
    "prepare/n-test-zero": Case("bdf-prepare", ("dataset.world.n_test_images=0",), ("dataset.world.n_test_images", "0")),
    "prepare/val-fraction-above-1": Case("bdf-prepare", ("dataset.world.val_fraction=1.5",), ("dataset.world.val_fraction", "1.5")),
    "prepare/rf-size-scalar": Case("bdf-prepare", ("dataset.world.rf_size=0.1",), ("dataset.world.rf_size",)),
    "prepare/ncsnr-median-negative": Case("bdf-prepare", ("dataset.world.ncsnr.median=-1",), ("dataset.world.ncsnr.median", "-1")),
    "prepare/dtype-unknown": Case("bdf-prepare", ("dataset.world.dtype=float8",), ("dataset.world.dtype", "float8")),
    "prepare/store-of-another-seed": Case("bdf-prepare", (*S, "dataset.world.seed=3"), ("dataset.store", "inputs/prepared/synthetic", "dataset.world.seed 0 -> 3", "dataset.replace=true", "dataset.name=<new name>"), _prepared_world),
    "prepare/replace-not-bool": Case("bdf-prepare", ("dataset.replace=maybe",), ("dataset.replace", "'maybe'")),
    "prepare/store-half-copied": Case("bdf-prepare", S, ("dataset.store", "not a finished store (no dataset.json)", "dataset.replace=true"), _store_without_dataset_json),
    "prepare/validate-unknown": Case("bdf-prepare", ("dataset=nsd", "dataset.validate=maybe"), ("dataset.validate", "maybe"), tiny=False),
    # ---- bdf-prepare: the synthetic MEG world ---------------------------------------------------
    "prepare/meg-tmax-negative": Case("bdf-prepare", ("dataset=synthetic_meg", "dataset.world.tmax=-1"), ("dataset.world.baseline", "tmax=-1"), tiny=False),
    "prepare/meg-sfreq-word": Case("bdf-prepare", ("dataset=synthetic_meg", "dataset.world.sfreq=fast"), ("dataset.world.sfreq", "'fast'"), tiny=False),
    "prepare/meg-typo-key": Case("bdf-prepare", ("dataset=synthetic_meg", "dataset.world.n_sensor=10"), ("dataset.world.n_sensor",), tiny=False),
    # ---- bdf-prepare: NSD ---------------------------------------------------------------------
    "prepare/nsd-root-missing": Case("bdf-prepare", ("dataset=nsd", "dataset.root=/nowhere/nsd"), ("/nowhere/nsd",), tiny=False),
    "prepare/nsd-chunk-not-int": Case("bdf-prepare", ("dataset=nsd", "dataset.chunk_trials=abc"), ("dataset.chunk_trials", "'abc'"), tiny=False),
    "prepare/nsd-chunk-negative": Case("bdf-prepare", ("dataset=nsd", "dataset.chunk_trials=-5"), ("dataset.chunk_trials", "-5"), tiny=False),
    "prepare/nsd-unknown-subject": Case("bdf-prepare", ("dataset=nsd", "dataset.root={nsd}", "dataset.subjects=[9]", "dataset.image_size=32"), ("dataset.subjects", "1..8", "[9]"), tiny=False),
    "prepare/nsd-no-expdesign": Case("bdf-prepare", ("dataset=nsd", "dataset.root={bad}", "dataset.image_size=32"), ("nsd_expdesign.mat",), _nsd_without_expdesign, tiny=False),
    "prepare/nsd-no-mask": Case("bdf-prepare", ("dataset=nsd", "dataset.root={bad}", "dataset.image_size=32"), ("nsdgeneral",), _nsd_without_mask, tiny=False),
    "prepare/nsd-garbage-stimuli": Case("bdf-prepare", ("dataset=nsd", "dataset.root={bad}", "dataset.image_size=32"), ("nsd_stimuli.hdf5",), _nsd_with_garbage_stimuli, tiny=False),
    "prepare/nsd-stimuli-other-size": Case("bdf-prepare", ("dataset=nsd", "dataset.root={bad}", "dataset.image_size=32"), ("nsd_stimuli.hdf5", "'imgBrick'", "uint8 (73000, 256, 256, 3)", "expected uint8 (73000, 425, 425, 3)"), _nsd_with_small_stimuli, tiny=False),
    "prepare/nsd-session-missing": Case("bdf-prepare", ("dataset=nsd", "dataset.root={bad}", "dataset.image_size=32"), ("betas_session02.nii.gz missing", "dataset.sessions=null", "dataset.sessions=[1]"), _nsd_without_session2, tiny=False),
    # ---- bdf-prepare: THINGS-MEG and MindEye2 imports ---------------------------------------------
    "prepare/things-images-root-not-set": Case("bdf-prepare", ("dataset=things_meg", "dataset.root=/nowhere/things"), ("dataset.images_root", "not set"), tiny=False),
    "prepare/things-root-missing": Case("bdf-prepare", ("dataset=things_meg", "dataset.root=/nowhere/things", "dataset.images_root={things_images}"), ("/nowhere/things",), tiny=False),
    "prepare/things-no-events": Case("bdf-prepare", ("dataset=things_meg", "dataset.root={bad}", "dataset.images_root={things_images}", "dataset.image_size=24"), ("events.tsv",), _things_without_events, tiny=False),
    "prepare/things-run-missing": Case("bdf-prepare", ("dataset=things_meg", "dataset.root={bad}", "dataset.images_root={things_images}", "dataset.image_size=24"), ("sub-BIGMEG1_ses-01_task-main_run-02_meg.ds", "dataset.sessions=null"), _things_without_run2, tiny=False),
    "prepare/things-image-size-abc": Case("bdf-prepare", ("dataset=things_meg", "dataset.image_size=abc"), ("dataset.image_size", "'abc'"), tiny=False),
    "prepare/mindeye2-root-missing": Case("bdf-prepare", ("dataset=mindeye2", "dataset.root=/nowhere/me2"), ("/nowhere/me2",), tiny=False),
    "prepare/mindeye2-no-betas": Case("bdf-prepare", ("dataset=mindeye2", "dataset.root={bad}", "dataset.subjects=[1]"), ("betas_all_subj01",), _mindeye2_without_betas, tiny=False),
    "prepare/mindeye2-convention": Case("bdf-prepare", ("dataset=mindeye2", "dataset.test_convention=newest"), ("dataset.test_convention", "newest"), tiny=False),
    "prepare/mindeye2-chunk-abc": Case("bdf-prepare", ("dataset=mindeye2", "dataset.chunk_rows=abc"), ("dataset.chunk_rows", "'abc'"), tiny=False),
    # ---- bdf-train -------------------------------------------------------------------------------
    "train/typo-key": Case("bdf-train", ("trainer.max_epoch=3",), ("trainer.max_epoch", "trainer.max_epochs")),
    "train/unknown-model": Case("bdf-train", ("model=mindeye3",), ("model", "mindeye3", "mindeye2")),
    "train/unknown-experiment": Case("bdf-train", ("experiment=nope",), ("experiment", "nope")),
    "train/unknown-logger": Case("bdf-train", ("logger=tensorbored",), ("logger", "tensorbored")),
    "train/epochs-not-int": Case("bdf-train", ("trainer.max_epochs=abc",), ("trainer.max_epochs", "'abc'")),
    "train/epochs-zero": Case("bdf-train", ("trainer.max_epochs=0",), ("trainer.max_epochs", "0")),
    "train/lr-word": Case("bdf-train", ("optim.optimizer.lr=fast",), ("optim.optimizer.lr", "'fast'")),
    "train/lr-negative": Case("bdf-train", ("optim.optimizer.lr=-1e-3",), ("optim.optimizer.lr", "-0.001")),
    "train/weight-decay-negative": Case("bdf-train", ("optim.optimizer.weight_decay=-1",), ("optim.optimizer.weight_decay", "-1")),
    "train/batch-zero": Case("bdf-train", ("data.batch_size=0",), ("data.batch_size", "0")),
    "train/workers-negative": Case("bdf-train", ("data.num_workers=-1",), ("data.num_workers", "-1")),
    "train/accumulate-zero": Case("bdf-train", ("trainer.accumulate_grad_batches=0",), ("trainer.accumulate_grad_batches", "0")),
    "train/subset-not-int": Case("bdf-train", ("evaluation.subset_size=abc",), ("evaluation.subset_size", "'abc'")),
    "train/subset-one": Case("bdf-train", ("evaluation.subset_size=1",), ("evaluation.subset_size", "1")),
    "train/seed-not-int": Case("bdf-train", ("seed=abc",), ("seed", "'abc'")),
    "train/precision-unknown": Case("bdf-train", ("trainer.precision=banana",), ("precision", "banana")),
    "train/accelerator-unknown": Case("bdf-train", ("trainer.accelerator=tpuu",), ("accelerator", "tpuu")),
    "train/store-missing": Case("bdf-train", ("dataset.store=/nowhere/store", "dataset.auto_prepare=false"), ("dataset.store", "/nowhere/store", "bdf-prepare")),
    "train/store-is-a-file": Case("bdf-train", ("dataset.store={bad}", "dataset.auto_prepare=false"), ("a_file.txt",), _a_file),
    "train/store-empty-folder": Case("bdf-train", ("dataset.store={bad}", "dataset.auto_prepare=false"), ("empty",), _empty_folder),
    "train/store-no-dataset-json": Case("bdf-train", (*S, "dataset.auto_prepare=false"), ("dataset.store", "inputs/store", "not a finished store (no dataset.json)"), _store_without_dataset_json),
    "train/store-no-dataset-json-auto": Case("bdf-train", S, ("dataset.store", "inputs/store", "not a finished store (no dataset.json)"), _store_without_dataset_json),
    "train/store-of-another-seed": Case("bdf-train", (*S, "dataset.world.seed=3"), ("dataset.store", "dataset.world.seed 0 -> 3", "dataset.replace=true", "dataset.name=<new name>"), _prepared_world),
    "train/store-broken-dataset-json": Case("bdf-train", (*S, "dataset.auto_prepare=false"), ("dataset.json",), _store_with_broken_dataset_json),
    "train/store-truncated-responses": Case("bdf-train", (*S, "dataset.auto_prepare=false"), ("responses.npy",), _store_with_truncated_responses),
    "train/store-no-images": Case("bdf-train", (*S, "dataset.auto_prepare=false"), ("images.npy",), _store_with_images_missing),
    "train/unknown-subject": Case("bdf-train", ("dataset.store={store}", "dataset.auto_prepare=false", "data.subjects=[subj09]"), ("subj09", "subj01")),
    "train/constructor-typo": Case("bdf-train", ("+model.hiden=32",), ("hiden",)),
    "train/ckpt-path-missing": Case("bdf-train", ("ckpt_path=/nowhere/last.ckpt",), ("ckpt_path", "/nowhere/last.ckpt")),
    "train/ckpt-path-garbage": Case("bdf-train", ("ckpt_path={bad}",), ("ckpt_path", "garbage.ckpt"), _garbage_ckpt),
    "train/ckpt-path-truncated": Case("bdf-train", ("ckpt_path={bad}",), ("ckpt_path", "truncated.ckpt"), _truncated_ckpt),
    "train/ckpt-path-pickle-payload": Case("bdf-train", ("ckpt_path={bad}",), ("payload.ckpt",), _pickle_payload_ckpt),
    "train/ckpt-last-without-run": Case("bdf-train", ("ckpt_path=last",), ("ckpt_path=last",)),
    "train/init-from-missing": Case("bdf-train", ("init_from=/nowhere/best.ckpt",), ("init_from", "/nowhere/best.ckpt")),
    "train/init-from-garbage": Case("bdf-train", ("init_from={bad}",), ("init_from", "garbage.ckpt"), _garbage_ckpt),
    # ---- bdf-evaluate ----------------------------------------------------------------------------
    "evaluate/nothing-given": Case("bdf-evaluate", (), ("run", "recon_dir", "ckpt"), tiny=False),
    "evaluate/ckpt-missing": Case("bdf-evaluate", ("ckpt=/nowhere/best.ckpt",), ("ckpt", "/nowhere/best.ckpt"), tiny=False),
    "evaluate/ckpt-garbage": Case("bdf-evaluate", ("ckpt={bad}",), ("garbage.ckpt",), _garbage_ckpt, tiny=False),
    "evaluate/ckpt-truncated": Case("bdf-evaluate", ("ckpt={bad}",), ("truncated.ckpt",), _truncated_ckpt, tiny=False),
    "evaluate/ckpt-pickle-payload": Case("bdf-evaluate", ("ckpt={bad}",), ("payload.ckpt",), _pickle_payload_ckpt, tiny=False),
    "evaluate/ckpt-zip-without-data": Case("bdf-evaluate", ("ckpt={bad}",), ("empty_zip.ckpt",), _zip_without_data_ckpt, tiny=False),
    "evaluate/run-missing": Case("bdf-evaluate", ("run=/nowhere/run",), ("run", "/nowhere/run"), tiny=False),
    "evaluate/run-not-reconstructions": Case("bdf-evaluate", ("run={bad}",), ("empty",), _empty_folder, tiny=False),
    "evaluate/recon-without-gt": Case("bdf-evaluate", ("recon_dir={bad}",), ("gt_dir",), _empty_folder, tiny=False),
    "evaluate/subset-one": Case("bdf-evaluate", ("ckpt={ckpt}", "retrieval.subset_size=1"), ("retrieval.subset_size", "1"), tiny=False),
    "evaluate/subset-word": Case("bdf-evaluate", ("ckpt={ckpt}", "retrieval.subset_size=all"), ("retrieval.subset_size", "'all'"), tiny=False),
    "evaluate/n-subsets-zero": Case("bdf-evaluate", ("ckpt={ckpt}", "retrieval.n_subsets=0"), ("retrieval.n_subsets", "0"), tiny=False),
    "evaluate/store-missing": Case("bdf-evaluate", ("ckpt={ckpt}", "store=/nowhere/store"), ("/nowhere/store",), tiny=False),
    "evaluate/test-set-unknown": Case("bdf-evaluate", ("ckpt={ckpt}", "test_set=huge"), ("test_set", "huge"), tiny=False),
    "evaluate/metrics-unknown": Case("bdf-evaluate", ("ckpt={ckpt}", "metrics=fancy"), ("metrics", "fancy"), tiny=False),
    "evaluate/typo-key": Case("bdf-evaluate", ("ckpt={ckpt}", "retrieval.subset=10"), ("retrieval.subset", "did you mean 'retrieval.subset_size'"), tiny=False),
    # ---- bdf-reconstruct -------------------------------------------------------------------------
    "reconstruct/ckpt-not-given": Case("bdf-reconstruct", (), ("ckpt",), tiny=False),
    "reconstruct/ckpt-missing": Case("bdf-reconstruct", ("ckpt=/nowhere/best.ckpt",), ("/nowhere/best.ckpt",), tiny=False),
    "reconstruct/ckpt-garbage": Case("bdf-reconstruct", ("ckpt={bad}",), ("garbage.ckpt",), _garbage_ckpt, tiny=False),
    "reconstruct/ckpt-pickle-payload": Case("bdf-reconstruct", ("ckpt={bad}",), ("payload.ckpt",), _pickle_payload_ckpt, tiny=False),
    "reconstruct/n-samples-zero": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "n_samples=0"), ("n_samples", "0"), tiny=False),
    "reconstruct/batch-zero": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "batch_size=0"), ("batch_size", "0"), tiny=False),
    "reconstruct/limit-zero": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "limit=0"), ("limit", "0"), tiny=False),
    "reconstruct/split-unknown": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "split=holdout"), ("split", "holdout"), tiny=False),
    "reconstruct/unknown-subject": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "subjects=[subj09]"), ("subj09",), tiny=False),
    "reconstruct/unknown-generator": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "generator=sd99"), ("generator", "sd99"), tiny=False),
    "reconstruct/out-is-a-file": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "out={bad}"), ("a_file.txt",), _a_file, tiny=False),
    "reconstruct/seed-word": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "seed=abc"), ("seed", "'abc'"), tiny=False),
    "reconstruct/store-missing": Case("bdf-reconstruct", (*R, "ckpt={ckpt}", "store=/nowhere/store"), ("/nowhere/store",), tiny=False),
    # ---- bdf-adapt -------------------------------------------------------------------------------
    "adapt/ckpt-not-given": Case("bdf-adapt", ("subject=subj02",), ("ckpt",), tiny=False),
    "adapt/subject-not-given": Case("bdf-adapt", ("ckpt={ckpt1}",), ("subject",), tiny=False),
    "adapt/ckpt-missing": Case("bdf-adapt", ("ckpt=/nowhere/best.ckpt", "subject=subj02"), ("/nowhere/best.ckpt",), tiny=False),
    "adapt/ckpt-garbage": Case("bdf-adapt", ("ckpt={bad}", "subject=subj02"), ("garbage.ckpt",), _garbage_ckpt, tiny=False),
    "adapt/unknown-subject": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj09"), ("subj09",), tiny=False),
    "adapt/two-budgets": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "budget.sessions=1", "budget.trials=10"), ("budget",), tiny=False),
    "adapt/sessions-zero": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "budget.sessions=0"), ("budget.sessions", "0"), tiny=False),
    "adapt/minutes-negative": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "budget.sessions=null", "budget.minutes=-3"), ("budget.minutes", "-3"), tiny=False),
    "adapt/unknown-adaptation": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "adaptation=everything"), ("adaptation", "everything"), tiny=False),
    "adapt/init-unknown": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "adaptation.init=lasso"), ("adaptation.init", "lasso"), tiny=False),
    "adapt/trial-seconds-negative": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "trial_seconds=-4"), ("trial_seconds", "-4"), tiny=False),
    "adapt/batch-zero": Case("bdf-adapt", ("ckpt={ckpt1}", "subject=subj02", "batch_size=0"), ("batch_size", "0"), tiny=False),
}

# --- shared inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tiny_train_run, tiny_subj01_run, tmp_path_factory) -> dict:
    from braindecode_fw.data.convert.mindeye_fixture import write_mindeye2_fixture
    from braindecode_fw.data.convert.nsd_fixture import write_nsd_fixture
    from braindecode_fw.data.convert.things_meg_fixture import write_things_meg_fixture

    proc, root = tiny_train_run
    proc1, root1 = tiny_subj01_run  # the source model of bdf-adapt, which adds subj02
    assert proc.returncode == 0 and proc1.returncode == 0, (proc.stderr + proc1.stderr)[-3000:]
    ckpt1 = checkpoint_of(proc1)
    base = tmp_path_factory.mktemp("bad_input_inputs")
    write_nsd_fixture(base / "nsd")
    things = write_things_meg_fixture(base / "things" / "ds004212")
    write_mindeye2_fixture(base / "mindeye2")
    ckpt = checkpoint_of(proc)
    return {"store": str(root / "data" / "prepared" / "synthetic"), "ckpt": ckpt,
            "run": str(Path(ckpt).parents[1]), "train_root": str(root), "ckpt1": ckpt1,
            "train1_root": str(root1), "nsd": str(base / "nsd"),
            "things": str(things["root"]), "things_images": str(things["images_root"]),
            "mindeye2": str(base / "mindeye2"), "inputs": str(base)}


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha1 of its bytes (links by their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _in_complete_store(root: Path, rel: str) -> bool:
    parts = Path(rel).parts
    return len(parts) > 3 and parts[:2] == ("data", "prepared") and (root / Path(*parts[:3]) / "dataset.json").is_file()


def _shared_trees(shared: dict) -> dict[str, dict[str, str]]:
    return {k: _tree(Path(shared[k])) for k in ("train_root", "train1_root", "inputs")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_leaves_nothing(name, shared, tmp_path):
    case = CASES[name]
    root = tmp_path / "root"
    root.mkdir()
    values = dict(shared)
    if case.setup is not None:
        values.update(case.setup(tmp_path, shared))
    args = [a.format(**values) for a in case.args]
    if case.tiny and case.cmd in ("bdf-train", "bdf-prepare"):
        args = [*W, *(TINY_MODEL if case.cmd == "bdf-train" else ()), *args]
    before_inputs = _tree(tmp_path / "inputs") if (tmp_path / "inputs").exists() else {}
    before_shared = _shared_trees(shared)

    proc = run_cli(case.cmd, args, root)

    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("bdf-")]
    assert len(lines) == 1 and lines[0].startswith(f"{case.cmd}: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in case.needles:
        assert needle in lines[0], f"{name}: {needle!r} not in: {lines[0]}"
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    # what may stay: complete, reusable products of the valid part of the command (a world
    # auto-prepared from a valid dataset config, content-addressed target/generator caches) — never
    # a run folder, never a temporary
    stray = [p for p in left if not (p.startswith("data/cache/") or _in_complete_store(root, p))
             or any(t in p for t in (".partial", ".tmp", ".replaced", ".old-"))]
    assert stray == [], f"{name}: left behind {stray}"
    assert not (root / "pwned.txt").exists() and not Path("pwned.txt").exists(), "a checkpoint ran code"
    if before_inputs:
        assert _tree(tmp_path / "inputs") == before_inputs, f"{name}: changed its input"
    assert _shared_trees(shared) == before_shared, f"{name}: changed a shared input"


def test_the_corpus_covers_every_command():
    by_command: dict[str, int] = {}
    for case in CASES.values():
        by_command[case.cmd] = by_command.get(case.cmd, 0) + 1
    assert set(by_command) == {"bdf-prepare", "bdf-train", "bdf-evaluate", "bdf-reconstruct", "bdf-adapt"}
    assert sum(by_command.values()) >= 80, by_command
