"""Import MindEye2's preprocessed release and MindEye1's ``webdataset_avg_split`` into a prepared store.

``bdf-prepare dataset=mindeye2 dataset.root=<MindEye2 data_path>`` (docs/datasets/mindeye.md) reads

- ``betas_all_subjXX_fp32_renorm.hdf5`` (``betas`` float32 ``(n_trials, n_voxels)``, row = global trial),
- ``coco_images_224_float16.hdf5`` (``images`` float16 ``(73000, 3, 224, 224)`` in [0, 1]),
- ``shared1000.npy`` (bool over the 73k ids),
- the webdataset behaviour tars ``wds/subjXX/train/{0..S-1}.tar`` and ``wds/subjXX/new_test/0.tar``
  (``dataset.test_convention=new``) or ``wds/subjXX/test/0.tar`` (``legacy``), whose ``behav.npy``
  ``(1, 17)`` rows give the 73k id (column 0), session (2, 1-based), run (3, 1-based), global trial (5)
  and the shared1000 flag (16); ``-1`` stands for NaN.

The betas are copied bit-exact, *not* re-normalised: MindEye2 already z-scored every voxel with
training-trial statistics. The store says so in ``provenance.normalisation = "mindeye2_renorm"`` and
``provenance.zscore_at_load = false``, the flag the datamodule reads to skip its own per-session
z-scoring (docs/datasets/mindeye.md, "No double z-scoring").

``bdf-prepare dataset=mindeye1_avg dataset.root=<webdataset_avg_split>`` (docs/datasets/mindeye.md) reads
MindEye1's tars ``{train,val,test}/{split}_subjXX_{k}.tar`` or MindBridge's extracted layout
``{train,val,test}/subjXX/sampleNNNNNNNNN.<ext>``; every sample's ``nsdgeneral.npy`` ``(3, n_voxels)``
becomes three trial rows (``repeat`` 0..2), ``jpg`` the stimulus, ``coco73k.npy`` its 73k id.

Both stream subject by subject (betas read in blocks of sorted rows into ``open_responses`` memory
maps, images in chunks of sorted unique ids), check every input before the heavy writes, and fail
with the file and what was expected; a failed run leaves no store (``StoreWriter`` removes its
partial folder). A complete store built from the same inputs and options is left as is unless
``dataset.force=true``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from braindecode_fw.data.convert.base import Converter, Written
from braindecode_fw.data.convert.common import is_val_image
from braindecode_fw.data.store import ImageStream, StoreWriter, TrialTable
from braindecode_fw.errors import DataError, MissingFileError
from braindecode_fw.schema import FROM_YAML, config_dataclass, dataclass_from_mapping, setting

log = logging.getLogger(__name__)

CONVERTER_VERSION = "2"  # 2: validation images by the shared hash rule (convert.common)
N_IMAGES_73K = 73000
TRIALS_PER_SESSION = 750
BEHAV_COLUMNS = 17
# column indices of MindEye2's behav.npy (docs/datasets/mindeye.md)
COL_ID73K, COL_SESSION, COL_RUN, COL_GLOBAL_TRIAL, COL_SHARED = 0, 2, 3, 5, 16

# real-data expectations (docs/datasets/mindeye.md), checked only when the arrays have real sizes
ME2_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
ME2_TEST_TRIALS = {
    "new": {1: 3000, 2: 3000, 3: 2371, 4: 2188, 5: 3000, 6: 2371, 7: 3000, 8: 2188},
    "legacy": {1: 2770, 2: 2770, 3: 2113, 4: 1985, 5: 2770, 6: 2113, 7: 2770, 8: 1985},
}
NSDGENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
ME1_COUNTS = {1: {"train": 8559, "val": 300, "test": 982}}
REAL_MIN_VOXELS = 1000  # below this the data are a fixture: real-size checks are skipped
TEST_TARS = {"new": "new_test", "legacy": "test"}
SPLIT_NAMES = ("train", "val", "test")
VALIDATE_MODES = ("warn", "fail", "off")
_IMAGE_CHUNK = 64  # images read per HDF5 call


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _root(root: Any, what: str) -> Path:
    """``dataset.root`` as an existing folder, or an error naming the key and what it must hold."""
    if root is None:
        raise DataError(f"dataset.root: not set; pass dataset.root=<folder holding {what}>")
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"dataset.root: {root} is not a folder (expected {what})")
    return root


def _subjects(raw: Any) -> list[int]:
    """``dataset.subjects`` (``[1, 2]``, ``["subj01"]``, ``1``) -> distinct NSD subject numbers 1..8."""
    if isinstance(raw, (int, str)):
        raw = [raw]
    out = []
    for s in list(raw):
        m = re.fullmatch(r"(?:subj)?0*(\d+)", str(s))
        if not m or not 1 <= int(m.group(1)) <= 8:
            raise DataError(f"dataset.subjects: {s!r} is not an NSD subject (1..8 or subj01..subj08)")
        out.append(int(m.group(1)))
    if not out or len(set(out)) != len(out):
        raise DataError(f"dataset.subjects: expected distinct subjects, got {list(raw)}")
    return out


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise DataError(f"dataset.{key}: {value!r} is not one of {list(options)}")


@config_dataclass("dataset/mindeye2.yaml", key="dataset")
class MindEye2ConvertConfig:
    """Mirror of ``braindecode_fw/conf/dataset/mindeye2.yaml``, which holds every default
    (braindecode_fw/schema.py fills the fields from it; ``store`` is None outside Hydra)."""

    root: str | None = FROM_YAML
    store: str | None = FROM_YAML
    name: str = FROM_YAML
    kind: str = FROM_YAML
    modality: str = FROM_YAML
    auto_prepare: bool = FROM_YAML
    subjects: list[int | str] | int | str = FROM_YAML  # 1..8 or subj01..subj08; normalised to ints
    test_convention: str = FROM_YAML
    image_size: int = setting(min=8)
    val_fraction: float = setting(min=0, lt=1)
    val_seed: int = FROM_YAML
    chunk_rows: int = setting(min=1)
    validate: str = FROM_YAML
    force: bool = FROM_YAML
    replace: bool = FROM_YAML

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> MindEye2ConvertConfig:
        out = dataclass_from_mapping(cls, cfg, what="MindEye2 converter")
        out.subjects = _subjects(out.subjects)
        _choice("test_convention", out.test_convention, tuple(TEST_TARS))
        _choice("validate", out.validate, VALIDATE_MODES)
        return out


@config_dataclass("dataset/mindeye1_avg.yaml", key="dataset")
class MindEye1AvgConvertConfig:
    """Mirror of ``braindecode_fw/conf/dataset/mindeye1_avg.yaml``, which holds every default."""

    root: str | None = FROM_YAML
    store: str | None = FROM_YAML
    name: str = FROM_YAML
    kind: str = FROM_YAML
    modality: str = FROM_YAML
    auto_prepare: bool = FROM_YAML
    subjects: list[int | str] | int | str = FROM_YAML
    layout: str = FROM_YAML
    image_size: int = setting(min=8)
    zscore_at_load: bool = FROM_YAML
    validate: str = FROM_YAML
    force: bool = FROM_YAML
    replace: bool = FROM_YAML

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> MindEye1AvgConvertConfig:
        out = dataclass_from_mapping(cls, cfg, what="MindEye1 avg-split converter")
        out.subjects = _subjects(out.subjects)
        _choice("layout", out.layout, ("auto", "tar", "extracted"))
        _choice("validate", out.validate, VALIDATE_MODES)
        return out


def _fingerprint(options: dict[str, Any], sources: dict[str, Any]) -> str:
    blob = json.dumps({"converter_version": CONVERTER_VERSION, "options": options, "sources": sources},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _validate(problems: list[str], mode: str, what: str) -> list[str]:
    """Apply ``dataset.validate`` to the real-data problems: raise (fail), keep them to report (warn)
    or drop them (off)."""
    if not problems or mode == "off":
        return []
    if mode == "fail":
        raise DataError(f"{what}: the data do not match the published release ({'; '.join(problems)}); "
                         f"set dataset.validate=warn to import anyway")
    return problems


def _to_uint8_hwc(block: np.ndarray) -> np.ndarray:
    """float ``(n, 3, h, w)`` in [0, 1] -> uint8 ``(n, h, w, 3)``: ``round(clip(x, 0, 1) * 255)``."""
    x = np.clip(np.asarray(block, dtype=np.float32), 0.0, 1.0) * np.float32(255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(h, w, 3)`` -> ``(size, size, 3)`` with PIL bicubic (unchanged when already that size)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def _repeat_counts(id73k: np.ndarray) -> np.ndarray:
    """0-based presentation count of each trial's image, trials in chronological order."""
    repeat = np.zeros(len(id73k), dtype=np.int64)
    seen: dict[int, int] = {}
    for t, i in enumerate(id73k.tolist()):
        repeat[t] = seen.get(i, 0)
        seen[i] = repeat[t] + 1
    return repeat


