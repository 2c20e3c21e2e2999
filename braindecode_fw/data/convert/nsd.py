"""Raw Natural Scenes Dataset (NSD, Allen et al. 2022) -> prepared store (docs/datasets/nsd.md).

Reads the release layout (docs/datasets/nsd.md): volume betas ``betas_sessionNN.nii.gz`` (X, Y, Z, 750)
or ``betas_sessionNN.hdf5`` (dataset ``betas``, axis-reversed (750, Z, Y, X)), int16 = % signal change
x 300; an ROI volume (nsdgeneral by default, -1 voxels never selected); ``nsd_expdesign.mat`` for the
trial -> image mapping (1-based ``masterordering`` / ``subjectim``), cross-checked against
``responses.tsv``; ``nsd_stim_info_merged.csv`` for COCO ids; ``nsd_stimuli.hdf5`` ``imgBrick``.

Betas are stored as % signal change (the datamodule z-scores each session with its training-trial
statistics). Sessions are streamed one at a time into the store's memory-mapped responses, so the
peak memory is one session of ROI voxels plus one read chunk (see ``chunk_trials``), never a whole
4-D volume in float. The store is published atomically by :class:`StoreWriter`; stale partial
directories of dead conversions are removed on start, and a store whose provenance matches the
requested configuration is left as is unless ``force`` is set.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.data.convert.base import Converter, ConverterInputError, Written
from braindecode_fw.data.convert.common import is_val_image, load_string_array
from braindecode_fw.data.normalization import ncsnr_from_repeats
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.errors import DataError
from braindecode_fw.schema import FROM_YAML, config_dataclass, dataclass_from_mapping, setting

log = logging.getLogger(__name__)

CONVERTER_VERSION = "nsd-1"
TRIALS_PER_SESSION = 750
N_TOTAL_TRIALS = 30000
N_IMAGES_73K = 73000
#: ``imgBrick`` of the release: every NSD stimulus at its original size (docs/datasets/nsd.md)
IMAGE_BRICK_SHAPE = (N_IMAGES_73K, 425, 425, 3)
BETA_DIRS = {"b1": "betas_assumehrf", "b2": "betas_fithrf", "b3": "betas_fithrf_GLMdenoise_RR"}
BETA_SCALE = 300.0
# docs/datasets/nsd.md (NSD manual, MindEye code): per-subject facts used by the validation
SESSIONS_PER_SUBJECT = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
REAL_VOLUME_SHAPES = {1: (81, 104, 83), 2: (82, 106, 84), 3: (81, 106, 82), 4: (85, 99, 80),
                      5: (79, 97, 78), 6: (85, 113, 83), 7: (78, 95, 81), 8: (80, 103, 78)}
NSDGENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
TEST_TRIALS = {1: (3000, 2770), 2: (3000, 2770), 3: (2371, 2113), 4: (2188, 1985),
               5: (3000, 2770), 6: (2371, 2113), 7: (3000, 2770), 8: (2188, 1985)}  # (new, legacy)
LEGACY_HELD_OUT_SESSIONS = 3  # the pre-2023 release withheld each subject's last 3 sessions
# keys of braindecode_fw/conf/dataset/nsd.yaml that do not change the converted content
_NON_CONTENT_KEYS = ("name", "kind", "modality", "store", "auto_prepare", "root", "force", "replace",
                     "validate", "progress", "chunk_trials", "image_chunk")


class NSDInputError(ConverterInputError):
    """Raw NSD input is missing or not in the expected format; the message names the file."""


@config_dataclass("dataset/nsd.yaml", key="dataset")
class NSDConvertConfig:
    """Mirror of ``braindecode_fw/conf/dataset/nsd.yaml``, which holds every default (braindecode_fw/schema.py
    fills the fields from it; ``store`` is None outside Hydra). docs/datasets/nsd.md describes every key."""

    root: str | None = FROM_YAML
    store: str | None = FROM_YAML
    name: str = FROM_YAML
    kind: str = FROM_YAML
    modality: str = FROM_YAML
    auto_prepare: bool = FROM_YAML
    subjects: list[int] = FROM_YAML
    sessions: Any = FROM_YAML  # null = all found on disk | int N = 1..N | list of 1-based sessions
    beta_format: str = FROM_YAML
    beta_version: str = FROM_YAML
    roi: dict[str, Any] = FROM_YAML
    image_size: int = FROM_YAML
    test_convention: str = FROM_YAML
    val_fraction: float = FROM_YAML
    val_seed: int = FROM_YAML
    dtype: str = FROM_YAML
    ncsnr_threshold: float | None = FROM_YAML
    ncsnr_images: str = FROM_YAML
    captions: str | None = FROM_YAML
    validate: str = FROM_YAML
    force: bool = FROM_YAML
    replace: bool = FROM_YAML
    progress: bool = FROM_YAML
    chunk_trials: int = setting(min=1)
    image_chunk: int = setting(min=1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> NSDConvertConfig:
        out = dataclass_from_mapping(cls, cfg, what="NSD converter")
        out.validate_choices()
        return out

    def validate_choices(self) -> None:
        checks = [
            ("beta_format", self.beta_format, ("nifti", "hdf5")),
            ("beta_version", self.beta_version, tuple(BETA_DIRS)),
            ("test_convention", self.test_convention, ("new", "legacy")),
            ("dtype", self.dtype, ("float32", "float16")),
            ("validate", self.validate, ("warn", "fail", "off")),
            ("ncsnr_images", self.ncsnr_images, ("all", "test")),
        ]
        for key, value, options in checks:
            if value not in options:
                raise DataError(f"dataset.{key}: {value!r} is not one of {list(options)}")
        if not self.subjects or any(int(s) not in SESSIONS_PER_SUBJECT for s in self.subjects):
            raise DataError(f"dataset.subjects: expected a list of NSD subjects 1..8, got {self.subjects!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"dataset.val_fraction: expected a fraction in [0, 1), got {self.val_fraction}")
        if int(self.image_size) < 1 or int(self.image_size) > 425:
            raise DataError(f"dataset.image_size: expected 1..425 (425 = no resize), got {self.image_size}")
        labels = (self.roi or {}).get("labels")
        if not labels or any(int(v) <= 0 for v in labels):
            raise DataError(f"dataset.roi.labels: expected positive ROI label(s), got {labels!r} "
                             "(0 is outside the ROI and -1 outside the labelled region)")

    def content(self) -> dict[str, Any]:
        """The configuration that determines the converted store (what the fingerprint hashes)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NON_CONTENT_KEYS}
        d["captions"] = bool(self.captions)
        return d

    def fingerprint(self) -> str:
        blob = json.dumps({"converter": CONVERTER_VERSION, **self.content()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Raw-file readers (each error names the file and what was expected)
# ---------------------------------------------------------------------------------------------


@dataclass
class ExpDesign:
    masterordering: np.ndarray  # (30000,) int64, 1-based 10k index per global trial
    subjectim: np.ndarray  # (8, 10000) int64, 1-based 73k ids
    sharedix: np.ndarray  # (1000,) int64, 1-based 73k ids


def load_expdesign(path: Path) -> ExpDesign:
    """``nsd_expdesign.mat`` with the shapes and value ranges of docs/datasets/nsd.md."""
    from scipy.io import loadmat

    if not path.exists():
        raise NSDInputError(f"{path}: missing file (NSD experimental design, nsddata/experiments/nsd/)")
    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
        raise NSDInputError(f"{path}: cannot be read as a MATLAB .mat file ({type(e).__name__}: {e})") from None
    expected = {"masterordering": (N_TOTAL_TRIALS,), "subjectim": (8, 10000), "sharedix": (1000,)}
    out = {}
    for key, shape in expected.items():
        if key not in mat:
            raise NSDInputError(f"{path}: field {key!r} missing (expected shape {shape})")
        arr = np.asarray(mat[key])
        if arr.shape != shape:
            raise NSDInputError(f"{path}: field {key!r} has shape {arr.shape}, expected {shape} "
                                "(after loadmat squeeze_me=True)")
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise NSDInputError(f"{path}: field {key!r} must hold integer values (1-based indices)")
        out[key] = arr.astype(np.int64)
    if out["masterordering"].min() < 1 or out["masterordering"].max() > 10000:
        raise NSDInputError(f"{path}: field 'masterordering' must hold 1-based 10k indices in 1..10000")
    for key in ("subjectim", "sharedix"):
        if out[key].min() < 1 or out[key].max() > N_IMAGES_73K:
            raise NSDInputError(f"{path}: field {key!r} must hold 1-based 73k ids in 1..73000")
    return ExpDesign(**out)


def _parse_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


def load_responses_tsv(path: Path) -> dict[str, np.ndarray]:
    """``responses.tsv`` columns as float arrays (NaN for missing), keyed by header name."""
    if not path.exists():
        raise NSDInputError(f"{path}: missing file (NSD behavioural responses, one row per trial)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise NSDInputError(f"{path}: empty file, expected a header with SUBJECT, SESSION, RUN, 73KID, 10KID")
    header = [h.strip() for h in rows[0]]
    needed = ("SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID")
    missing = [c for c in needed if c not in header]
    if missing:
        raise NSDInputError(f"{path}: missing column(s) {missing}; header is {header}")
    cols = {}
    for c in needed:
        j = header.index(c)
        cols[c] = np.asarray([_parse_float(r[j]) if j < len(r) else np.nan for r in rows[1:]])
    return cols


def _check_responses(path: Path, cols: dict[str, np.ndarray], subject: int, session: int,
                     design: ExpDesign) -> np.ndarray:
    """Rows of ``session`` (750, chronological) must agree with the design; returns 0-based runs."""
    rows = np.flatnonzero(cols["SESSION"] == session)
    if len(rows) != TRIALS_PER_SESSION:
        raise NSDInputError(f"{path}: session {session} has {len(rows)} rows, expected {TRIALS_PER_SESSION}")
    g = (session - 1) * TRIALS_PER_SESSION + np.arange(TRIALS_PER_SESSION)
    k10 = design.masterordering[g]
    k73 = design.subjectim[subject - 1, k10 - 1]
    for col, exp in (("10KID", k10), ("73KID", k73)):
        bad = np.flatnonzero(cols[col][rows] != exp)
        if len(bad):
            t = int(bad[0])
            raise NSDInputError(f"{path}: column {col} disagrees with nsd_expdesign.mat in {len(bad)} row(s) of "
                                f"session {session}, e.g. trial {t} (row {int(rows[t]) + 2}): "
                                f"{cols[col][rows[t]]:.0f} != {int(exp[t])}")
    if np.any(cols["SUBJECT"][rows] != subject):
        raise NSDInputError(f"{path}: SUBJECT column is not {subject} in session {session}")
    run = cols["RUN"][rows]
    if not np.all(np.isfinite(run)) or run.min() < 1:
        raise NSDInputError(f"{path}: RUN column must hold 1-based run numbers in session {session}")
    return (run - 1).astype(np.int64)


def _load_nifti(path: Path, what: str):
    import nibabel as nib

    if not path.exists():
        raise NSDInputError(f"{path}: missing file ({what})")
    try:
        return nib.load(str(path), keep_file_open=True) if str(path).endswith("gz") else nib.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise NSDInputError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None


def _read_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D NIfTI (ROI or mask) -> (data, affine)."""
    img = _load_nifti(path, what)
    try:
        data = np.asarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise NSDInputError(f"{path}: truncated or corrupted ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise NSDInputError(f"{path}: expected a 3-D volume ({what}), got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def _beta_header(path: Path, beta_format: str) -> tuple[tuple[int, int, int], np.dtype]:
    """(X, Y, Z) and on-disk dtype of a beta file, without reading the data."""
    if not path.exists():
        raise NSDInputError(f"{path}: missing file (NSD volume betas for this session; "
                            f"download it or restrict dataset.sessions)")
    if beta_format == "nifti":
        img = _load_nifti(path, "volume betas")
        shape, dtype = img.shape, np.dtype(img.get_data_dtype())
        if len(shape) != 4 or shape[3] != TRIALS_PER_SESSION:
            raise NSDInputError(f"{path}: shape {shape}, expected (X, Y, Z, {TRIALS_PER_SESSION})")
        slope, inter = img.dataobj.slope, img.dataobj.inter
        if slope != 1 or inter != 0:
            raise NSDInputError(f"{path}: unexpected NIfTI scaling (scl_slope {slope}, scl_inter {inter}); "
                                "NSD betas are raw int16 = % signal change x 300")
        xyz = tuple(int(s) for s in shape[:3])
    else:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "betas" not in f:
                    raise NSDInputError(f"{path}: no dataset 'betas' (keys {list(f)})")
                shape, dtype = f["betas"].shape, np.dtype(f["betas"].dtype)
        except OSError as e:
            raise NSDInputError(f"{path}: cannot be opened as HDF5, truncated or corrupted ({e})") from None
        if len(shape) != 4 or shape[0] != TRIALS_PER_SESSION:
            raise NSDInputError(f"{path}: dataset 'betas' has shape {shape}, expected ({TRIALS_PER_SESSION}, Z, Y, X)")
        xyz = (int(shape[3]), int(shape[2]), int(shape[1]))
    if dtype != np.int16:
        raise NSDInputError(f"{path}: betas dtype {dtype}, expected int16 (NSD volume betas are "
                            "% signal change x 300 stored as int16)")
    return xyz, dtype


def read_session_betas(path: Path, beta_format: str, voxel_ijk: np.ndarray, *, chunk_trials: int = 75) -> np.ndarray:
    """One session's betas at ``voxel_ijk`` (C-order over X, Y, Z) -> float32 ``(750, voxels)`` in %.

    NIfTI: trial chunks of the int16 proxy (``img.dataobj[..., t0:t1]``), masked, then cast; peak
    about ``2 * X*Y*Z*chunk_trials`` bytes. HDF5 (``(750, Z, Y, X)``): one Z plane of the ROI's
    bounding box at a time.
    """
    ix, iy, iz = (voxel_ijk[:, k] for k in range(3))
    out = np.empty((TRIALS_PER_SESSION, len(voxel_ijk)), dtype=np.float32)
    try:
        if beta_format == "nifti":
            img = _load_nifti(path, "volume betas")
            proxy = img.dataobj
            for t0 in range(0, TRIALS_PER_SESSION, chunk_trials):
                t1 = min(t0 + chunk_trials, TRIALS_PER_SESSION)
                block = np.asarray(proxy[..., t0:t1])
                if block.dtype != np.int16:
                    raise NSDInputError(f"{path}: betas read as {block.dtype}, expected int16")
                out[t0:t1] = block[ix, iy, iz, :].T
                del block
        else:
            import h5py

            with h5py.File(path, "r") as f:
                dset = f["betas"]
                y0, y1, x0, x1 = iy.min(), iy.max() + 1, ix.min(), ix.max() + 1
                for z in np.unique(iz):
                    cols = np.flatnonzero(iz == z)
                    plane = dset[:, int(z), y0:y1, x0:x1]  # (750, ny, nx) int16
                    out[:, cols] = plane[:, iy[cols] - y0, ix[cols] - x0]
    except NSDInputError:
        raise
    except (EOFError, OSError, zlib.error, ValueError, KeyError) as e:
        raise NSDInputError(f"{path}: truncated or corrupted betas ({type(e).__name__}: {e})") from None
    out /= BETA_SCALE
    if not np.all(np.isfinite(out)):
        raise NSDInputError(f"{path}: betas contain NaN/Inf values")
    return out


def load_stim_info(path: Path) -> dict[str, np.ndarray]:
    """``nsd_stim_info_merged.csv``: cocoId, cocoSplit, shared1000 per 0-based 73k id (73,000 rows)."""
    if not path.exists():
        raise NSDInputError(f"{path}: missing file (NSD stimulus info, 73,000 rows)")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise NSDInputError(f"{path}: empty file")
        need = ("cocoId", "cocoSplit", "shared1000")
        missing = [c for c in need if c not in header]
        if missing:
            raise NSDInputError(f"{path}: missing column(s) {missing}; header is {header}")
        j = [header.index(c) for c in need]
        rows = [(r[j[0]], r[j[1]], r[j[2]]) for r in reader]
    if len(rows) != N_IMAGES_73K:
        raise NSDInputError(f"{path}: {len(rows)} rows, expected {N_IMAGES_73K} (one per 73k image)")
    coco, split, shared = zip(*rows, strict=True)
    return {"cocoId": np.asarray(coco, dtype=np.int64), "cocoSplit": np.asarray(split),
            "shared1000": np.asarray([s.strip().lower() in ("true", "1") for s in shared])}


# ---------------------------------------------------------------------------------------------
# Validation against the real dataset's invariants
# ---------------------------------------------------------------------------------------------


def looks_real(subject: int, volume_shape: Sequence[int]) -> bool:
    """True when the volume has the real subject's func1pt8mm dimensions (not a fixture)."""
    return tuple(int(s) for s in volume_shape) == REAL_VOLUME_SHAPES.get(subject)


def legacy_sessions(subject: int) -> int:
    """Sessions of the pre-2023 release (the last 3 of each subject were withheld): 37/37/29/27/..."""
    return SESSIONS_PER_SUBJECT[subject] - LEGACY_HELD_OUT_SESSIONS


def check_real_invariants(
    subject: int,
    *,
    sessions: Sequence[int],
    trials_per_session: Mapping[int, int],
    n_test_trials: int,
    test_convention: str = "new",
    n_nsdgeneral_voxels: int | None = None,
    shared_ids: Mapping[int, np.ndarray] | None = None,
) -> list[str]:
    """Problems (empty if none) comparing a converted subject with the real NSD (docs/datasets/nsd.md).

    ``n_nsdgeneral_voxels`` only when the ROI is nsdgeneral==1; the test-trial count is checked only
    when every session of the convention was converted; ``shared_ids`` maps subject -> its shared
    1000 73k ids (must be identical across subjects).
    """
    problems = []
    tag = f"subj{subject:02d}"
    for s, n in sorted(trials_per_session.items()):
        if n != TRIALS_PER_SESSION:
            problems.append(f"{tag}: session {s} has {n} trials, expected {TRIALS_PER_SESSION}")
    if n_nsdgeneral_voxels is not None and n_nsdgeneral_voxels != NSDGENERAL_VOXELS[subject]:
        problems.append(f"{tag}: nsdgeneral has {n_nsdgeneral_voxels} voxels, expected {NSDGENERAL_VOXELS[subject]}")
    n_all = SESSIONS_PER_SUBJECT[subject] if test_convention == "new" else legacy_sessions(subject)
    if set(sessions) >= set(range(1, n_all + 1)):
        expected = TEST_TRIALS[subject][0 if test_convention == "new" else 1]
        if n_test_trials != expected:
            problems.append(f"{tag}: {n_test_trials} shared1000 test trials, expected {expected} "
                            f"({test_convention} convention, {n_all} sessions)")
    if shared_ids:
        ref_subj, ref = next(iter(shared_ids.items()))
        for s, ids in shared_ids.items():
            if not np.array_equal(np.sort(ids), np.sort(ref)):
                problems.append(f"subj{s:02d}: shared1000 image ids differ from subj{ref_subj:02d}'s")
    return problems


def apply_validation(problems: list[str], mode: str) -> None:
    """``warn`` logs each problem, ``fail`` raises one error listing them all, ``off`` ignores them."""
    if not problems or mode == "off":
        return
    if mode == "fail":
        raise NSDInputError("NSD validation failed (dataset.validate=fail): " + "; ".join(problems))
    for p in problems:
        log.warning("NSD validation: %s", p)


# ---------------------------------------------------------------------------------------------
# Planning (all cheap checks happen here, before anything is written)
# ---------------------------------------------------------------------------------------------


@dataclass
class SubjectPlan:
    subject: int
    tag: str
    sessions: list[int]
    dropped_sessions: list[int]
    beta_files: list[Path]
    voxel_ijk: np.ndarray  # (V, 3) int, C-order over (X, Y, Z)
    affine: np.ndarray
    volume_shape: tuple[int, int, int]
    g: np.ndarray  # global trial (0-based) of each converted trial
    id73k: np.ndarray  # 0-based 73k id
    is_test: np.ndarray
    run: np.ndarray  # 0-based
    roi_file: Path
    brainmask_file: Path | None


def _sessions_on_disk(beta_dir: Path, ext: str) -> list[int]:
    pat = re.compile(rf"betas_session(\d+){re.escape(ext)}$")
    return sorted(int(m.group(1)) for p in beta_dir.glob(f"betas_session*{ext}") if (m := pat.match(p.name)))


def _roi_path(cfg: NSDConvertConfig, root: Path, tag: str) -> Path:
    spec = str((cfg.roi or {}).get("file") or "nsdgeneral")
    if "/" in spec or spec.endswith((".nii", ".nii.gz")):
        p = Path(spec.format(subject=tag))
        return p if p.is_absolute() else root / p
    return root / f"nsddata/ppdata/{tag}/func1pt8mm/roi/{spec}.nii.gz"


def _check_all_sessions_present(cfg: NSDConvertConfig, subject: int, beta_dir: Path, ext: str,
                                on_disk: list[int], cols: dict[str, np.ndarray], resp_path: Path) -> None:
    """``dataset.sessions=null`` means every session of the subject: each session that
    ``responses.tsv`` records (or that a later beta file implies) must have its beta file, or the
    store would silently hold fewer sessions than asked for (and fewer test repetitions). Sessions
    the legacy convention drops anyway are not required."""
    recorded = {int(v) for v in cols["SESSION"] if np.isfinite(v) and 1 <= v <= SESSIONS_PER_SUBJECT[subject]}
    expected = sorted(recorded | set(range(1, max(on_disk) + 1)))
    if cfg.test_convention == "legacy":
        expected = [s for s in expected if s <= legacy_sessions(subject)]
    missing = [s for s in expected if s not in on_disk]
    if not missing:
        return
    names = [f"betas_session{s:02d}{ext}" for s in missing]
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    have = [s for s in on_disk if s in expected] or on_disk
    raise NSDInputError(f"{beta_dir}: {listed} missing (dataset.sessions=null converts every session of "
                        f"subj{subject:02d}: {resp_path.name} records sessions {expected[0]}..{expected[-1]}, "
                        f"beta files were found for {have}); download the missing file(s), or name the sessions "
                        f"to convert, e.g. dataset.sessions=[{','.join(map(str, have))}]")


def _plan_subject(cfg: NSDConvertConfig, root: Path, subject: int, design: ExpDesign) -> SubjectPlan:
    tag = f"subj{subject:02d}"
    func = root / f"nsddata/ppdata/{tag}/func1pt8mm"
    beta_dir = root / f"nsddata_betas/ppdata/{tag}/func1pt8mm" / BETA_DIRS[cfg.beta_version]
    ext = ".nii.gz" if cfg.beta_format == "nifti" else ".hdf5"
    resp_path = root / f"nsddata/ppdata/{tag}/behav/responses.tsv"
    cols = load_responses_tsv(resp_path)
    if cfg.sessions is None:
        sessions = _sessions_on_disk(beta_dir, ext)
        if not sessions:
            raise NSDInputError(f"{beta_dir}: no betas_sessionNN{ext} files (dataset.sessions=null converts "
                                f"every session found; beta_version={cfg.beta_version}, beta_format={cfg.beta_format})")
        _check_all_sessions_present(cfg, subject, beta_dir, ext, sessions, cols, resp_path)
    elif isinstance(cfg.sessions, int):
        sessions = list(range(1, int(cfg.sessions) + 1))
    else:
        sessions = sorted({int(s) for s in cfg.sessions})
    bad = [s for s in sessions if not 1 <= s <= SESSIONS_PER_SUBJECT[subject]]
    if bad:
        raise DataError(f"dataset.sessions: {tag} has sessions 1..{SESSIONS_PER_SUBJECT[subject]}, got {bad}")
    dropped: list[int] = []
    if cfg.test_convention == "legacy":
        keep = legacy_sessions(subject)
        dropped = [s for s in sessions if s > keep]
        sessions = [s for s in sessions if s <= keep]
        if not sessions:
            raise DataError(f"dataset.sessions: nothing left for {tag} under test_convention=legacy "
                             f"(sessions <= {keep})")
    files = [beta_dir / f"betas_session{s:02d}{ext}" for s in sessions]
    xyz = None
    for p in files:
        shape, _ = _beta_header(p, cfg.beta_format)
        if xyz is None:
            xyz = shape
        elif shape != xyz:
            raise NSDInputError(f"{p}: volume {shape} differs from {files[0].name}'s {xyz}")
    roi_file = _roi_path(cfg, root, tag)
    roi, roi_affine = _read_volume(roi_file, "ROI labels")
    if roi.shape != xyz:
        raise NSDInputError(f"{roi_file}: ROI volume shape {roi.shape} does not match the betas' volume {xyz} "
                            f"({files[0]})")
    labels = [int(v) for v in cfg.roi["labels"]]
    mask = np.isin(np.rint(roi).astype(np.int64), labels)  # -1 (outside the labelled region) never matches
    voxel_ijk = np.argwhere(mask)  # C-order over (X, Y, Z), like nibabel masking (docs/datasets/nsd.md)
    if len(voxel_ijk) == 0:
        raise NSDInputError(f"{roi_file}: no voxel has label(s) {labels} (dataset.roi.labels)")
    brainmask = func / "brainmask.nii.gz"
    affine = roi_affine
    if brainmask.exists():
        bm, affine = _read_volume(brainmask, "brain mask")
        if bm.shape != xyz:
            raise NSDInputError(f"{brainmask}: shape {bm.shape} does not match the betas' volume {xyz}")
    g = np.concatenate([(s - 1) * TRIALS_PER_SESSION + np.arange(TRIALS_PER_SESSION) for s in sessions])
    k10 = design.masterordering[g]
    id73k = design.subjectim[subject - 1, k10 - 1] - 1
    run = np.concatenate([_check_responses(resp_path, cols, subject, s, design) for s in sessions])
    return SubjectPlan(subject, tag, sessions, dropped, files, voxel_ijk, affine, xyz, g, id73k,
                       k10 <= 1000, run, roi_file, brainmask if brainmask.exists() else None)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _write_images(writer: StoreWriter, stim_path: Path, ids: np.ndarray, cfg: NSDConvertConfig,
                  captions: list[str] | None) -> None:
    """Read ``imgBrick`` rows ``ids`` (sorted, unique) in chunks, resize once, stream them into the
    store (``StoreWriter.open_images``): memory ~ one chunk of 425 px images."""
    import h5py
    from PIL import Image

    size = int(cfg.image_size)
    stream = writer.open_images(len(ids), size, size)
    try:
        with h5py.File(stim_path, "r") as f:
            brick = f["imgBrick"]  # its header was checked by check_stimuli (plan phase)
            with _progress(len(ids), "images", cfg.progress, "img") as bar:
                for start in range(0, len(ids), cfg.image_chunk):
                    chunk = ids[start:start + cfg.image_chunk]
                    # sorted, duplicate-free ids read row by row: h5py's list (point) selection is
                    # ~40x slower than per-chunk reads on (1, 425, 425, 3)-chunked bricks
                    block = np.empty((len(chunk), *brick.shape[1:]), dtype=np.uint8)
                    for j, i in enumerate(chunk.tolist()):
                        brick.read_direct(block, np.s_[i], np.s_[j])
                    if size != IMAGE_BRICK_SHAPE[1]:  # 425 px originals (check_stimuli) -> image_size
                        block = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                                          for im in block])
                    stream.append(block)
                    bar.update(len(chunk))
    except OSError as e:
        raise NSDInputError(f"{stim_path}: cannot read imgBrick, truncated or corrupted ({e})") from None
    stream.close(ids=[f"nsd-{int(i):05d}" for i in ids], captions=captions, source_ids=[int(i) for i in ids])


def _load_captions(path: Path, ids: np.ndarray) -> tuple[list[str], list[list[str]]]:
    if not path.exists():
        raise NSDInputError(f"{path}: missing file (dataset.captions: COCO_73k_annots_curated.npy, (73000, 5))")
    try:
        caps = load_string_array(path)  # an object array, read without running anything in the file
    except ValueError as e:
        raise NSDInputError(f"dataset.captions: {e}") from None
    if caps.ndim != 2 or caps.shape[0] != N_IMAGES_73K:
        raise NSDInputError(f"{path}: shape {caps.shape}, expected ({N_IMAGES_73K}, 5) captions per 73k image")
    all_caps = [[str(c).strip() for c in caps[int(i)] if str(c).strip()] for i in ids]
    return [c[0] if c else "" for c in all_caps], all_caps


def _ncsnr(responses: np.ndarray, plan: SubjectPlan, mean: np.ndarray, std: np.ndarray,
           sess_row: np.ndarray, use: str) -> tuple[np.ndarray, dict[str, Any]]:
    """NSD's ncsnr (``ncsnr_from_repeats``) on session-z-scored betas of images shown 3x (else 2x).

    z-scoring uses each session's mean/std over all its trials (NSD's convention for its ncsnr).
    Read in voxel chunks from the memory map: peak ~ n_rows * 512 * 8 bytes.
    """
    candidates = np.ones(len(plan.id73k), bool) if use == "all" else plan.is_test
    uniq, inv, counts = np.unique(plan.id73k[candidates], return_inverse=True, return_counts=True)
    rows_c = np.flatnonzero(candidates)
    n_rep = 3 if (counts >= 3).any() else 2
    sel = np.flatnonzero(counts >= n_rep)
    info = {"images": int(len(sel)), "repetitions": n_rep, "image_set": use,
            "zscore": "per session, all trials of the session (NSD)"}
    n_vox = responses.shape[1]
    if len(sel) == 0:
        log.warning("%s: no image shown twice in the converted sessions: ncsnr set to NaN", plan.tag)
        return np.full(n_vox, np.nan, dtype=np.float32), info
    order = np.lexsort((rows_c, inv))  # by image, then chronological
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rows = np.stack([rows_c[order[starts[i]:starts[i] + n_rep]] for i in sel])  # (n_img, n_rep)
    flat = rows.reshape(-1)
    srows = sess_row[flat]
    out = np.empty(n_vox, dtype=np.float32)
    for v0 in range(0, n_vox, 512):
        v1 = min(v0 + 512, n_vox)
        x = np.asarray(responses[flat, v0:v1], dtype=np.float64)
        z = (x - mean[srows, v0:v1]) / std[srows, v0:v1]
        out[v0:v1] = ncsnr_from_repeats(z.reshape(len(sel), n_rep, v1 - v0))
    return out, info


def _convert_subject(writer: StoreWriter, plan: SubjectPlan, cfg: NSDConvertConfig, image_ids: np.ndarray
                     ) -> dict[str, Any]:
    n_trials, n_vox = len(plan.g), len(plan.voxel_ijk)
    threshold = cfg.ncsnr_threshold
    sdir = writer.subject_dir(plan.tag)
    if threshold is None:
        resp = writer.open_responses(plan.tag, (n_trials, n_vox), cfg.dtype)
    else:  # all ROI voxels first; the ncsnr-selected columns are copied into responses.npy after
        resp = np.lib.format.open_memmap(sdir / "roi_all_tmp.npy", mode="w+", dtype=np.dtype(cfg.dtype),
                                         shape=(n_trials, n_vox))
    n_sess = len(plan.sessions)
    mean = np.zeros((n_sess, n_vox), dtype=np.float32)
    std = np.ones((n_sess, n_vox), dtype=np.float32)
    t0 = time.perf_counter()
    with _progress(n_sess, f"{plan.tag} sessions", cfg.progress, "session") as bar:
        for j, (sess, path) in enumerate(zip(plan.sessions, plan.beta_files, strict=True)):
            betas = read_session_betas(path, cfg.beta_format, plan.voxel_ijk, chunk_trials=cfg.chunk_trials)
            resp[j * TRIALS_PER_SESSION:(j + 1) * TRIALS_PER_SESSION] = betas.astype(cfg.dtype)
            mean[j] = betas.mean(0)
            std[j] = np.maximum(betas.std(0), 1e-6)
            del betas
            bar.set_postfix_str(f"session {sess:02d}")
            bar.update(1)
    resp.flush()
    seconds_betas = time.perf_counter() - t0
    sess_row = np.repeat(np.arange(n_sess), TRIALS_PER_SESSION)
    ncsnr, ncsnr_info = _ncsnr(resp, plan, mean, std, sess_row, cfg.ncsnr_images)
    voxel_ijk = plan.voxel_ijk
    if threshold is not None:
        keep = np.flatnonzero(np.nan_to_num(ncsnr, nan=-1.0) > float(threshold))
        if len(keep) == 0:
            raise DataError(f"dataset.ncsnr_threshold: no {plan.tag} voxel has ncsnr > {threshold} "
                             f"(max {np.nanmax(ncsnr):.3f})")
        final = writer.open_responses(plan.tag, (n_trials, len(keep)), cfg.dtype)
        for r0 in range(0, n_trials, 2048):
            final[r0:r0 + 2048] = resp[r0:r0 + 2048][:, keep]
        final.flush()
        del resp, final
        (sdir / "roi_all_tmp.npy").unlink()
        ncsnr, voxel_ijk = ncsnr[keep], voxel_ijk[keep]
    else:
        del resp

    image_index = np.searchsorted(image_ids, plan.id73k)
    repeat = np.zeros(n_trials, dtype=np.int64)
    seen: dict[int, int] = {}
    for t, i in enumerate(plan.id73k.tolist()):
        repeat[t] = seen.get(i, 0)
        seen[i] = repeat[t] + 1
    is_val = ~plan.is_test & is_val_image(plan.id73k, cfg.val_fraction, cfg.val_seed)
    split = np.where(plan.is_test, "test", np.where(is_val, "val", "train"))
    trials = TrialTable(
        trial_id=plan.g.astype(np.int64), image_index=image_index.astype(np.int64),
        session=np.repeat(np.asarray(plan.sessions) - 1, TRIALS_PER_SESSION).astype(np.int64),
        run=plan.run, repeat=repeat, split=split.astype(str),
    )
    q = [5, 25, 50, 75, 95]
    finite = ncsnr[np.isfinite(ncsnr)]
    stats = {
        "n_voxels": int(len(voxel_ijk)), "n_roi_voxels": int(len(plan.voxel_ijk)), "n_trials": int(n_trials),
        "sessions": plan.sessions, "sessions_dropped_by_convention": plan.dropped_sessions,
        "n_test_trials": int(plan.is_test.sum()), "n_val_trials": int(is_val.sum()),
        "n_train_trials": int((split == "train").sum()),
        "n_test_images": int(len(np.unique(plan.id73k[plan.is_test]))),
        "ncsnr": ncsnr_info,
        "ncsnr_percentiles": dict(zip(map(str, q), (np.percentile(finite, q).round(4).tolist() if len(finite)
                                                    else [None] * len(q)), strict=True)),
        "ncsnr_threshold": threshold,
        "session_mean_abs_pct": float(np.abs(mean).mean()),
        "seconds_betas": round(seconds_betas, 2),
        "seconds_per_session": round(seconds_betas / n_sess, 2),
        "volume_shape": list(plan.volume_shape),
        "roi_file": str(plan.roi_file), "affine_source": str(plan.brainmask_file or plan.roi_file),
    }
    writer.write_subject(plan.tag, trials, voxel_ijk=voxel_ijk, affine=plan.affine,
                         volume_shape=plan.volume_shape, statistics=stats, arrays={"ncsnr": ncsnr})
    return stats


@dataclass
class NSDPlan:
    """Everything the write phase needs, read and checked by the plan phase."""

    design: ExpDesign
    stim_info: dict[str, np.ndarray]
    stim_path: Path
    subjects: list[SubjectPlan]
    image_ids: np.ndarray  # sorted unique 0-based 73k ids of the converted trials
    captions: list[str] | None
    all_captions: list[list[str]] | None


def check_stimuli(stim_path: Path) -> None:
    """``nsd_stimuli.hdf5`` opens (a truncated file does not: HDF5 compares its recorded end with the
    file size) and holds ``imgBrick`` uint8 :data:`IMAGE_BRICK_SHAPE` (header only). Another image
    size is refused rather than resized: it is not the release's brick (a re-saved or partial copy),
    and ``dataset.image_size`` is applied to the 425 px originals."""
    import h5py

    try:
        with h5py.File(stim_path, "r") as f:
            if "imgBrick" not in f:
                raise NSDInputError(f"{stim_path}: no dataset 'imgBrick' (keys {list(f)})")
            brick = f["imgBrick"]
            shape, dtype = tuple(int(n) for n in brick.shape), brick.dtype
    except OSError as e:
        raise NSDInputError(f"{stim_path}: cannot be opened as HDF5, truncated or corrupted ({e})") from None
    if shape != IMAGE_BRICK_SHAPE or dtype != np.uint8:
        raise NSDInputError(f"{stim_path}: dataset 'imgBrick' is {dtype} {shape}, expected uint8 "
                            f"{IMAGE_BRICK_SHAPE} (the 73,000 NSD images at their original 425 x 425 px, RGB; "
                            f"dataset.image_size resizes them while converting)")


class NSDConverter(Converter[NSDPlan]):
    """Raw NSD -> prepared store, in the base's phases (braindecode_fw/data/convert/base.py)."""

    kind = "nsd"
    title = "NSD"
    modality = "fmri"
    config_class = NSDConvertConfig
    provenance_match = {"source": "nsd"}

    cfg: NSDConvertConfig

    def locate(self) -> None:
        if not self.cfg.store:
            raise DataError("dataset.store: not set (where the prepared NSD store is written)")
        if not self.cfg.root:
            raise DataError("dataset.root: not set; pass the folder holding nsddata/, nsddata_betas/ and "
                             "nsddata_stimuli/, e.g. `bdf-prepare dataset=nsd dataset.root=/data/nsd`")
        self.root = Path(self.cfg.root)
        if not self.root.is_dir():
            raise NSDInputError(f"{self.root}: dataset.root does not exist or is not a folder")

    def fingerprint(self) -> str:
        return self.cfg.fingerprint()

    def plan(self) -> NSDPlan:
        cfg, root = self.cfg, self.root
        design = load_expdesign(root / "nsddata/experiments/nsd/nsd_expdesign.mat")
        self.check("nsd_expdesign.mat: masterordering/subjectim/sharedix shapes and 1-based index ranges")
        stim_info = load_stim_info(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv")
        csv_shared = np.flatnonzero(stim_info["shared1000"])
        if not np.array_equal(csv_shared, np.sort(design.sharedix - 1)):
            raise NSDInputError(f"{root / 'nsddata/experiments/nsd/nsd_stim_info_merged.csv'}: shared1000 column "
                                "disagrees with sharedix of nsd_expdesign.mat")
        self.check("nsd_stim_info_merged.csv: 73,000 rows, cocoId/cocoSplit/shared1000 columns, "
                   "shared1000 = sharedix of nsd_expdesign.mat")
        stim_path = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
        if not stim_path.exists():
            raise NSDInputError(f"{stim_path}: missing file (NSD stimuli, dataset imgBrick (73000, 425, 425, 3))")
        check_stimuli(stim_path)  # header only, before any beta file is read
        self.check(f"{stim_path.name}: opens; imgBrick uint8 {IMAGE_BRICK_SHAPE}")
        subjects = []
        for s in cfg.subjects:
            p = _plan_subject(cfg, root, int(s), design)
            self.check(f"{p.tag}: {len(p.beta_files)} beta file header(s) ({cfg.beta_format}, int16, "
                       f"{TRIALS_PER_SESSION} trials, one volume {p.volume_shape}); ROI {p.roi_file.name} of that "
                       f"volume, {len(p.voxel_ijk)} voxels; responses.tsv agrees with the design")
            if p.dropped_sessions:
                self.warn(f"{p.tag}: test_convention=legacy drops session(s) {p.dropped_sessions} (not in the "
                          f"pre-2023 {legacy_sessions(p.subject)}-session release)")
            subjects.append(p)
        image_ids = np.unique(np.concatenate([p.id73k for p in subjects]))
        captions = all_captions = None
        if cfg.captions:
            captions, all_captions = _load_captions(Path(cfg.captions), image_ids)
            self.check(f"{Path(cfg.captions).name}: ({N_IMAGES_73K}, 5) captions")
        return NSDPlan(design, stim_info, stim_path, subjects, image_ids, captions, all_captions)

    def validate(self, plan: NSDPlan) -> None:
        cfg = self.cfg
        if cfg.validate == "off":
            self.skip_check("real-NSD invariants: dataset.validate=off")
            return
        shared = {p.subject: plan.design.subjectim[p.subject - 1, :1000] for p in plan.subjects}
        problems = []
        for p in plan.subjects:
            if not looks_real(p.subject, p.volume_shape):
                self.skip_check(f"{p.tag}: volume {p.volume_shape} is not the real NSD's: real-data validation "
                                "skipped")
                continue
            nsdgeneral = (p.roi_file.name == "nsdgeneral.nii.gz" and list(cfg.roi["labels"]) == [1])
            problems += check_real_invariants(
                p.subject, sessions=p.sessions, trials_per_session={s: TRIALS_PER_SESSION for s in p.sessions},
                n_test_trials=int(p.is_test.sum()), test_convention=cfg.test_convention,
                n_nsdgeneral_voxels=len(p.voxel_ijk) if nsdgeneral else None, shared_ids=shared)
            self.check(f"{p.tag}: real-NSD invariants (trials per session, nsdgeneral voxels, shared1000 test "
                       f"trials; dataset.validate={cfg.validate})")
        problems = sorted(set(problems))
        apply_validation(problems, cfg.validate)
        self.warnings += [f"NSD validation: {p}" for p in problems]

    def write(self, writer: StoreWriter, plan: NSDPlan) -> Written:
        cfg, root, image_ids, stim_info = self.cfg, self.root, plan.image_ids, plan.stim_info
        _write_images(writer, plan.stim_path, image_ids, cfg, plan.captions)
        writer.write_extra("nsd_images", {
            "nsd_id": image_ids.tolist(), "coco_id": stim_info["cocoId"][image_ids].tolist(),
            "coco_split": stim_info["cocoSplit"][image_ids].tolist(),
            "shared1000": stim_info["shared1000"][image_ids].tolist(), "captions": plan.all_captions,
        })
        subjects = {p.tag: _convert_subject(writer, p, cfg, image_ids) for p in plan.subjects}
        plans = plan.subjects
        resize = "none (425 px)" if cfg.image_size == 425 else f"PIL bicubic 425 -> {cfg.image_size} px, once"
        provenance = {
            "source": "nsd",
            "converter": CONVERTER_VERSION,
            "config": cfg.content(),
            "config_fingerprint": cfg.fingerprint(),
            "root": str(root),
            "beta_version": f"{cfg.beta_version} ({BETA_DIRS[cfg.beta_version]})",
            "beta_format": cfg.beta_format,
            "scaling": "int16 / 300 -> percent signal change",
            "zscore_at_load": True,
            "normalisation": "none: betas stored as percent signal change; the datamodule z-scores each "
                             "session with that session's training-trial statistics",
            "roi": {"file": str((cfg.roi or {}).get("file")), "labels": list(cfg.roi["labels"]),
                    "rule": "voxels whose label is in labels (-1 and 0 never selected); C-order over X,Y,Z"},
            "test_convention": cfg.test_convention,
            "test_convention_rule": ("new: shared1000 trials of all released sessions" if cfg.test_convention
                                     == "new" else "legacy: only each subject's first (sessions - 3) sessions "
                                     "(37 for 40-session subjects, as in the pre-2023 release), for test and train"),
            "sessions": {p.tag: p.sessions for p in plans},
            "sessions_dropped": {p.tag: p.dropped_sessions for p in plans},
            "split_rule": "test: trials of shared1000 images (10k index <= 1000); val: training images whose "
                          "splitmix64(73k id, val_seed) uniform < val_fraction (all repetitions of an image in "
                          "one split, stable across subject/session subsets); train: the rest",
            "val": {"fraction": cfg.val_fraction, "seed": cfg.val_seed, "rule": "hash of 0-based 73k id"},
            "ncsnr": "NSD formula (normalization.ncsnr_from_repeats) on betas z-scored per session over all "
                     f"its trials, images shown 3x (2x if none) in the converted sessions ({cfg.ncsnr_images})",
            "ncsnr_threshold": cfg.ncsnr_threshold,
            "images": {"source": "nsd_stimuli.hdf5 imgBrick", "resize": resize,
                       "ids": "nsd-<0-based 73k id>", "source_ids": "0-based 73k ids"},
            "repeat": "0-based presentation count among the converted trials",
        }
        extras = {"beta_format": cfg.beta_format, "beta_version": cfg.beta_version,
                  "test_convention": cfg.test_convention, "root": str(root)}
        return Written(provenance, subjects, extras)

    def table(self, summary: dict[str, Any]) -> list[str]:
        lines = ["subject  sessions  trials  voxels  train/val/test trials  test images  median ncsnr  s/session"]
        for tag, st in summary["subjects"].items():
            med = st["ncsnr_percentiles"]["50"]
            lines.append(f"{tag:<8} {len(st['sessions']):>8}  {st['n_trials']:>6}  {st['n_voxels']:>6}  "
                         f"{st['n_train_trials']:>6}/{st['n_val_trials']}/{st['n_test_trials']:<10} "
                         f"{st['n_test_images']:>11}  {med if med is not None else 'n/a':>12}  "
                         f"{st['seconds_per_session']:>9}")
        lines.append(f"{summary['n_images']} images at {summary['image_size']} px; converted in "
                     f"{summary['seconds']:.1f} s")
        return lines


def convert_nsd(dataset_cfg: Any) -> dict[str, Any]:
    """Convert raw NSD (``dataset.root``) into the prepared store at ``dataset.store``.

    Returns the converter summary (braindecode_fw/data/convert/base.py ``REPORT_KEYS``) with per-subject
    statistics and a printable ``report``; ``noop`` is true when the existing store already matches
    the configuration.
    """
    return NSDConverter.convert(dataset_cfg)
