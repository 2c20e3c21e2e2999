"""Prepared store v1: the one on-disk format every data source is converted into.

Layout (documented in ``docs/data_format.md``)::

    <root>/
      dataset.json                 name, modality, format_version, subjects, provenance, version
      images/images.npy            uint8 (n_images, height, width, 3)
      images/metadata.json         {"ids": [...], "captions": [...], "source_ids": [...]}
      subjects/<id>/responses.npy  float16/float32 (trials, voxels) fMRI or (trials, sensors, times) MEG
      subjects/<id>/trials.tsv     trial_id, image_index, session, run, repeat, split
      subjects/<id>/geometry.npz   fMRI: voxel_ijk (voxels, 3), affine (4, 4), volume_shape (3,)
                                   MEG: sensor_names (sensors,) str, sensor_positions (sensors, 2) in
                                   [0, 1]² (-0.1 = not in the layout), sfreq (), tmin () seconds
      subjects/<id>/mask.nii.gz    fMRI: the subject's voxel mask as NIfTI
      subjects/<id>/statistics.json   summaries written by the converter (e.g. ncsnr quantiles)
      subjects/<id>/*.npy / *.npz  optional per-voxel extras (ncsnr.npy, simulator truth, ...)
      extras/                      optional dataset-level artefacts (oracle.json, ...)

Writes happen in ``<root>.partial-<pid>`` and the directory is renamed to ``<root>`` only when
complete, so a killed converter never leaves a store that opens. :func:`open_store` validates the
whole store and reports every problem with the file and field it concerns.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.errors import DataError, MissingFileError, OutputExistsError, UnknownNameError
from braindecode_fw.io import atomic_write_json, remove_dead_temporaries, restore_moved_aside
from braindecode_fw.ops.faults import fault_point

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODALITIES = ("fmri", "meg")
# test_large: a second held-out set evaluated separately (THINGS-MEG's "large" test set, docs/datasets/things_meg.md)
SPLITS = ("train", "val", "test", "test_large")
TRIAL_COLUMNS = ("trial_id", "image_index", "session", "run", "repeat", "split")
RESPONSE_DTYPES = (np.dtype("float16"), np.dtype("float32"))
_FINITE_CHECK_ROWS = 4096  # rows per chunk when scanning responses for NaN/Inf


class StoreValidationError(DataError):
    """A prepared store failed validation; ``problems`` lists every ``file: field: problem``."""

    def __init__(self, root: Path, problems: list[str]):
        self.root = Path(root)
        self.problems = list(problems)
        n = len(problems)
        super().__init__(
            f"invalid prepared store {root}: {n} problem{'s' if n != 1 else ''}: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Trial table
# --------------------------------------------------------------------------------------------


@dataclass
class TrialTable:
    """One row per trial. All columns have length ``n_trials``."""

    trial_id: np.ndarray  # int64
    image_index: np.ndarray  # int64, row in images/images.npy
    session: np.ndarray  # int64, 0-based
    run: np.ndarray  # int64, 0-based within session
    repeat: np.ndarray  # int64, 0-based presentation count of this image for this subject
    split: np.ndarray  # str ("train", "val", "test", "test_large")

    def __len__(self) -> int:
        return len(self.trial_id)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in TRIAL_COLUMNS}

    def write(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(TRIAL_COLUMNS)
            writer.writerows(zip(*(self.columns()[c].tolist() for c in TRIAL_COLUMNS), strict=True))

    @classmethod
    def read(cls, path: Path) -> TrialTable:
        """Read ``trials.tsv``; raises ``ValueError`` naming the file and column on bad content."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            raise DataError(f"{path}: empty file, expected a header with columns {list(TRIAL_COLUMNS)}")
        header = tuple(rows[0])
        missing = [c for c in TRIAL_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header is {list(header)}")
        body = rows[1:]
        cols: dict[str, np.ndarray] = {}
        for name in TRIAL_COLUMNS:
            j = header.index(name)
            values = [r[j] if j < len(r) else "" for r in body]
            if name == "split":
                cols[name] = np.asarray(values, dtype=object).astype(str)
            else:
                try:
                    cols[name] = np.asarray(values, dtype=np.int64)
                except ValueError as e:
                    raise DataError(f"{path}: column {name!r} must hold integers ({e})") from None
        return cls(**cols)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class ImageStream:
    """Writes ``images/images.npy`` through a memory map and fingerprints it block by block; from
    :meth:`StoreWriter.open_images`. ``append`` blocks in order, then ``close`` with the metadata."""

    def __init__(self, writer: StoreWriter, n_images: int, height: int, width: int):
        self.writer = writer
        self.array = np.lib.format.open_memmap(writer.partial / "images" / "images.npy", mode="w+",
                                               dtype=np.uint8, shape=(n_images, height, width, 3))
        self.filled = 0

    def append(self, block: np.ndarray) -> None:
        """``block``: uint8 ``(k, height, width, 3)``, the next ``k`` images."""
        if block.dtype != np.uint8 or block.shape[1:] != self.array.shape[1:]:
            raise DataError(f"images must be uint8 (k, {', '.join(map(str, self.array.shape[1:]))}), "
                             f"got {block.dtype} {block.shape}")
        if self.filled + len(block) > len(self.array):
            raise DataError(f"images: {self.filled + len(block)} images for {len(self.array)} rows")
        self.array[self.filled : self.filled + len(block)] = block
        self.writer._hash.update(np.ascontiguousarray(block).tobytes())
        self.filled += len(block)

    def close(self, ids: list[str], captions: list[str] | None = None, source_ids: list[Any] | None = None) -> None:
        n = len(self.array)
        if self.filled != n:
            raise DataError(f"images: {self.filled} of {n} images written")
        for fname, values in (("ids", ids), ("captions", captions), ("source_ids", source_ids)):
            if values is not None and len(values) != n:
                raise DataError(f"images/metadata.json: {fname} has {len(values)} entries, expected {n}")
        self.array.flush()
        del self.array
        meta = {
            "ids": list(ids),
            "captions": list(captions) if captions is not None else None,
            "source_ids": list(source_ids) if source_ids is not None else None,
        }
        atomic_write_json(self.writer.partial / "images" / "metadata.json", meta)
        self.writer._n_images = n
        self.writer._hash.update(json.dumps(meta).encode())


def remove_stale_partials(store: Path) -> list[Path]:
    """Clean up after killed writers of ``store`` (a conversion or world generation):
    :func:`~braindecode_fw.io.remove_dead_temporaries` removes their ``<store>.partial-<pid>``
    folders and, where ``store`` is missing, renames a ``<store>.replaced-<pid>`` (the previous store,
    moved aside just before the kill) back. A live writer's folder is refused, naming its pid."""

    def refuse(path: Path, pid: int) -> None:
        raise OutputExistsError(f"{path}: another process (pid {pid}) is writing this store; wait for it "
                                "or stop it first")

    return remove_dead_temporaries(store.parent, store.name, on_live=refuse)


class StoreWriter:
    """Builds a prepared store in a temporary directory and publishes it atomically.

    Use as a context manager: on success the partial directory is renamed to ``root`` (an existing
    store at ``root`` is replaced only when ``overwrite=True``); on an exception it is removed.

    Large response arrays can be streamed with :meth:`open_responses`, which returns a writable
    memory map of the final shape, so converters never hold a whole subject in memory.
    """

    def __init__(self, root: str | Path, *, name: str, modality: str, overwrite: bool = False):
        if modality not in MODALITIES:
            raise DataError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.root = Path(root)
        self.name = name
        self.modality = modality
        self.overwrite = overwrite
        self.partial = self.root.with_name(f"{self.root.name}.partial-{os.getpid()}")
        self._subjects: list[str] = []
        self._n_images: int | None = None
        self._hash = hashlib.sha256()

    # context management -------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        remove_stale_partials(self.root)  # what a killed writer of this store left behind
        if self.root.exists() and not self.overwrite:
            raise OutputExistsError(f"{self.root} already exists (set overwrite to replace it)")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        (self.partial / "images").mkdir(parents=True)
        (self.partial / "subjects").mkdir()
        (self.partial / "extras").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)

    # content ---------------------------------------------------------------------------------
    def write_images(
        self,
        images: np.ndarray,
        ids: list[str],
        captions: list[str] | None = None,
        source_ids: list[Any] | None = None,
    ) -> None:
        """images: uint8 ``(n_images, height, width, 3)``, all at once (small sets)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images must be uint8 (n, h, w, 3), got {images.dtype} {images.shape}")
        stream = self.open_images(*images.shape[:3])
        stream.append(images)
        stream.close(ids, captions, source_ids)

    def open_images(self, n_images: int, height: int, width: int) -> ImageStream:
        """Stream ``n_images`` uint8 ``(height, width, 3)`` images into ``images/images.npy`` block by
        block (a full NSD/MindEye2 image set is ~11 GB at 224 px); close it with the metadata."""
        return ImageStream(self, n_images, height, width)

    def subject_dir(self, subject: str) -> Path:
        d = self.partial / "subjects" / subject
        d.mkdir(parents=True, exist_ok=True)
        if subject not in self._subjects:
            self._subjects.append(subject)
        return d

    def open_responses(self, subject: str, shape: tuple[int, ...], dtype: str = "float32") -> np.memmap:
        """Writable memory map for ``subjects/<subject>/responses.npy`` of the final shape."""
        return np.lib.format.open_memmap(
            self.subject_dir(subject) / "responses.npy", mode="w+", dtype=np.dtype(dtype), shape=shape
        )

    def write_subject(
        self,
        subject: str,
        trials: TrialTable,
        responses: np.ndarray | None = None,
        *,
        voxel_ijk: np.ndarray | None = None,
        affine: np.ndarray | None = None,
        volume_shape: tuple[int, int, int] | None = None,
        sensor_names: list[str] | None = None,
        sensor_positions: np.ndarray | None = None,
        sfreq: float | None = None,
        tmin: float | None = None,
        statistics: dict[str, Any] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write one subject. ``responses`` may be omitted if :meth:`open_responses` was used.
        fMRI geometry: ``voxel_ijk`` + ``affine`` + ``volume_shape``; MEG geometry: ``sensor_names``,
        ``sensor_positions`` ``(sensors, 2)``, ``sfreq`` (Hz) and ``tmin`` (s, first sample's time)."""
        d = self.subject_dir(subject)
        if responses is not None:
            np.save(d / "responses.npy", responses)
        fault_point("store.subject", d)
        trials.write(d / "trials.tsv")
        self._hash.update(subject.encode())
        self._hash.update((d / "trials.tsv").read_bytes())
        if voxel_ijk is not None:
            if affine is None or volume_shape is None:
                raise DataError("voxel_ijk needs affine and volume_shape too")
            np.savez(d / "geometry.npz", voxel_ijk=voxel_ijk.astype(np.int32),
                     affine=np.asarray(affine, dtype=np.float64),
                     volume_shape=np.asarray(volume_shape, dtype=np.int32))
            _write_mask_nifti(d / "mask.nii.gz", voxel_ijk, affine, volume_shape)
        if sensor_names is not None:
            if sensor_positions is None or sfreq is None or tmin is None:
                raise DataError("sensor_names needs sensor_positions, sfreq and tmin too")
            positions = np.asarray(sensor_positions, dtype=np.float32)
            if positions.shape != (len(sensor_names), 2):
                raise DataError(f"sensor_positions: expected ({len(sensor_names)}, 2), got {positions.shape}")
            np.savez(d / "geometry.npz", sensor_names=np.asarray(sensor_names, dtype=str),
                     sensor_positions=positions, sfreq=np.float64(sfreq), tmin=np.float64(tmin))
        if statistics is not None:
            atomic_write_json(d / "statistics.json", statistics)
        for key, value in (arrays or {}).items():
            np.save(d / f"{key}.npy", value)

    def write_extra(self, name: str, obj: Any) -> None:
        """A dataset-level JSON artefact under ``extras/`` (e.g. the synthetic oracle)."""
        atomic_write_json(self.partial / "extras" / f"{name}.json", obj)

    def finalize(self, provenance: dict[str, Any], **fields: Any) -> Path:
        """Write ``dataset.json`` (last) and atomically publish the store at ``root``."""
        if self._n_images is None:
            raise DataError("write_images() must be called before finalize()")
        self._hash.update(json.dumps(provenance, sort_keys=True, default=str).encode())
        meta = {
            "name": self.name,
            "modality": self.modality,
            "format_version": FORMAT_VERSION,
            "version": self._hash.hexdigest()[:16],
            "n_images": self._n_images,
            "subjects": list(self._subjects),
            "provenance": provenance,
            **fields,
        }
        atomic_write_json(self.partial / "dataset.json", meta)
        fault_point("store.finalize", self.root)
        if self.root.exists():
            # killed between these two renames, the old store waits as .replaced-<pid>: the next
            # writer or open_store renames it back (remove_stale_partials)
            trash = self.root.with_name(f"{self.root.name}.replaced-{os.getpid()}")
            os.replace(self.root, trash)
            fault_point("store.swap", self.root)
            os.replace(self.partial, self.root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.partial, self.root)
        log.info("prepared store written to %s (version %s)", self.root, meta["version"])
        return self.root