# --------------------------------------------------------------------------------------------
# MindEye2
# --------------------------------------------------------------------------------------------


def _read_behaviour_tar(path: Path) -> np.ndarray:
    """The ``behav.npy`` rows of a webdataset tar as float64 ``(n_samples, 17)``."""
    rows = []
    try:
        with tarfile.open(path, "r") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = PurePosixPath(member.name).name.partition(".")
                if ext != "behav.npy":
                    continue
                arr = np.load(io.BytesIO(tf.extractfile(member).read()), allow_pickle=False)
                if arr.shape != (1, BEHAV_COLUMNS):
                    raise DataError(f"member {member.name}: shape {arr.shape}, expected (1, {BEHAV_COLUMNS})")
                rows.append(arr[0].astype(np.float64))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the webdataset tar ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no '<key>.behav.npy' member; expected MindEye2 behaviour samples")
    return np.stack(rows)


def _open_h5(path: Path, dataset: str, what: str):
    """Open ``path`` and return ``(file, dataset)``; errors name the file and what was expected."""
    import h5py

    if not path.exists():
        raise MissingFileError(f"{path}: missing file (expected {what})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: cannot be read as HDF5, truncated or corrupted? ({e}); expected {what}") from None
    if dataset not in f:
        keys = list(f.keys())
        f.close()
        raise DataError(f"{path}: no dataset {dataset!r} (keys {keys}); expected {what}")
    return f, f[dataset]


@dataclass
class _Me2Subject:
    subject: int
    betas_path: Path
    n_rows: int
    n_voxels: int
    dtype: np.dtype
    behav: np.ndarray  # (n, 17) sorted by global trial
    is_test: np.ndarray  # (n,) bool
    n_train_tars: int
    test_tar: Path
    flag_mismatch: int  # samples whose behav column 16 disagrees with shared1000.npy


def _me2_sources(root: Path, subject: int, test_dir: str) -> tuple[Path, list[Path], Path]:
    betas = root / f"betas_all_subj{subject:02d}_fp32_renorm.hdf5"
    if not betas.exists():
        raise MissingFileError(f"{betas}: missing file (expected MindEye2's float32 betas of subject {subject}, "
                                f"dataset 'betas' (n_trials, n_voxels))")
    wds = root / "wds" / f"subj{subject:02d}"
    train_dir = wds / "train"
    tars = [p for p in train_dir.glob("*.tar") if p.stem.isdigit()] if train_dir.is_dir() else []
    if not tars:
        raise MissingFileError(f"{train_dir}: no behaviour tars (expected one webdataset tar per session, "
                                f"{train_dir}/0.tar ... {train_dir}/<S-1>.tar)")
    tars.sort(key=lambda p: int(p.stem))
    test_tar = wds / test_dir / "0.tar"
    if not test_tar.exists():
        raise MissingFileError(f"{test_tar}: missing file (expected the shared1000 test trials for "
                                f"dataset.test_convention={'new' if test_dir == 'new_test' else 'legacy'})")
    return betas, tars, test_tar


def _me2_read_subject(root: Path, subject: int, test_dir: str, shared: np.ndarray) -> _Me2Subject:
    """Read and check one subject's behaviour tars and betas header (no betas values yet)."""
    betas_path, train_tars, test_tar = _me2_sources(root, subject, test_dir)
    f, ds = _open_h5(betas_path, "betas", "float32 (n_trials, n_voxels)")
    try:
        shape, dtype = ds.shape, ds.dtype
    finally:
        f.close()
    if len(shape) != 2 or dtype not in (np.dtype("float32"), np.dtype("float16")):
        raise DataError(f"{betas_path}: dataset 'betas' is {dtype} {shape}, expected float32 (n_trials, n_voxels)")
    parts, sources, test_flags = [], [], []
    for tar in [*train_tars, test_tar]:
        b = _read_behaviour_tar(tar)
        parts.append(b)
        sources += [tar] * len(b)
        test_flags.append(np.full(len(b), tar == test_tar))
    behav = np.concatenate(parts)
    is_test = np.concatenate(test_flags)

    def bad(mask: np.ndarray, problem: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise DataError(f"{sources[i]}: {int(mask.sum())} behav.npy sample(s) {problem}, "
                             f"e.g. row {behav[i].tolist()}")

    g, ids = behav[:, COL_GLOBAL_TRIAL], behav[:, COL_ID73K]
    bad((g != np.round(g)) | (g < 0) | (g >= shape[0]),
        f"with a global trial (column {COL_GLOBAL_TRIAL}) outside the {shape[0]} rows of {betas_path.name}")
    bad((ids != np.round(ids)) | (ids < 0) | (ids >= len(shared)),
        f"with a 73k id (column {COL_ID73K}) outside [0, {len(shared)})")
    bad((behav[:, COL_SESSION] < 1) | (behav[:, COL_RUN] < 1), "without a session/run (columns 2, 3; 1-based)")
    in_shared = shared[ids.astype(np.int64)]  # shared1000.npy is authoritative; column 16 is cross-checked
    bad(is_test & ~in_shared, "in the test tar whose image is not in shared1000.npy")
    bad(~is_test & in_shared, "in a train tar showing a shared1000 image (would leak test images)")
    flag_mismatch = int(((behav[:, COL_SHARED] == 1) != in_shared).sum())
    order = np.argsort(g, kind="stable")
    behav, is_test = behav[order], is_test[order]
    dup = np.flatnonzero(np.diff(behav[:, COL_GLOBAL_TRIAL]) == 0)
    if len(dup):
        raise DataError(f"wds/subj{subject:02d}: global trial {int(behav[dup[0], COL_GLOBAL_TRIAL])} appears in "
                         f"more than one behaviour sample; expected each trial once")
    return _Me2Subject(subject, betas_path, int(shape[0]), int(shape[1]), np.dtype(dtype), behav, is_test,
                       len(train_tars), test_tar, flag_mismatch)


def _me2_real_problems(s: _Me2Subject, convention: str) -> list[str]:
    problems = []
    if s.flag_mismatch:
        problems.append(f"wds/subj{s.subject:02d}: {s.flag_mismatch} behav.npy sample(s) whose shared flag "
                        f"(column {COL_SHARED}) disagrees with shared1000.npy (shared1000.npy used)")
    if s.n_voxels < REAL_MIN_VOXELS:
        return problems
    if s.n_voxels != NSDGENERAL_VOXELS[s.subject]:
        problems.append(f"{s.betas_path.name}: {s.n_voxels} voxels, the release has {NSDGENERAL_VOXELS[s.subject]}")
    n_test = int(s.is_test.sum())
    if n_test != ME2_TEST_TRIALS[convention][s.subject]:
        problems.append(f"{s.test_tar}: {n_test} test trials, expected {ME2_TEST_TRIALS[convention][s.subject]} "
                        f"(test_convention={convention})")
    if s.n_train_tars != ME2_SESSIONS[s.subject]:
        problems.append(f"wds/subj{s.subject:02d}/train: {s.n_train_tars} session tars, expected "
                        f"{ME2_SESSIONS[s.subject]}")
    return problems


def _me2_trials(s: _Me2Subject, used_ids: np.ndarray, val_fraction: float, val_seed: int) -> TrialTable:
    ids = s.behav[:, COL_ID73K].astype(np.int64)
    split = np.where(s.is_test, "test", np.where(is_val_image(ids, val_fraction, val_seed), "val", "train"))
    return TrialTable(
        trial_id=s.behav[:, COL_GLOBAL_TRIAL].astype(np.int64),
        image_index=np.searchsorted(used_ids, ids).astype(np.int64),
        session=s.behav[:, COL_SESSION].astype(np.int64) - 1,
        run=s.behav[:, COL_RUN].astype(np.int64) - 1,
        repeat=_repeat_counts(ids),
        split=split.astype(str),
    )


def _me2_copy_betas(s: _Me2Subject, out: np.ndarray, chunk_rows: int, label: str) -> None:
    """``out[i] = betas[global_trial[i]]`` block by block of ``chunk_rows`` consecutive betas rows."""
    rows = s.behav[:, COL_GLOBAL_TRIAL].astype(np.int64)  # sorted, unique
    f, ds = _open_h5(s.betas_path, "betas", "float32 (n_trials, n_voxels)")
    try:
        block_of = rows // chunk_rows
        bounds = np.flatnonzero(np.diff(block_of)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(rows)]])
        for a, b in tqdm(list(zip(starts, ends, strict=True)), desc=f"{label} betas", unit="block", leave=False):
            lo, hi = int(rows[a]), int(rows[b - 1]) + 1
            try:
                block = ds[lo:hi]
            except OSError as e:
                raise DataError(f"{s.betas_path}: rows {lo}..{hi - 1} cannot be read, truncated or corrupted? "
                                 f"({e})") from None
            block = block[rows[a:b] - lo]
            finite = np.isfinite(block)
            if not finite.all():
                r = int(rows[a + np.flatnonzero(~finite.all(1))[0]])
                raise DataError(f"{s.betas_path}: 'betas' row {r} (global trial) holds NaN/Inf; "
                                 f"expected finite normalised betas")
            out[a:b] = block
    finally:
        f.close()
    out.flush()