def _write_mask_nifti(path: Path, voxel_ijk: np.ndarray, affine: np.ndarray, volume_shape) -> None:
    import nibabel as nib

    mask = np.zeros(tuple(int(s) for s in volume_shape), dtype=np.uint8)
    mask[tuple(voxel_ijk.T)] = 1
    nib.save(nib.Nifti1Image(mask, np.asarray(affine, dtype=np.float64)), str(path))


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class SubjectData:
    """One subject of an opened store. ``responses`` is memory-mapped (read-only)."""

    subject: str
    responses: np.ndarray  # (trials, voxels) or (trials, sensors, times)
    trials: TrialTable
    directory: Path

    @property
    def n_features(self) -> int:
        return int(self.responses.shape[1])

    def sensor_geometry(self) -> dict[str, Any]:
        """MEG: ``{"names": [str], "positions": (sensors, 2) float32, "sfreq": float, "tmin": float}``."""
        path = self.directory / "geometry.npz"
        if not path.exists():
            raise MissingFileError(f"{path}: missing (MEG subjects need sensor names and positions)")
        with np.load(path) as g:
            if "sensor_positions" not in g:
                raise UnknownNameError(f"{path}: no sensor_positions (is this an fMRI subject?)")
            return {"names": [str(n) for n in g["sensor_names"]], "positions": g["sensor_positions"].astype(np.float32),
                    "sfreq": float(g["sfreq"]), "tmin": float(g["tmin"])}

    def load_array(self, name: str) -> np.ndarray:
        """An optional per-subject array (``ncsnr``, ``geometry``...)."""
        for suffix in (".npy", ".npz"):
            p = self.directory / f"{name}{suffix}"
            if p.exists():
                return np.load(p)
        raise MissingFileError(f"{self.directory / name}.npy: not in this store")

    def statistics(self) -> dict[str, Any]:
        p = self.directory / "statistics.json"
        return json.loads(p.read_text()) if p.exists() else {}