def _me2_check_images(path: Path, used: np.ndarray) -> None:
    """``coco_images_224_float16.hdf5`` opens and ``images`` is ``(73000, 3, H, W)`` covering every used id."""
    f, ds = _open_h5(path, "images", "float16 (73000, 3, 224, 224) in [0, 1]")
    try:
        if ds.ndim != 4 or ds.shape[1] != 3 or ds.shape[0] <= int(used[-1]):
            raise DataError(f"{path}: dataset 'images' has shape {ds.shape}, expected (73000, 3, H, W) "
                             f"covering 73k id {int(used[-1])}")
    finally:
        f.close()


def _me2_images(path: Path, used: np.ndarray, sink: ImageStream, size: int) -> None:
    """Stream the images of the 73k ids ``used`` (sorted; header checked by :func:`_me2_check_images`)."""
    f, ds = _open_h5(path, "images", "float16 (73000, 3, 224, 224) in [0, 1]")
    try:
        for start in tqdm(range(0, len(used), _IMAGE_CHUNK), desc="images", unit="chunk", leave=False):
            ids = used[start : start + _IMAGE_CHUNK]
            try:  # one slice per run of consecutive ids (h5py's list indexing is much slower)
                runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)
                block = np.concatenate([ds[int(r[0]) : int(r[-1]) + 1] for r in runs])
            except OSError as e:
                raise DataError(f"{path}: images {int(ids[0])}..{int(ids[-1])} cannot be read, truncated or "
                                 f"corrupted? ({e})") from None
            if not np.isfinite(block).all():
                raise DataError(f"{path}: an image among 73k ids {ids.tolist()} holds NaN/Inf")
            sink.append(np.stack([_resize(im, size) for im in _to_uint8_hwc(block)]))
    finally:
        f.close()


def _split_table(summary: dict[str, Any], title: str, note: str) -> list[str]:
    """The MindEye converters' report lines: one per subject, then the images and the normalisation."""
    lines = [title, "subject  voxels  trials  train / val / test  test images  test reps (count: images)"]
    for sid, st in summary["subjects"].items():
        c = st["split_trials"]
        lines.append(f"{sid:<8} {st['n_voxels']:>6}  {st['n_trials']:>6}  {c['train']} / {c['val']} / {c['test']}"
                     f"  {st['n_test_images']:>11}  {st['test_repeats_histogram']}")
    lines.append(f"{summary['n_images']} images; {note}; {summary['seconds']:.1f} s")
    return lines


@dataclass
class _Me2Plan:
    shared: np.ndarray  # (73000,) bool
    subjects: dict[int, _Me2Subject]
    used: np.ndarray  # sorted 73k ids of the imported trials
    problems: list[str] = dataclasses.field(default_factory=list)  # real-release mismatches kept (validate=warn)


def _provenance_head(converter: Any, source: str, root: Path) -> dict[str, Any]:
    """The provenance fields both MindEye converters record first, in this order (the store version
    hashes them): source, converter id and version, config fingerprint, root, options, input files."""
    return {"source": source, "converter": converter.converter_id, "converter_version": CONVERTER_VERSION,
            "config_fingerprint": converter.fingerprint(), "root": str(root), "options": converter.options,
            "sources": converter.sources}