@dataclass
class PreparedStore:
    root: Path
    meta: dict[str, Any]
    images: np.ndarray  # memory-mapped uint8 (n_images, h, w, 3)
    image_metadata: dict[str, Any]
    subjects: dict[str, SubjectData] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    def extra(self, name: str) -> dict[str, Any] | None:
        p = self.root / "extras" / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None


def _load_npy(path: Path, problems: list[str], rel: str) -> np.ndarray | None:
    if not path.exists():
        problems.append(f"{rel}: missing file")
        return None
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - any failure is reported as unreadable
        problems.append(f"{rel}: cannot be read as a .npy array ({type(e).__name__}: {e})")
        return None


def _count_nonfinite(arr: np.ndarray) -> int:
    bad = 0
    for start in range(0, arr.shape[0], _FINITE_CHECK_ROWS):
        chunk = np.asarray(arr[start : start + _FINITE_CHECK_ROWS])
        bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    return bad


def open_store(root: str | Path, *, check_finite: bool = True) -> PreparedStore:
    """Open and validate a prepared store.

    Raises :class:`StoreValidationError` listing *every* problem found (missing files, shape or
    dtype mismatches, image indices out of range, NaN/Inf responses, duplicate trial ids, unknown
    format version), each as ``<relative file>: <field>: <problem>``.
    """
    root = Path(root)
    if not root.is_dir() and root.parent.is_dir():
        # a writer killed while swapping stores left the previous one as .replaced-<pid>: put it back
        restore_moved_aside(root.parent, root.name)
    if not root.is_dir():
        partial = sorted(root.parent.glob(f"{root.name}.partial-*")) if root.parent.exists() else []
        hint = f" (found an incomplete write {partial[0].name}; re-run bdf-prepare)" if partial else ""
        raise MissingFileError(f"prepared store not found: {root} does not exist{hint}")
    problems: list[str] = []
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise StoreValidationError(root, ["dataset.json: missing file (not a prepared store)"])
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreValidationError(root, [f"dataset.json: not valid JSON ({e})"]) from None
    for key in ("name", "modality", "format_version", "version", "n_images", "subjects", "provenance"):
        if key not in meta:
            problems.append(f"dataset.json: {key}: missing field")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        problems.append(
            f"dataset.json: format_version: unknown version {meta.get('format_version')!r} "
            f"(this braindecode_fw reads version {FORMAT_VERSION})"
        )
    if "modality" in meta and meta["modality"] not in MODALITIES:
        problems.append(f"dataset.json: modality: {meta['modality']!r} is not one of {MODALITIES}")
    if problems:
        raise StoreValidationError(root, problems)

    images = _load_npy(root / "images" / "images.npy", problems, "images/images.npy")
    n_images = int(meta["n_images"])
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            problems.append(f"images/images.npy: expected uint8 (n, h, w, 3), got {images.dtype} {images.shape}")
        elif images.shape[0] != n_images:
            problems.append(f"images/images.npy: has {images.shape[0]} images, dataset.json n_images is {n_images}")
    image_meta: dict[str, Any] = {}
    mpath = root / "images" / "metadata.json"
    if not mpath.exists():
        problems.append("images/metadata.json: missing file")
    else:
        try:
            image_meta = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"images/metadata.json: not valid JSON ({e})")
        for key in ("ids", "captions", "source_ids"):
            values = image_meta.get(key)
            if key == "ids" and values is None:
                problems.append("images/metadata.json: ids: missing field")
            elif values is not None and len(values) != n_images:
                problems.append(f"images/metadata.json: {key}: has {len(values)} entries, expected {n_images}")

    expected_ndim = 2 if meta["modality"] == "fmri" else 3
    subjects: dict[str, SubjectData] = {}
    for subject in meta["subjects"]:
        sdir = root / "subjects" / subject
        rel = f"subjects/{subject}"
        if not sdir.is_dir():
            problems.append(f"{rel}: missing directory for subject listed in dataset.json")
            continue
        responses = _load_npy(sdir / "responses.npy", problems, f"{rel}/responses.npy")
        trials = None
        if not (sdir / "trials.tsv").exists():
            problems.append(f"{rel}/trials.tsv: missing file")
        else:
            try:
                trials = TrialTable.read(sdir / "trials.tsv")
            except ValueError as e:
                problems.append(f"{rel}/trials.tsv: {str(e).split(': ', 1)[-1]}")
        if responses is not None:
            if responses.dtype not in RESPONSE_DTYPES:
                problems.append(f"{rel}/responses.npy: dtype {responses.dtype}, expected float16 or float32")
            if responses.ndim != expected_ndim:
                problems.append(
                    f"{rel}/responses.npy: {responses.ndim}-D array {responses.shape}, expected "
                    f"{expected_ndim}-D for modality {meta['modality']!r}"
                )
            elif check_finite and responses.dtype in RESPONSE_DTYPES:
                bad = _count_nonfinite(responses)
                if bad:
                    problems.append(f"{rel}/responses.npy: contains {bad} NaN/Inf values")
        if trials is not None:
            if responses is not None and len(trials) != responses.shape[0]:
                problems.append(
                    f"{rel}/trials.tsv: {len(trials)} trials but responses.npy has "
                    f"{responses.shape[0]} rows (shape {responses.shape})"
                )
            out = (trials.image_index < 0) | (trials.image_index >= n_images)
            if out.any():
                problems.append(
                    f"{rel}/trials.tsv: image_index: {int(out.sum())} value(s) outside [0, {n_images}), "
                    f"e.g. {int(trials.image_index[out][0])}"
                )
            uniq, counts = np.unique(trials.trial_id, return_counts=True)
            if (counts > 1).any():
                problems.append(
                    f"{rel}/trials.tsv: trial_id: {int((counts > 1).sum())} duplicated id(s), "
                    f"e.g. {int(uniq[counts > 1][0])}"
                )
            bad_split = ~np.isin(trials.split, SPLITS)
            if bad_split.any():
                problems.append(
                    f"{rel}/trials.tsv: split: unknown value {str(trials.split[bad_split][0])!r}, expected one of {SPLITS}"
                )
        geo = sdir / "geometry.npz"
        if meta["modality"] == "meg" and responses is not None and responses.ndim == 3:
            if not geo.exists():
                problems.append(f"{rel}/geometry.npz: missing file (MEG needs sensor_names and sensor_positions)")
            else:
                with np.load(geo) as g:
                    missing = [k for k in ("sensor_names", "sensor_positions", "sfreq", "tmin") if k not in g]
                    if missing:
                        problems.append(f"{rel}/geometry.npz: missing field(s) {missing}")
                    else:
                        n_sensors = responses.shape[1]
                        if g["sensor_names"].shape != (n_sensors,):
                            problems.append(f"{rel}/geometry.npz: sensor_names has {g['sensor_names'].shape} "
                                            f"entries, expected ({n_sensors},) for responses {responses.shape}")
                        if g["sensor_positions"].shape != (n_sensors, 2):
                            problems.append(f"{rel}/geometry.npz: sensor_positions shape "
                                            f"{g['sensor_positions'].shape}, expected ({n_sensors}, 2)")
        if geo.exists() and responses is not None and meta["modality"] == "fmri":
            ijk = np.load(geo)["voxel_ijk"]
            if ijk.shape != (responses.shape[1], 3):
                problems.append(
                    f"{rel}/geometry.npz: voxel_ijk shape {ijk.shape}, expected ({responses.shape[1]}, 3)"
                )
        if responses is not None and trials is not None:
            subjects[subject] = SubjectData(subject, responses, trials, sdir)
    if problems:
        raise StoreValidationError(root, problems)
    assert images is not None
    return PreparedStore(root=root, meta=meta, images=images, image_metadata=image_meta, subjects=subjects)