class MindEye2Converter(Converter[_Me2Plan]):
    """MindEye2's preprocessed release -> prepared store, in the base's phases (convert/base.py).

    Keys (braindecode_fw/conf/dataset/mindeye2.yaml): ``root``, ``store``, ``name``, ``subjects``,
    ``test_convention`` (new|legacy), ``image_size``, ``val_fraction``, ``val_seed``, ``chunk_rows``,
    ``validate`` (warn|fail|off), ``force``.
    """

    kind = "mindeye2"
    title = "MindEye2"
    modality = "fmri"
    config_class = MindEye2ConvertConfig
    converter_id = "braindecode_fw.data.convert.mindeye:convert_mindeye2"
    provenance_match = {"converter": converter_id}
    content_field = "options"  # provenance.options: the options the fingerprint hashes
    fingerprint_covers = "the same files and options"

    cfg: MindEye2ConvertConfig

    def locate(self) -> None:
        cfg = self.cfg
        self.root = root = _root(cfg.root, "MindEye2's release (betas_all_subjXX_fp32_renorm.hdf5, wds/, ...)")
        self.images_path = root / "coco_images_224_float16.hdf5"
        self.shared_path = root / "shared1000.npy"
        for path, what in ((self.images_path, "dataset 'images' float16 (73000, 3, 224, 224)"),
                           (self.shared_path, "bool (73000,) shared1000 mask")):
            if not path.exists():
                raise MissingFileError(f"{path}: missing file (expected {what})")
        self.test_dir = TEST_TARS[cfg.test_convention]
        self.sources: dict[str, int] = {}
        for s in cfg.subjects:
            betas, tars, test_tar = _me2_sources(root, s, self.test_dir)
            for p in (betas, *tars, test_tar):
                self.sources[str(p.relative_to(root))] = p.stat().st_size
        for p in (self.images_path, self.shared_path):
            self.sources[p.name] = p.stat().st_size
        self.check(f"{len(self.sources)} release files present (betas, behaviour tars of "
                   f"wds/subjXX/{{train,{self.test_dir}}}, images, shared1000.npy)")
        self.options = {"name": cfg.name, "subjects": list(cfg.subjects), "test_convention": cfg.test_convention,
                        "image_size": int(cfg.image_size), "val_fraction": float(cfg.val_fraction),
                        "val_seed": int(cfg.val_seed)}

    def fingerprint(self) -> str:
        return _fingerprint(self.options, self.sources)

    def content(self) -> dict[str, Any]:
        return self.options

    def plan(self) -> _Me2Plan:
        try:
            shared = np.load(self.shared_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.shared_path}: cannot be read as .npy ({e}); expected bool (73000,)") from None
        if shared.ndim != 1 or shared.dtype != np.bool_:
            raise DataError(f"{self.shared_path}: {shared.dtype} {shared.shape}, expected bool (73000,)")
        self.check(f"{self.shared_path.name}: bool {shared.shape}")
        info = {}
        for s in self.cfg.subjects:
            info[s] = sub = _me2_read_subject(self.root, s, self.test_dir, shared)
            self.check(f"subj{s:02d}: betas header {sub.dtype.name} ({sub.n_rows}, {sub.n_voxels}); "
                       f"{sub.n_train_tars + 1} behaviour tars: global trials, 73k ids, sessions/runs in range, "
                       f"test trials = shared1000, each trial once")
        used = np.unique(np.concatenate([i.behav[:, COL_ID73K] for i in info.values()])).astype(np.int64)
        return _Me2Plan(shared, info, used)

    def validate(self, plan: _Me2Plan) -> None:
        cfg = self.cfg
        _me2_check_images(self.images_path, plan.used)
        self.check(f"{self.images_path.name}: images (73000, 3, H, W) covering the {len(plan.used)} used 73k ids")
        problems = [p for s in cfg.subjects for p in _me2_real_problems(plan.subjects[s], cfg.test_convention)]
        if any(sub.n_voxels < REAL_MIN_VOXELS for sub in plan.subjects.values()):
            self.skip_check(f"release sizes (voxels, test trials, session tars): fewer than {REAL_MIN_VOXELS} "
                            "voxels, the data are a fixture")
        plan.problems = _validate(problems, cfg.validate, f"dataset.validate ({self.root})")
        for p in plan.problems:
            self.warn(p)

    def write(self, writer: StoreWriter, plan: _Me2Plan) -> Written:
        cfg, root, used, image_size = self.cfg, self.root, plan.used, self.image_size
        sink = writer.open_images(len(used), image_size, image_size)
        _me2_images(self.images_path, used, sink, image_size)
        sink.close(ids=[f"nsd73k-{i:05d}" for i in used.tolist()], source_ids=used.tolist())
        subjects: dict[str, dict[str, Any]] = {}
        for s in tqdm(cfg.subjects, desc="subjects", unit="subject"):
            sub = plan.subjects[s]
            sid = f"subj{s:02d}"
            trials = _me2_trials(sub, used, cfg.val_fraction, cfg.val_seed)
            out = writer.open_responses(sid, (len(trials), sub.n_voxels), sub.dtype.name)
            _me2_copy_betas(sub, out, cfg.chunk_rows, sid)
            del out
            counts = {sp: int((trials.split == sp).sum()) for sp in SPLIT_NAMES}
            test_imgs, reps = np.unique(trials.image_index[trials.split == "test"], return_counts=True)
            stats = {
                "n_trials": len(trials), "n_voxels": sub.n_voxels, "split_trials": counts,
                "n_test_images": len(test_imgs),
                "test_repeats_histogram": {int(k): int(v) for k, v in zip(*np.unique(reps, return_counts=True),
                                                                           strict=True)},
                "n_sessions": len(np.unique(trials.session)), "n_train_tars": sub.n_train_tars,
                "betas_rows": sub.n_rows, "test_tar": str(sub.test_tar.relative_to(root)),
            }
            writer.write_subject(sid, trials, statistics=stats)
            subjects[sid] = stats
        test_dir, val_seed, val_fraction = self.test_dir, cfg.val_seed, cfg.val_fraction
        provenance = {
            **_provenance_head(self, "MindEye2 preprocessed release (huggingface.co/datasets/pscotti/mindeyev2)", root),
            "normalisation": "mindeye2_renorm",
            "normalisation_detail": "betas_all_subjXX_fp32_renorm.hdf5 copied bit-exact: MindEye2 re-normalised "
                                    "every voxel with statistics of the training trials only; not re-normalised here",
            "zscore_at_load": False,
            "test_convention": cfg.test_convention,
            "split_rule": f"test = the trials of wds/subjXX/{test_dir}/0.tar (shared1000); train = the trials of "
                          f"wds/subjXX/train/*.tar; val = whole training images, see val_rule",
            "val_rule": f"training 73k ids whose splitmix64 uniform (seed {val_seed}) is < {val_fraction} "
                        f"(convert/common.is_val_image, the rule of the raw-NSD converter); every presentation of "
                        f"a val image is val",
            "repeat_rule": "0-based count of earlier presentations of the image among the subject's imported "
                           "trials, in global-trial order",
            "trial_id": "global trial (behav column 5 = row of the betas file)",
            "images": f"coco_images_224_float16.hdf5 float16 CHW [0,1] -> uint8 HWC round(clip(x,0,1)*255)"
                      f"{'' if image_size == 224 else f', resized to {image_size} px with PIL bicubic'}",
            "image_ids": "images sorted by 73k id; metadata source_ids = 0-based 73k ids",
            "geometry": "none (the release has no voxel coordinates)",
            "validation": {"mode": cfg.validate, "problems": plan.problems},
        }
        return Written(provenance, subjects, {"test_convention": cfg.test_convention, "root": str(root),
                                              "normalisation": "mindeye2_renorm", "zscore_at_load": False})

    def table(self, summary: dict[str, Any]) -> list[str]:
        return _split_table(summary, f"MindEye2 release {self.root} ({self.cfg.test_convention} test tars)",
                            "normalisation mindeye2_renorm: betas imported as released, not to be z-scored "
                            "again (provenance.zscore_at_load=false, honoured by data.zscore=auto)")


def convert_mindeye2(dataset_cfg: Any) -> dict[str, Any]:
    """MindEye2's preprocessed release under ``dataset.root`` -> prepared store ``dataset.store``
    (:class:`MindEye2Converter`). Returns the converter summary (convert/base.py ``REPORT_KEYS``)
    whose ``report`` bdf-prepare prints."""
    return MindEye2Converter.convert(dataset_cfg)


# --------------------------------------------------------------------------------------------
# MindEye1 webdataset_avg_split
# --------------------------------------------------------------------------------------------


@dataclass
class _Me1Sample:
    split: str
    key: str
    members: dict[str, Any]  # extension -> Path (extracted) or (tar path, member name)


class _Me1Reader:
    """Reads sample members from either layout, keeping each tar open once."""

    def __init__(self) -> None:
        self._tars: dict[Path, tarfile.TarFile] = {}

    def read(self, sample: _Me1Sample, ext: str) -> bytes:
        loc = sample.members.get(ext)
        if loc is None:
            raise DataError(f"{self.where(sample)}: sample {sample.key} has no {ext!r} member "
                             f"(has {sorted(sample.members)})")
        try:
            if isinstance(loc, Path):
                return loc.read_bytes()
            tar_path, name = loc
            if tar_path not in self._tars:
                self._tars[tar_path] = tarfile.open(tar_path, "r")
            return self._tars[tar_path].extractfile(name).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{self.where(sample)}: {sample.key}.{ext} cannot be read ({e})") from None

    def npy(self, sample: _Me1Sample, ext: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.read(sample, ext)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            if str(e).startswith(str(self.where(sample))):
                raise
            raise DataError(f"{self.where(sample)}: {sample.key}.{ext} is not a valid .npy ({e})") from None

    @staticmethod
    def where(sample: _Me1Sample) -> Path:
        loc = next(iter(sample.members.values()))
        return loc.parent if isinstance(loc, Path) else loc[0]

    def close(self) -> None:
        for tf in self._tars.values():
            tf.close()
        self._tars.clear()


def _me1_layout(root: Path, subject: int, layout: str) -> str:
    if layout != "auto":
        return layout
    if all((root / sp / f"subj{subject:02d}").is_dir() for sp in SPLIT_NAMES):
        return "extracted"
    if any(root.glob(f"train/train_subj{subject:02d}_*.tar")):
        return "tar"
    raise MissingFileError(
        f"{root}: no MindEye1 avg split for subject {subject}: expected tars "
        f"{root}/train/train_subj{subject:02d}_<k>.tar (MindEye1) or folders "
        f"{root}/{{train,val,test}}/subj{subject:02d}/ (MindBridge's extracted layout)")


def _me1_index(root: Path, subject: int, layout: str) -> list[_Me1Sample]:
    """Every sample of a subject, split order train, val, test, then sorted by key."""
    samples: list[_Me1Sample] = []
    for split in SPLIT_NAMES:
        groups: dict[str, dict[str, Any]] = {}
        if layout == "extracted":
            d = root / split / f"subj{subject:02d}"
            if not d.is_dir():
                raise MissingFileError(f"{d}: missing folder (expected the {split} samples "
                                        f"sampleNNNNNNNNN.<ext> of subject {subject})")
            for p in d.iterdir():
                if p.is_file() and "." in p.name:
                    key, _, ext = p.name.partition(".")
                    groups.setdefault(key, {})[ext] = p
        else:
            tars = sorted(root.glob(f"{split}/{split}_subj{subject:02d}_*.tar"),
                          key=lambda p: int(p.stem.rsplit("_", 1)[-1]) if p.stem.rsplit("_", 1)[-1].isdigit() else -1)
            if not tars:
                raise MissingFileError(f"{root / split}: no {split}_subj{subject:02d}_<k>.tar (expected MindEye1's "
                                        f"{split} shards of subject {subject})")
            for tar in tars:
                try:
                    with tarfile.open(tar, "r") as tf:
                        names = [m.name for m in tf if m.isfile()]
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise DataError(f"{tar}: cannot read the webdataset tar ({type(e).__name__}: {e})") from None
                for n in names:
                    key, _, ext = PurePosixPath(n).name.partition(".")
                    if ext and ext in groups.get(key, {}):
                        raise DataError(f"{tar}: sample {key} appears twice in the {split} split")
                    groups.setdefault(key, {})[ext] = (tar, n)
        if not groups:
            raise DataError(f"{root / split}: no samples for subject {subject}")
        samples += [_Me1Sample(split, k, groups[k]) for k in sorted(groups)]
    return samples


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    f = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


@dataclass
class _Me1Subject:
    subject: int
    samples: list[_Me1Sample]
    ids: np.ndarray  # (n_samples,) 73k id
    n_voxels: int
    dtype: str


def _me1_read_subject(root: Path, subject: int, layout: str, reader: _Me1Reader) -> _Me1Subject:
    samples = _me1_index(root, subject, _me1_layout(root, subject, layout))
    ids = np.zeros(len(samples), dtype=np.int64)
    n_vox, dtypes = None, set()
    for i, smp in enumerate(samples):
        coco = reader.npy(smp, "coco73k.npy").reshape(-1)
        if coco.size != 1 or not 0 <= int(coco[0]) < N_IMAGES_73K:
            raise DataError(f"{reader.where(smp)}: {smp.key}.coco73k.npy is {coco.tolist()}, expected one "
                             f"0-based 73k id")
        ids[i] = int(coco[0])
        try:
            shape, dtype = _npy_header(reader.read(smp, "nsdgeneral.npy"))
        except ValueError as e:
            raise DataError(f"{reader.where(smp)}: {smp.key}.nsdgeneral.npy is not a valid .npy ({e})") from None
        if len(shape) != 2 or shape[0] != 3 or (n_vox is not None and shape[1] != n_vox):
            raise DataError(f"{reader.where(smp)}: {smp.key}.nsdgeneral.npy has shape {shape}, expected "
                             f"(3, {n_vox or 'n_voxels'}) (3 repetitions)")
        n_vox = shape[1]
        dtypes.add(np.dtype(dtype))
        if "jpg" not in smp.members:
            raise DataError(f"{reader.where(smp)}: sample {smp.key} has no 'jpg' member (the stimulus)")
    dtype = "float16" if dtypes == {np.dtype("float16")} else "float32"
    return _Me1Subject(subject, samples, ids, int(n_vox), dtype)


def _me1_real_problems(s: _Me1Subject) -> list[str]:
    if s.n_voxels < REAL_MIN_VOXELS:
        return []
    problems = []
    if s.n_voxels != NSDGENERAL_VOXELS[s.subject]:
        problems.append(f"subj{s.subject:02d}: {s.n_voxels} voxels, nsdgeneral has {NSDGENERAL_VOXELS[s.subject]}")
    for split, n in ME1_COUNTS.get(s.subject, {}).items():
        got = sum(x.split == split for x in s.samples)
        if got != n:
            problems.append(f"subj{s.subject:02d}: {got} {split} samples, MindEye1's avg split has {n}")
    return problems


def _decode_jpg(data: bytes, where: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            img = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{where}: cannot decode the jpg ({e})") from None
    return _resize(img, size)


def _me1_iter_rows(s: _Me1Subject, reader: _Me1Reader) -> Iterator[tuple[int, np.ndarray]]:
    for i, smp in enumerate(s.samples):
        arr = reader.npy(smp, "nsdgeneral.npy")
        if not np.isfinite(arr).all():
            raise DataError(f"{reader.where(smp)}: {smp.key}.nsdgeneral.npy holds NaN/Inf")
        yield i, arr


@dataclass
class _Me1Plan:
    subjects: dict[int, _Me1Subject]
    used: np.ndarray  # sorted 73k ids of the imported samples
    first: dict[int, _Me1Sample]  # 73k id -> the first sample carrying its jpg
    problems: list[str] = dataclasses.field(default_factory=list)


class MindEye1AvgConverter(Converter[_Me1Plan]):
    """MindEye1's ``webdataset_avg_split`` (as MindBridge reads it) -> prepared store (convert/base.py).

    Keys (braindecode_fw/conf/dataset/mindeye1_avg.yaml): ``root``, ``store``, ``name``, ``subjects``, ``layout``
    (auto|tar|extracted), ``image_size``, ``zscore_at_load``, ``validate``, ``force``.
    """

    kind = "mindeye1_avg"
    title = "MindEye1 avg split"
    modality = "fmri"
    config_class = MindEye1AvgConvertConfig
    converter_id = "braindecode_fw.data.convert.mindeye:convert_mindeye1_avg"
    provenance_match = {"converter": converter_id}
    content_field = "options"  # provenance.options: the options the fingerprint hashes
    fingerprint_covers = "the same files and options"

    cfg: MindEye1AvgConvertConfig

    def __init__(self, dataset_cfg: Any):
        super().__init__(dataset_cfg)
        self.reader = _Me1Reader()

    def locate(self) -> None:
        cfg = self.cfg
        self.root = root = _root(cfg.root, "MindEye1's webdataset_avg_split (train/, val/, test/)")
        self.layouts = {s: _me1_layout(root, s, cfg.layout) for s in cfg.subjects}
        self.sources: dict[str, Any] = {}
        for s in cfg.subjects:
            for split in SPLIT_NAMES:
                files = (list((root / split / f"subj{s:02d}").glob("*")) if self.layouts[s] == "extracted"
                         else list(root.glob(f"{split}/{split}_subj{s:02d}_*.tar")))
                self.sources[f"subj{s:02d}/{split}"] = [len(files), sum(p.stat().st_size for p in files)]
        self.options = {"name": cfg.name, "subjects": list(cfg.subjects), "layouts": self.layouts,
                        "image_size": int(cfg.image_size), "zscore_at_load": bool(cfg.zscore_at_load)}

    def fingerprint(self) -> str:
        return _fingerprint(self.options, self.sources)

    def content(self) -> dict[str, Any]:
        return self.options

    def plan(self) -> _Me1Plan:
        info = {}
        for s in self.cfg.subjects:
            info[s] = sub = _me1_read_subject(self.root, s, self.layouts[s], self.reader)
            self.check(f"subj{s:02d} ({self.layouts[s]} layout): {len(sub.samples)} samples of train/val/test, "
                       f"each with one 73k id (coco73k.npy), nsdgeneral.npy header (3, {sub.n_voxels}) and a jpg")
        used = np.unique(np.concatenate([i.ids for i in info.values()]))
        first: dict[int, _Me1Sample] = {}
        for s in self.cfg.subjects:
            for i, smp in zip(info[s].ids.tolist(), info[s].samples, strict=True):
                first.setdefault(i, smp)
        return _Me1Plan(info, used, first)

    def validate(self, plan: _Me1Plan) -> None:
        cfg = self.cfg
        if any(sub.n_voxels < REAL_MIN_VOXELS for sub in plan.subjects.values()):
            self.skip_check(f"release sizes (voxels, samples per split): fewer than {REAL_MIN_VOXELS} voxels, "
                            "the data are a fixture")
        problems = [p for s in cfg.subjects for p in _me1_real_problems(plan.subjects[s])]
        plan.problems = _validate(problems, cfg.validate, f"dataset.validate ({self.root})")
        for p in plan.problems:
            self.warn(p)

    def write(self, writer: StoreWriter, plan: _Me1Plan) -> Written:
        cfg, root, reader, used, image_size = self.cfg, self.root, self.reader, plan.used, self.image_size
        sink = writer.open_images(len(used), image_size, image_size)
        for i in tqdm(used.tolist(), desc="images", unit="image", leave=False):
            smp = plan.first[i]
            sink.append(_decode_jpg(reader.read(smp, "jpg"), f"{reader.where(smp)}: {smp.key}.jpg",
                                    image_size)[None])
        sink.close(ids=[f"nsd73k-{i:05d}" for i in used.tolist()], source_ids=used.tolist())
        subjects: dict[str, dict[str, Any]] = {}
        for s in tqdm(cfg.subjects, desc="subjects", unit="subject"):
            sub = plan.subjects[s]
            sid = f"subj{s:02d}"
            n = 3 * len(sub.samples)
            out = writer.open_responses(sid, (n, sub.n_voxels), sub.dtype)
            for i, arr in tqdm(_me1_iter_rows(sub, reader), total=len(sub.samples), desc=f"{sid} samples",
                               unit="sample", leave=False):
                out[3 * i : 3 * i + 3] = arr
            out.flush()
            del out
            split = np.repeat([x.split for x in sub.samples], 3).astype(str)
            trials = TrialTable(
                trial_id=np.arange(n, dtype=np.int64),
                image_index=np.repeat(np.searchsorted(used, sub.ids), 3).astype(np.int64),
                session=np.zeros(n, dtype=np.int64), run=np.zeros(n, dtype=np.int64),
                repeat=np.tile(np.arange(3, dtype=np.int64), len(sub.samples)), split=split,
            )
            counts = {sp: int((split == sp).sum()) for sp in SPLIT_NAMES}
            stats = {"n_trials": n, "n_voxels": sub.n_voxels, "split_trials": counts,
                     "split_samples": {sp: c // 3 for sp, c in counts.items()},
                     "n_test_images": len(np.unique(sub.ids[[x.split == "test" for x in sub.samples]])),
                     "test_repeats_histogram": {3: counts["test"] // 3}, "layout": self.layouts[s]}
            writer.write_subject(sid, trials, statistics=stats)
            subjects[sid] = stats
        zscore_at_load = bool(cfg.zscore_at_load)
        provenance = {
            **_provenance_head(self, "MindEye1 webdataset_avg_split (as consumed by MindBridge)", root),
            "normalisation": "mindeye1_unknown",
            "normalisation_detail": "nsdgeneral.npy copied as released; MindEye1's normalisation is not "
                                    "documented (docs/datasets/mindeye.md); MindBridge feeds it without scaling",
            "zscore_at_load": zscore_at_load,
            "zscore_choice": "dataset.zscore_at_load=" + str(zscore_at_load).lower() + ": "
                             + ("the datamodule z-scores voxel-wise with training-trial statistics (one "
                                "pseudo-session)" if zscore_at_load else
                                "the datamodule does not z-score (MindBridge's input as is)"),
            "split_rule": "splits from the folders train/ val/ test/ (test = MindEye1's 982 shared images "
                          "of the old 37-session release for subj01)",
            "repeat_rule": "each sample's nsdgeneral.npy (3, n_voxels) -> 3 trial rows, repeat 0..2",
            "session": "unknown in the avg split: every trial has session 0, run 0",
            "trial_id": "running index: 3 * sample position (train, val, test; sorted by key) + repeat",
            "images": f"the sample jpg decoded with PIL (RGB), resized to {image_size} px with PIL bicubic "
                      f"when its size differs; one image per 73k id (first sample carrying it)",
            "image_ids": "images sorted by 73k id; metadata source_ids = 0-based 73k ids",
            "geometry": "none (the avg split has no voxel coordinates)",
            "validation": {"mode": cfg.validate, "problems": plan.problems},
        }
        return Written(provenance, subjects, {"layouts": {f"subj{s:02d}": v for s, v in self.layouts.items()},
                                              "root": str(root), "normalisation": "mindeye1_unknown",
                                              "zscore_at_load": zscore_at_load})

    def table(self, summary: dict[str, Any]) -> list[str]:
        return _split_table(summary, f"MindEye1 avg split {self.root}",
                            f"normalisation mindeye1_unknown; datamodule z-scoring "
                            f"{'on' if self.cfg.zscore_at_load else 'off'} (dataset.zscore_at_load)")

    def close(self) -> None:
        self.reader.close()


def convert_mindeye1_avg(dataset_cfg: Any) -> dict[str, Any]:
    """MindEye1's ``webdataset_avg_split`` -> prepared store ``dataset.store`` (:class:`MindEye1AvgConverter`);
    returns the converter summary (convert/base.py ``REPORT_KEYS``)."""
    return MindEye1AvgConverter.convert(dataset_cfg)
