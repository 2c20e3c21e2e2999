"""THINGS-MEG (Hebart et al. 2023, OpenNeuro ds004212) -> prepared store (docs/datasets/things_meg.md).

Follows Benchetrit et al. 2023's data handling (docs/methods/meg_brainmodule.md §1, brainmagick's conventions §6):

``input=raw`` (default) reads every BIDS run ``sub-<label>/ses-NN/meg/sub-<label>_ses-NN_task-main_run-NN_meg.ds``
through :func:`open_run` (``.ds`` = CTF in the release, :func:`mne.io.read_raw_ctf`; ``.fif`` in the fixture),
checks it against the run's ``meg.json`` rate and ``channels.tsv`` sensors,
keeps the 272 MEG sensors (``picks="mag"``: MNE exposes CTF axial gradiometers as ``mag``; reference
and misc channels are dropped), optionally band-passes, resamples the *continuous* run to ``sfreq``
(120 Hz), cuts ``tmin..tmax`` (-0.5..1.0 s -> 181 samples) around each image onset (events.tsv
``sample`` column, or the ``UPPT001`` hardware triggers), subtracts each epoch's per-channel baseline
mean (``baseline``), robust-scales per recording (= run) and channel (median / IQR) and clamps to
``±clamp``. Catch trials are dropped.

``input=hebart_epochs`` reads Hebart's derivative ``derivatives/preprocessed/preprocessed_P{n}-epo.fif``
(271 channels, 200 Hz, -0.1..1.3 s, already band-passed 0.1-40 Hz and baseline z-scored), resamples to
``sfreq`` (169 samples at 120 Hz), baseline-corrects with the same rule and robust-scales per session
(its runs are concatenated; the metadata ``session_nr`` column says which).

Splits (docs/methods/meg_brainmodule.md §1): ``test`` rows -> ``test`` (200 images x 12 repetitions in the release); ``exp`` rows
whose THINGS concept is a test concept -> ``test_large`` (``split=benchetrit``; 2,400 trials);
remaining ``exp`` rows -> ``train``, of which images with ``hash_uniform(THINGS image number,
val_seed) < val_fraction`` -> ``val``. ``split=original`` (Hebart) keeps every ``exp`` row for train/val.

Responses are written run by run (session by session for the derivative) into the store's memory map,
so memory is bounded by one run. The store is published atomically by :class:`StoreWriter`; stale
partial folders of dead conversions are removed; a store built from the same configuration is left
as is unless ``force=true``. Responses are already robust-scaled: ``provenance.zscore_at_load=false``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.data.convert.base import Converter, ConverterInputError, Written
from braindecode_fw.data.convert.common import is_val_image
from braindecode_fw.data.meg_layout import (
    CTF_LAYOUT,
    clean_channel_name,
    sensor_positions,
    valid_positions,
)
from braindecode_fw.data.meg_preprocessing import RobustScaling, baseline_correct
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.errors import DataError
from braindecode_fw.schema import FROM_YAML, config_dataclass, dataclass_from_mapping, setting

log = logging.getLogger(__name__)

CONVERTER_VERSION = "things_meg-1"
TRIGGER_CHANNEL = "UPPT001"
TRIGGER_IMAGE, TRIGGER_END = 64, 32
TRIAL_TYPES = ("exp", "test", "catch")
RUN_PATTERN = re.compile(r"sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>\d+)_task-main_run-(?P<run>\d+)_meg\.(?P<ext>ds|fif)$")
EVENT_COLUMNS = ("trial_type", "things_category_nr", "value")
# MEG sensors of a CTF-275 system (``MLC11``, ``MRF43-1609``): ds004212's channels.tsv types them OTHER,
# so they are recognised by name; the BIDS MEG types are accepted too
CTF_SENSOR_NAME = re.compile(r"^M[LRZ][CFOPT]\d{2}(-\d+)?$")
BIDS_MEG_TYPES = ("MEGMAG", "MEGGRADAXIAL", "MEGGRADPLANAR", "MEGOTHER")
CATEGORY_TABLE = "sourcedata/category_mat_manual.tsv"
ATTRIBUTE_COLUMNS = ("trial_type", "things_image_nr", "image_path")
# keys of braindecode_fw/conf/dataset/things_meg.yaml that do not change the converted content
_NON_CONTENT_KEYS = ("name", "kind", "modality", "store", "auto_prepare", "root", "images_root", "force",
                     "replace", "progress", "image_chunk")


class ThingsMEGInputError(ConverterInputError):
    """THINGS-MEG input is missing or not in the expected format; the message names the file."""


@config_dataclass("dataset/things_meg.yaml", key="dataset")
class ThingsMEGConvertConfig:
    """Mirror of ``braindecode_fw/conf/dataset/things_meg.yaml``, which holds every default (braindecode_fw/schema.py
    fills the fields from it; ``store`` is None outside Hydra). docs/datasets/things_meg.md describes every key."""

    root: str | None = FROM_YAML
    images_root: str | None = FROM_YAML
    store: str | None = FROM_YAML
    name: str = FROM_YAML
    kind: str = FROM_YAML
    modality: str = FROM_YAML
    auto_prepare: bool = FROM_YAML
    input: str = FROM_YAML
    subjects: list[str | int] | None = FROM_YAML  # BIGMEG1 or 1; normalised to labels by validate_choices
    sessions: Any = FROM_YAML  # null = all on disk | int N = 1..N | list of 1-based sessions
    onset_source: str = FROM_YAML
    sfreq: float = FROM_YAML
    tmin: float = FROM_YAML
    tmax: float = FROM_YAML
    baseline: list[float | None] | None = FROM_YAML
    l_freq: float | None = FROM_YAML
    h_freq: float | None = FROM_YAML
    resample_method: str = FROM_YAML
    clamp: float | None = FROM_YAML
    split: str = FROM_YAML
    val_fraction: float = FROM_YAML
    val_seed: int = FROM_YAML
    image_size: int = FROM_YAML
    caption_template: str = FROM_YAML
    dtype: str = FROM_YAML
    force: bool = FROM_YAML
    replace: bool = FROM_YAML
    progress: bool = FROM_YAML
    image_chunk: int = setting(min=1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ThingsMEGConvertConfig:
        out = dataclass_from_mapping(cls, cfg, what="THINGS-MEG converter")
        out.validate_choices()
        return out

    def validate_choices(self) -> None:
        checks = [("input", self.input, ("raw", "hebart_epochs")),
                  ("onset_source", self.onset_source, ("events_tsv", "trigger")),
                  ("split", self.split, ("benchetrit", "original")),
                  ("dtype", self.dtype, ("float32", "float16")),
                  ("resample_method", self.resample_method, ("fft", "polyphase"))]
        for key, value, options in checks:
            if value not in options:
                raise DataError(f"dataset.{key}: {value!r} is not one of {list(options)}")
        if not float(self.sfreq) > 0:
            raise DataError(f"dataset.sfreq: expected a positive rate in Hz, got {self.sfreq}")
        if not float(self.tmin) < 0 < float(self.tmax):
            raise DataError(f"dataset.tmin/tmax: expected tmin < 0 < tmax seconds, got {self.tmin}, {self.tmax}")
        if self.clamp is not None and not float(self.clamp) > 0:
            raise DataError(f"dataset.clamp: expected a positive limit or null (no clamping), got {self.clamp}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"dataset.val_fraction: expected a fraction in [0, 1), got {self.val_fraction}")
        if int(self.image_size) < 1:
            raise DataError(f"dataset.image_size: expected a positive side in pixels, got {self.image_size}")
        if self.baseline is not None and (len(self.baseline) != 2 or self.baseline[1] is None):
            raise DataError(f"dataset.baseline: expected [start or null, end] seconds or null, got {self.baseline}")
        if "{concept}" not in self.caption_template:
            raise DataError(f"dataset.caption_template: must contain '{{concept}}', got {self.caption_template!r}")
        if self.subjects is not None:
            self.subjects = [subject_label(s) for s in self.subjects]
        # one spelling per value, so 120 (YAML) and 120.0 (Python) give the same fingerprint
        self.sfreq, self.tmin, self.tmax = float(self.sfreq), float(self.tmin), float(self.tmax)
        self.clamp = None if self.clamp is None else float(self.clamp)
        self.val_fraction = float(self.val_fraction)
        if self.baseline is not None:
            self.baseline = [None if self.baseline[0] is None else float(self.baseline[0]), float(self.baseline[1])]
        for key in ("l_freq", "h_freq"):
            if getattr(self, key) is not None:
                setattr(self, key, float(getattr(self, key)))

    def content(self) -> dict[str, Any]:
        """The configuration that determines the converted store (what the fingerprint hashes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NON_CONTENT_KEYS}

    def fingerprint(self) -> str:
        blob = json.dumps({"converter": CONVERTER_VERSION, **self.content()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subject_label(s: Any) -> str:
    """``1`` / ``"1"`` -> ``"BIGMEG1"``; ``"sub-BIGMEG1"`` -> ``"BIGMEG1"``; other labels unchanged."""
    text = str(s).strip()
    if text.startswith("sub-"):
        text = text[4:]
    if text.isdigit():
        text = f"BIGMEG{int(text)}"
    if not re.fullmatch(r"[A-Za-z0-9]+", text):
        raise DataError(f"dataset.subjects: {s!r} is not a BIDS subject label (e.g. BIGMEG1)")
    return text


def participant_number(label: str) -> int:
    """``"BIGMEG3"`` -> 3, the ``n`` of ``sample_attributes_P{n}.csv`` / ``preprocessed_P{n}-epo.fif``."""
    m = re.search(r"(\d+)$", label)
    if not m:
        raise DataError(f"dataset.subjects: {label!r} has no trailing participant number (P{{n}} files need one)")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Small readers (each error names the file and what was expected)
# ---------------------------------------------------------------------------------------------


def _float(v: str) -> float:
    v = v.strip()
    if v in ("", "N/A", "n/a", "NaN", "nan", "None"):
        return math.nan
    return float(v)


def read_events_tsv(path: Path) -> dict[str, np.ndarray]:
    """A run's ``events.tsv``: ``trial_type`` (str), ``things_category_nr`` and ``value`` (float, NaN
    for ``N/A``), ``onset_s`` (float s from the recording start: ``sample / 1200`` when the ``sample``
    column exists, else ``onset``) and ``sample`` (int or -1). One entry per row (catch included)."""
    if not path.exists():
        raise ThingsMEGInputError(f"{path}: missing file (the run's events, one row per image)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise ThingsMEGInputError(f"{path}: empty file, expected a header with {list(EVENT_COLUMNS)} and onset/sample")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in EVENT_COLUMNS if c not in header]
    if "sample" not in header and "onset" not in header:
        missing.append("sample (or onset)")
    if missing:
        raise ThingsMEGInputError(f"{path}: missing column(s) {missing}; header is {header}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]

    def col(name: str) -> list[str]:
        j = header.index(name)
        return [r[j] if j < len(r) else "" for r in body]

    out: dict[str, np.ndarray] = {"trial_type": np.asarray([t.strip() for t in col("trial_type")], dtype=str)}
    bad = sorted(set(out["trial_type"].tolist()) - set(TRIAL_TYPES))
    if bad:
        raise ThingsMEGInputError(f"{path}: column trial_type has value(s) {bad}, expected {list(TRIAL_TYPES)}")
    try:
        for name in ("things_category_nr", "value"):
            out[name] = np.asarray([_float(v) for v in col(name)], dtype=np.float64)
        out["onset"] = (np.asarray([_float(v) for v in col("onset")], dtype=np.float64) if "onset" in header
                        else np.full(len(body), np.nan))
        out["sample"] = (np.asarray([int(round(_float(v))) if v.strip() not in ("", "N/A", "n/a") else -1
                                     for v in col("sample")], dtype=np.int64) if "sample" in header
                         else np.full(len(body), -1, dtype=np.int64))
    except ValueError as e:
        raise ThingsMEGInputError(f"{path}: non-numeric value in a numeric column ({e})") from None
    images = out["trial_type"] != "catch"
    for name in ("things_category_nr", "value"):
        col_values = out[name][images]
        if np.isnan(col_values).any():
            raise ThingsMEGInputError(f"{path}: column {name} is N/A on an exp/test row (only catch rows may be N/A)")
        # the release writes integers as floats ("1760.0"); anything else is not a THINGS number
        bad = np.flatnonzero((col_values != np.round(col_values)) | (col_values < 1))
        if len(bad):
            row = int(np.flatnonzero(images)[bad[0]]) + 2
            raise ThingsMEGInputError(f"{path}: column {name} is {float(col_values[bad[0]])!r} on line {row}, expected a "
                                      f"1-based THINGS number (an integer, e.g. 1760 or 1760.0)")
    return out


@dataclass
class RunSidecars:
    """What a run's BIDS sidecars say about its recording (None where a sidecar is absent)."""

    channels_path: Path
    meg_json_path: Path
    coordsystem_path: Path
    meg_names: list[str] | None  # MEG sensors of channels.tsv, in file order
    n_typed_other: int  # of them, typed OTHER (ds004212) rather than a BIDS MEG type
    sfreq: float | None  # meg.json SamplingFrequency
    meg_channel_count: int | None  # meg.json MEGChannelCount
    coord_units: str | None  # coordsystem.json MEGCoordinateUnits
    coord_max_abs: float | None  # largest |head-coil coordinate| in coordsystem.json


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        out = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ThingsMEGInputError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(out, dict):
        raise ThingsMEGInputError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def read_run_sidecars(run_path: Path) -> RunSidecars:
    """``channels.tsv``, ``meg.json`` and ``coordsystem.json`` beside a run (each optional).

    MEG sensors are the channels.tsv rows with a BIDS MEG type, or typed ``OTHER`` with a CTF sensor
    name (:data:`CTF_SENSOR_NAME`): the release types all 272 sensors ``OTHER``. Its
    coordsystem.json says ``cm`` where the values are metres; it is read for the report only (sensor
    positions come from MNE's CTF-275 layout)."""
    prefix = run_path.name[: -len("_meg" + run_path.suffix)]
    channels = run_path.with_name(f"{prefix}_channels.tsv")
    meg_json = run_path.with_name(f"{prefix}_meg.json")
    coords = run_path.with_name(f"{prefix}_coordsystem.json")
    names, n_other = None, 0
    if channels.exists():
        with open(channels, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        header = [h.strip() for h in rows[0]] if rows else []
        if "name" not in header or "type" not in header:
            raise ThingsMEGInputError(f"{channels}: expected columns name and type; header is {header}")
        i, j = header.index("name"), header.index("type")
        names = []
        for r in rows[1:]:
            if len(r) <= max(i, j):
                continue
            name, kind = r[i].strip(), r[j].strip().upper()
            if kind in BIDS_MEG_TYPES or (kind == "OTHER" and CTF_SENSOR_NAME.match(name)):
                names.append(name)
                n_other += kind == "OTHER"
    meta = _read_json(meg_json) or {}
    sfreq = count = None
    try:
        if meta.get("SamplingFrequency") is not None:
            sfreq = float(meta["SamplingFrequency"])
        if meta.get("MEGChannelCount") is not None:
            count = int(meta["MEGChannelCount"])
    except (TypeError, ValueError):
        raise ThingsMEGInputError(f"{meg_json}: SamplingFrequency / MEGChannelCount must be numbers, got "
                                  f"{meta.get('SamplingFrequency')!r} / {meta.get('MEGChannelCount')!r}") from None
    cs = _read_json(coords)
    units = max_abs = None
    if cs is not None:
        units = cs.get("MEGCoordinateUnits")
        values = [abs(float(v)) for xyz in (cs.get("HeadCoilCoordinates") or {}).values()
                  if isinstance(xyz, list) for v in xyz if isinstance(v, int | float)]
        max_abs = max(values) if values else None
    return RunSidecars(channels, meg_json, coords, names, n_other, sfreq, count, units, max_abs)


def read_category_table(path: Path) -> int:
    """Rows of ``sourcedata/category_mat_manual.tsv`` (one per THINGS concept, 1,854 in THINGS; a
    header of the 27 higher-level categories): the range of valid ``things_category_nr``."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ThingsMEGInputError(f"{path}: expected a header and one row per THINGS concept, got {len(rows)} line(s)")
    return len(rows) - 1


def read_sample_attributes(path: Path) -> dict[str, list[str]]:
    """``sourcedata/sample_attributes_P{n}.csv`` as columns of strings (comma-separated, one row per
    trial in acquisition order, docs/datasets/things_meg.md)."""
    if not path.exists():
        raise ThingsMEGInputError(f"{path}: missing file (THINGS-MEG sample attributes: trial -> image_path)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ThingsMEGInputError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ATTRIBUTE_COLUMNS if c not in header]
    if missing:
        raise ThingsMEGInputError(f"{path}: missing column(s) {missing}; header is {header}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    return {h: [r[j].strip() if j < len(r) else "" for r in body] for j, h in enumerate(header)}


def image_stem_and_concept(image_path: str) -> tuple[str, str]:
    """``images_meg/pine_tree/pine_tree_07b.jpg`` -> (``pine_tree_07b``, ``pine_tree``): the concept
    is the stem without its last ``_`` token (docs/datasets/things_meg.md)."""
    stem = Path(image_path.replace("\\", "/")).stem
    return stem, "_".join(stem.split("_")[:-1])


# ---------------------------------------------------------------------------------------------
# Planning: everything small is read and checked before anything is written
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    session: int  # 1-based (BIDS ses-NN)
    run: int  # 1-based (BIDS run-NN)
    path: Path
    events_path: Path
    events: dict[str, np.ndarray]
    first_row: int  # row of this run's first event in the subject's acquisition order (all runs on disk)
    sidecars: RunSidecars | None = None  # read by ThingsMEGConverter.plan; checked against the recording

    @property
    def keep(self) -> np.ndarray:
        return self.events["trial_type"] != "catch"


@dataclass
class SubjectPlan:
    label: str
    runs: list[RunPlan]  # converted runs (raw input)
    trial_id: np.ndarray  # (n,) row in the subject's acquisition order (= sample_attributes row)
    value: np.ndarray  # (n,) THINGS image number (1-based)
    category: np.ndarray  # (n,) THINGS concept number
    trial_type: np.ndarray  # (n,) "exp" / "test"
    session: np.ndarray  # (n,) 0-based
    run: np.ndarray  # (n,) 0-based within session
    image_path: list[str]  # (n,) sample-attributes image_path of each trial's image
    attributes_path: Path
    n_catch: int
    n_attribute_mismatches: int
    epochs_path: Path | None = None
    hebart_rows: np.ndarray | None = None  # (n,) epoch index in the derivative
    hebart_session_of_row: np.ndarray | None = None


def _runs_on_disk(sub_dir: Path, label: str) -> list[tuple[int, int, Path]]:
    found: dict[tuple[int, int], Path] = {}
    for p in sorted(sub_dir.glob(f"ses-*/meg/sub-{label}_ses-*_task-main_run-*_meg.*")):
        m = RUN_PATTERN.match(p.name)
        if not m or m.group("sub") != label:
            continue
        key = (int(m.group("ses")), int(m.group("run")))
        if key in found and found[key].suffix == ".ds":
            continue  # the CTF original wins over a converted copy
        found[key] = p
    return [(s, r, p) for (s, r), p in sorted(found.items())]


def discover_subjects(root: Path) -> list[str]:
    """Subject labels with at least one run: from ``participants.tsv`` when present, else folders."""
    labels: list[str] = []
    tsv = root / "participants.tsv"
    if tsv.exists():
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "participant_id" not in rows[0]:
            raise ThingsMEGInputError(f"{tsv}: expected a participant_id column")
        j = rows[0].index("participant_id")
        labels = [r[j].strip()[4:] for r in rows[1:] if len(r) > j and r[j].strip().startswith("sub-")]
    else:
        labels = sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir())
    return [s for s in labels if s.lower() != "emptyroom" and _runs_on_disk(root / f"sub-{s}", s)]


def _selected_sessions(cfg: ThingsMEGConvertConfig, on_disk: list[int], label: str) -> list[int]:
    if cfg.sessions is None:
        return on_disk
    wanted = list(range(1, int(cfg.sessions) + 1)) if isinstance(cfg.sessions, int) else \
        sorted({int(s) for s in cfg.sessions})
    missing = [s for s in wanted if s not in on_disk]
    if missing:
        raise ThingsMEGInputError(f"dataset.sessions: sub-{label} has no run of session(s) {missing} on disk "
                                  f"(sessions found: {on_disk})")
    return wanted


def _int_column(values: list[Any], name: str, path: Path) -> np.ndarray:
    """A column of 1-based integers (``"3"``, ``"3.0"``, ``3.0``); anything else names the file and column."""
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.asarray([math.nan])
    if not np.isfinite(out).all() or (out != np.round(out)).any():
        raise ThingsMEGInputError(f"{path}: column {name} must hold integers on every row")
    return out.astype(np.int64)


def _image_map(attr: dict[str, list[str]], path: Path) -> dict[int, str]:
    """THINGS image number -> image_path over the exp/test rows (the first row of each number)."""
    out: dict[int, str] = {}
    for tt, nr, ip in zip(attr["trial_type"], attr["things_image_nr"], attr["image_path"], strict=True):
        if tt == "catch" or not nr:
            continue
        out.setdefault(int(round(_float(nr))), ip)
    return out


def _align_attribute_rows(attr: dict[str, list[str]], path: Path, runs: list[tuple[int, int, Path, int]],
                          label: str) -> list[int]:
    """First sample-attributes row of each run ``(session, run, events_path, n_events)`` (all runs on
    disk, acquisition order). By ``session_nr``/``run_nr`` when the CSV has them and they match the
    events.tsv row counts; otherwise the CSV's rows must be exactly the runs' events in order."""
    n_rows = len(attr["trial_type"])
    counts = [n for *_, n in runs]
    in_order = np.r_[0, np.cumsum(counts)[:-1]].astype(int).tolist()
    problem = None
    if "session_nr" in attr and "run_nr" in attr:
        sess = _int_column(attr["session_nr"], "session_nr", path)
        run = _int_column(attr["run_nr"], "run_nr", path)
        firsts = []
        for s, r, ev_path, n in runs:
            rows = np.flatnonzero((sess == s) & (run == r))
            if len(rows) != n or (n and not np.array_equal(rows, rows[0] + np.arange(n))):
                problem = (f"{path}: {len(rows)} rows with session_nr={s}, run_nr={r}, expected {n} contiguous "
                           f"rows (one per row of {ev_path.name})")
                break
            firsts.append(int(rows[0]) if n else 0)
        if problem is None:
            return firsts
        if sum(counts) == n_rows:
            log.info("%s; aligning the rows in acquisition order instead (row count matches)", problem)
            return in_order
        raise ThingsMEGInputError(problem)
    if sum(counts) != n_rows:
        raise ThingsMEGInputError(f"{path}: {n_rows} rows, expected {sum(counts)} (one per events.tsv row of the "
                                  f"{len(runs)} runs of sub-{label} on disk, in acquisition order)")
    return in_order


def _expected_runs(runs: list[tuple[int, int, Path]], attr: dict[str, list[str]], attr_path: Path
                   ) -> set[tuple[int, int]]:
    """(session, run) pairs the subject was recorded in: those the sample attributes list
    (``session_nr``/``run_nr``, when the CSV has them), those on disk, and the gaps the files on disk
    imply (sessions 1..the last one; runs 1..the last one of each session)."""
    expected = {(s, r) for s, r, _ in runs}
    if "session_nr" in attr and "run_nr" in attr:
        sess = _int_column(attr["session_nr"], "session_nr", attr_path)
        run = _int_column(attr["run_nr"], "run_nr", attr_path)
        expected |= {(int(s), int(r)) for s, r in zip(sess.tolist(), run.tolist(), strict=True) if s >= 1 and r >= 1}
    last_run = {}
    for s, r in expected:
        last_run[s] = max(r, last_run.get(s, 0))
    all_runs = max(last_run.values())
    for s in range(1, max(last_run) + 1):
        expected |= {(s, r) for r in range(1, last_run.get(s, all_runs) + 1)}
    return expected


def _check_runs_present(cfg: ThingsMEGConvertConfig, root: Path, label: str, runs: list[tuple[int, int, Path]],
                        sessions: list[int], attr: dict[str, list[str]], attr_path: Path) -> list[int]:
    """The sessions to convert, each complete: ``dataset.sessions=null`` means every session the
    subject was recorded in (:func:`_expected_runs`), and a converted session without one of its
    runs would silently hold fewer trials (and test repetitions). Missing runs are listed by the
    file expected for them."""
    expected = _expected_runs(runs, attr, attr_path)
    if cfg.sessions is None:
        sessions = sorted({s for s, _ in expected})
    on_disk = {(s, r) for s, r, _ in runs}
    missing = sorted((s, r) for s, r in expected if s in sessions and (s, r) not in on_disk)
    if not missing:
        return sessions
    names = [f"sub-{label}/ses-{s:02d}/meg/sub-{label}_ses-{s:02d}_task-main_run-{r:02d}_meg.ds" for s, r in missing]
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    complete = [s for s in sessions if not any(m[0] == s for m in missing)]
    which = ("dataset.sessions=null converts every session" if cfg.sessions is None
             else f"dataset.sessions={cfg.sessions} converts whole sessions")
    fewer = (f"name the complete sessions to convert, e.g. dataset.sessions=[{','.join(map(str, complete))}]"
             if complete else "name other sessions in dataset.sessions")
    raise ThingsMEGInputError(f"{root}: {len(missing)} run(s) of sub-{label} missing: {listed} (a _meg.ds folder "
                              f"or _meg.fif file each; {which}, and {attr_path.name} with the runs on disk "
                              f"records sessions {sorted({s for s, _ in expected})}); download them, or {fewer}")


def _plan_raw_subject(cfg: ThingsMEGConvertConfig, root: Path, label: str) -> SubjectPlan:
    sub_dir = root / f"sub-{label}"
    runs = _runs_on_disk(sub_dir, label)
    if not runs:
        raise ThingsMEGInputError(f"{sub_dir}: no run sub-{label}_ses-NN_task-main_run-NN_meg.ds (or .fif) "
                                  "found (dataset.subjects)")
    sessions = _selected_sessions(cfg, sorted({s for s, _, _ in runs}), label)
    attr_path = root / f"sourcedata/sample_attributes_P{participant_number(label)}.csv"
    attr = read_sample_attributes(attr_path)
    sessions = _check_runs_present(cfg, root, label, runs, sessions, attr, attr_path)
    all_events = []
    for s, r, p in runs:
        ev_path = p.with_name(p.name[: -len("_meg" + p.suffix)] + "_events.tsv")
        all_events.append((s, r, p, ev_path, read_events_tsv(ev_path)))
    first_rows = _align_attribute_rows(attr, attr_path, [(s, r, ev_path, len(ev["trial_type"]))
                                                         for s, r, _, ev_path, ev in all_events], label)
    values_by_row = np.asarray([_float(v) if v else math.nan for v in attr["things_image_nr"]])
    by_number = _image_map(attr, attr_path)
    plans: list[RunPlan] = []
    paths: dict[tuple[int, int], list[str]] = {}
    mismatches = 0
    for (s, r, p, ev_path, ev), row in zip(all_events, first_rows, strict=True):
        if s not in sessions:
            continue
        keep = ev["trial_type"] != "catch"
        bad = keep & ~np.isclose(values_by_row[row:row + len(keep)], ev["value"])
        if bad.any():
            mismatches += int(bad.sum())
            log.warning("%s: things_image_nr differs from events.tsv value on %d exp/test row(s) of %s "
                        "(the events.tsv value is used)", attr_path.name, int(bad.sum()), ev_path.name)
        # the aligned row's image when it agrees with events.tsv, else the row listing this number,
        # else (a number the attributes never list) the aligned row's image
        paths[(s, r)] = [attr["image_path"][row + i] if not bad[i] else
                         by_number.get(int(ev["value"][i]), attr["image_path"][row + i])
                         for i in np.flatnonzero(keep)]
        plans.append(RunPlan(s, r, p, ev_path, ev, row))
    keep_cols = [(rp, rp.keep) for rp in plans]
    run_index = {s: sorted(r for s2, r, _ in runs if s2 == s) for s in sessions}
    return SubjectPlan(
        label=label, runs=plans,
        trial_id=np.concatenate([rp.first_row + np.flatnonzero(k) for rp, k in keep_cols]).astype(np.int64),
        value=np.concatenate([rp.events["value"][k] for rp, k in keep_cols]).astype(np.int64),
        category=np.concatenate([rp.events["things_category_nr"][k] for rp, k in keep_cols]).astype(np.int64),
        trial_type=np.concatenate([rp.events["trial_type"][k] for rp, k in keep_cols]),
        session=np.concatenate([np.full(k.sum(), rp.session - 1) for rp, k in keep_cols]).astype(np.int64),
        run=np.concatenate([np.full(k.sum(), run_index[rp.session].index(rp.run)) for rp, k in keep_cols]
                           ).astype(np.int64),
        image_path=[ip for rp in plans for ip in paths[(rp.session, rp.run)]],
        attributes_path=attr_path, n_catch=int(sum((~k).sum() for _, k in keep_cols)),
        n_attribute_mismatches=mismatches,
    )


def _metadata_columns(metadata: Any, path: Path) -> dict[str, list[Any]]:
    """Epochs metadata (a DataFrame with pandas, a list of records without) -> columns."""
    if metadata is None:
        return {}
    if hasattr(metadata, "to_dict"):
        return {str(k): list(v) for k, v in metadata.to_dict(orient="list").items()}
    if isinstance(metadata, list):
        keys = list(metadata[0]) if metadata else []
        return {k: [rec.get(k) for rec in metadata] for k in keys}
    raise ThingsMEGInputError(f"{path}: unreadable epochs metadata of type {type(metadata).__name__}")


def _plan_hebart_subject(cfg: ThingsMEGConvertConfig, root: Path, label: str) -> SubjectPlan:
    import mne

    n = participant_number(label)
    path = root / f"derivatives/preprocessed/preprocessed_P{n}-epo.fif"
    if not path.exists():
        raise ThingsMEGInputError(f"{path}: missing file (Hebart's preprocessed epochs; dataset.input=hebart_epochs)")
    epochs = mne.read_epochs(path, preload=False, verbose="error")
    attr_path = root / f"sourcedata/sample_attributes_P{n}.csv"
    meta = _metadata_columns(epochs.metadata, path)
    if not meta:  # no metadata in the file: the sample attributes are its rows (docs/datasets/things_meg.md)
        meta = read_sample_attributes(attr_path)
        src = attr_path
    else:
        src = path
    n_epochs = len(epochs)
    need = ("trial_type", "things_image_nr", "session_nr", "image_path")
    missing = [c for c in need if c not in meta]
    if missing:
        raise ThingsMEGInputError(f"{src}: metadata column(s) {missing} missing; columns are {sorted(meta)}")
    if len(meta["trial_type"]) != n_epochs:
        raise ThingsMEGInputError(f"{src}: {len(meta['trial_type'])} metadata rows for {n_epochs} epochs in {path}")
    tt = np.asarray([str(v).strip() for v in meta["trial_type"]])
    session = _int_column(meta["session_nr"], "session_nr", src)
    run_col = _int_column(meta["run_nr"], "run_nr", src) if "run_nr" in meta else np.ones(n_epochs, np.int64)

    def num(v: Any) -> float:
        return math.nan if v is None else _float(v) if isinstance(v, str) else float(v)

    value = np.asarray([num(v) for v in meta["things_image_nr"]])
    cat_key = "category_nr" if "category_nr" in meta else None
    concepts = [image_stem_and_concept(str(p))[1] for p in meta["image_path"]]
    if cat_key:
        category = np.asarray([num(v) for v in meta[cat_key]])
    else:  # concept names stand in for concept numbers
        number = {c: i + 1 for i, c in enumerate(sorted(set(concepts)))}
        category = np.asarray([number[c] for c in concepts], dtype=np.float64)
    sessions = _selected_sessions(cfg, sorted(set(session.tolist())), label)
    keep = (tt != "catch") & np.isin(session, sessions)
    if np.isnan(value[keep]).any() or np.isnan(category[keep]).any():
        raise ThingsMEGInputError(f"{src}: things_image_nr/category_nr missing on an exp/test row")
    rows = np.flatnonzero(keep)
    run0 = np.zeros(len(rows), dtype=np.int64)
    for s in sessions:
        in_s = session[rows] == s
        uniq = sorted(set(run_col[rows][in_s].tolist()))
        run0[in_s] = np.searchsorted(uniq, run_col[rows][in_s])
    return SubjectPlan(
        label=label, runs=[], trial_id=rows.astype(np.int64), value=value[rows].astype(np.int64),
        category=category[rows].astype(np.int64), trial_type=tt[rows], session=(session[rows] - 1).astype(np.int64),
        run=run0, image_path=[str(meta["image_path"][i]) for i in rows], attributes_path=src,
        n_catch=int(((tt == "catch") & np.isin(session, sessions)).sum()),
        n_attribute_mismatches=0, epochs_path=path, hebart_rows=rows, hebart_session_of_row=session,
    )


@dataclass
class ImageTable:
    values: np.ndarray  # (n_images,) sorted THINGS image numbers
    stems: list[str]
    concepts: list[str]
    files: list[Path]


def _plan_images(cfg: ThingsMEGConvertConfig, plans: list[SubjectPlan], images_root: Path) -> ImageTable:
    """The union of the converted trials' images, sorted by THINGS image number; every file must exist."""
    values = np.unique(np.concatenate([p.value for p in plans]))
    maps: dict[int, str] = {}
    sources: dict[int, Path] = {}
    for p in plans:
        for v, ip in zip(p.value.tolist(), p.image_path, strict=True):
            if image_stem_and_concept(maps.setdefault(v, ip))[0] != image_stem_and_concept(ip)[0]:
                raise ThingsMEGInputError(f"{p.attributes_path}: THINGS image {v} has image_path {ip!r}, but "
                                          f"{maps[v]!r} in {sources[v]}")
            sources.setdefault(v, p.attributes_path)
    stems, concepts, files = [], [], []
    for v in values.tolist():
        stem, concept = image_stem_and_concept(maps[v])
        f = images_root / concept / f"{stem}.jpg"
        if not f.exists():
            raise ThingsMEGInputError(f"{f}: missing image file for THINGS image {v} ({maps[v]}); dataset.images_root "
                                      "must hold the THINGS images as <concept>/<stem>.jpg")
        stems.append(stem)
        concepts.append(concept)
        files.append(f)
    return ImageTable(values, stems, concepts, files)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def load_image(path: Path, size: int) -> np.ndarray:
    """A THINGS JPEG -> uint8 ``(size, size, 3)``: RGB, centre-cropped to a square (THINGS images are
    square already), resized once with PIL bicubic."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _check_images(table: ImageTable) -> None:
    """Every image file opens as an image (PIL reads the header only; pixels are decoded while writing)."""
    from PIL import Image, UnidentifiedImageError

    for f in table.files:
        try:
            with Image.open(f):
                pass
        except (OSError, UnidentifiedImageError) as e:
            raise ThingsMEGInputError(f"{f}: cannot be read as an image ({e}); dataset.images_root") from None


def _write_images(writer: StoreWriter, table: ImageTable, cfg: ThingsMEGConvertConfig) -> None:
    size = int(cfg.image_size)
    stream = writer.open_images(len(table.values), size, size)
    with _progress(len(table.files), "images", cfg.progress, "img") as bar:
        for start in range(0, len(table.files), cfg.image_chunk):
            chunk = table.files[start:start + cfg.image_chunk]
            block = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
            for j, f in enumerate(chunk):
                try:
                    block[j] = load_image(f, size)
                except OSError as e:
                    raise ThingsMEGInputError(f"{f}: cannot be read as an image ({e}); dataset.images_root") from None
            stream.append(block)
            bar.update(len(chunk))
    captions = [cfg.caption_template.format(concept=c.replace("_", " ")) for c in table.concepts]
    stream.close(ids=list(table.stems), captions=captions, source_ids=[int(v) for v in table.values])


@dataclass
class RunResult:
    epochs: np.ndarray  # (n_kept, C, T) float32, scaled and clamped
    names: list[str]  # raw channel names in stored order
    layout: str
    n_clamped: int
    trigger_lag_ms: float | None


def open_run(path: Path, preload: bool = False) -> Any:
    """A run's recording: CTF ``.ds`` through :func:`mne.io.read_raw_ctf` (the release), FIF through
    :func:`mne.io.read_raw_fif` (the fixtures). An unreadable file is an error naming it."""
    import mne

    path = Path(path)
    ctf = path.suffix == ".ds"
    try:
        if ctf:
            return mne.io.read_raw_ctf(path, preload=preload, verbose="error")
        return mne.io.read_raw_fif(path, preload=preload, verbose="error")
    except (OSError, ValueError) as e:
        raise ThingsMEGInputError(f"{path}: cannot be read as a {'CTF (.ds folder)' if ctf else 'FIF'} "
                                  f"recording ({e})") from None


def _check_sidecars(raw: Any, names: list[str], rp: RunPlan) -> None:
    """The recording must be the one its sidecars describe: meg.json's rate, channels.tsv's MEG sensors."""
    sc = rp.sidecars
    if sc is None:
        return
    sf = float(raw.info["sfreq"])
    if sc.sfreq is not None and not math.isclose(sc.sfreq, sf, rel_tol=1e-6):
        raise ThingsMEGInputError(f"{rp.path}: recorded at {sf:g} Hz, but {sc.meg_json_path.name} says "
                                  f"SamplingFrequency {sc.sfreq:g}")
    if sc.meg_names is not None and set(sc.meg_names) != set(names):
        extra, absent = sorted(set(names) - set(sc.meg_names)), sorted(set(sc.meg_names) - set(names))
        raise ThingsMEGInputError(f"{rp.path}: its {len(names)} MEG channels differ from the {len(sc.meg_names)} "
                                  f"MEG sensors of {sc.channels_path.name} (only in the recording: {extra[:5]}; only "
                                  f"in channels.tsv: {absent[:5]})")


def _check_layout(info: Any, names: list[str], where: Path) -> str:
    """``mne.find_layout`` must answer CTF-275 for CTF gradiometers, and every channel needs a position."""
    import mne
    from mne.io.constants import FIFF

    # a compensated CTF recording (grade g) codes its coils as CTF_GRAD + (g << 16)
    ctf = all(int(ch["coil_type"]) & 0xFFFF == FIFF.FIFFV_COIL_CTF_GRAD for ch in info["chs"])
    layout = mne.channels.find_layout(info)
    kind = str(layout.kind)
    if ctf and kind != CTF_LAYOUT:
        raise ThingsMEGInputError(f"{where}: mne.find_layout gives {kind!r} for CTF gradiometers, expected {CTF_LAYOUT}")
    pos = sensor_positions(names)
    missing = [n for n, ok in zip(names, valid_positions(pos), strict=True) if not ok]
    if missing:
        raise ThingsMEGInputError(f"{where}: channel(s) {missing[:5]}{'...' if len(missing) > 5 else ''} have no "
                                  f"{CTF_LAYOUT} position (layout found: {kind})")
    return kind


def _scale(epochs: np.ndarray, times: np.ndarray, cfg: ThingsMEGConvertConfig, fit_rows: np.ndarray,
           keep_rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Baseline-correct ``(n, C, T)``, fit the robust scaling on ``fit_rows``, return the scaled and
    clamped ``keep_rows`` (float32) and how many values the clamp changed."""
    if cfg.baseline is not None:
        lo = None if cfg.baseline[0] is None else float(cfg.baseline[0])
        epochs = baseline_correct(epochs, times, (lo, float(cfg.baseline[1])))
    scaler = RobustScaling.fit(epochs[fit_rows])
    scaled = scaler.apply(epochs[keep_rows], clamp=None)
    n_clamped = 0
    if cfg.clamp is not None:
        n_clamped = int(np.count_nonzero(np.abs(scaled) > float(cfg.clamp)))
        np.clip(scaled, -float(cfg.clamp), float(cfg.clamp), out=scaled)
    return scaled, n_clamped


def _window(sfreq: float, tmin: float, tmax: float) -> tuple[int, int, np.ndarray]:
    """First-sample offset, number of samples and times of the epoch window on the ``sfreq`` grid."""
    i0 = int(round(tmin * sfreq))
    n = int(round(tmax * sfreq)) - i0 + 1
    return i0, n, (i0 + np.arange(n)) / sfreq


def _process_run(rp: RunPlan, cfg: ThingsMEGConvertConfig) -> RunResult:
    """One raw run -> its kept (non-catch) epochs ``(n_kept, 272, T)``, scaled per run."""
    import mne

    raw = open_run(rp.path)
    sf0 = float(raw.info["sfreq"])
    n_events = len(rp.events["trial_type"])
    triggers = None
    if TRIGGER_CHANNEL in raw.ch_names:
        found = mne.find_events(raw, stim_channel=TRIGGER_CHANNEL, shortest_event=1, verbose="error")
        triggers = (found[:, 0] - raw.first_samp) / sf0
        if cfg.onset_source == "trigger" and len(found) != n_events + 1:
            raise ThingsMEGInputError(
                f"{rp.path}: {len(found)} {TRIGGER_CHANNEL} triggers, expected {n_events + 1} ({n_events} images "
                f"in {rp.events_path.name} + one final {TRIGGER_END}); use dataset.onset_source=events_tsv")
        odd = int(np.count_nonzero(found[:-1, 2] != TRIGGER_IMAGE)) if len(found) == n_events + 1 else 0
        if cfg.onset_source == "trigger" and odd:
            log.warning("%s: %d of the %d image triggers have a value other than %d", rp.path.name, odd, n_events,
                        TRIGGER_IMAGE)
    elif cfg.onset_source == "trigger":
        raise ThingsMEGInputError(f"{rp.path}: no {TRIGGER_CHANNEL} channel (dataset.onset_source=trigger)")
    sample = rp.events["sample"]
    tsv_onsets = np.where(sample >= 0, sample / sf0, rp.events["onset"])
    if np.isnan(tsv_onsets).any():
        raise ThingsMEGInputError(f"{rp.events_path}: sample/onset missing on some row")
    lag = None
    if triggers is not None and len(triggers) == n_events + 1:
        lag = float(np.median(triggers[:-1] - tsv_onsets) * 1000.0)
    onsets = triggers[:-1] if cfg.onset_source == "trigger" else tsv_onsets

    raw.pick("mag")
    names = list(raw.ch_names)
    _check_sidecars(raw, names, rp)
    layout = _check_layout(raw.info, names, rp.path)
    raw.load_data(verbose="error")
    if cfg.l_freq is not None or cfg.h_freq is not None:
        raw.filter(cfg.l_freq, cfg.h_freq, verbose="error")
    if float(cfg.sfreq) != sf0:
        raw.resample(float(cfg.sfreq), method=cfg.resample_method, verbose="error")
    sf = float(raw.info["sfreq"])
    data = raw.get_data()  # (C, N) float64, T
    del raw
    i0, n_t, times = _window(sf, cfg.tmin, cfg.tmax)
    starts = np.round(onsets * sf).astype(np.int64) + i0
    if starts.min() < 0 or starts.max() + n_t > data.shape[1]:
        bad = int(np.flatnonzero((starts < 0) | (starts + n_t > data.shape[1]))[0])
        raise ThingsMEGInputError(f"{rp.path}: the {cfg.tmin}..{cfg.tmax} s window of event row {bad + 2} of "
                                  f"{rp.events_path.name} (onset {onsets[bad]:.3f} s) runs outside the recording "
                                  f"({data.shape[1] / sf:.1f} s)")
    epochs = np.moveaxis(data[:, starts[:, None] + np.arange(n_t)], 1, 0)  # (n_events, C, T)
    del data
    all_rows = np.arange(n_events)
    scaled, n_clamped = _scale(epochs, times, cfg, all_rows, np.flatnonzero(rp.keep))
    return RunResult(scaled, names, layout, n_clamped, lag)


def _split(plan: SubjectPlan, test_concepts: set[int], cfg: ThingsMEGConvertConfig) -> np.ndarray:
    is_test = plan.trial_type == "test"
    large = (plan.trial_type == "exp") & np.isin(plan.category, sorted(test_concepts))
    if cfg.split == "original":
        large[:] = False
    val = ~is_test & ~large & is_val_image(plan.value, cfg.val_fraction, cfg.val_seed)
    return np.where(is_test, "test", np.where(large, "test_large", np.where(val, "val", "train"))).astype(str)


def _repeat(values: np.ndarray) -> np.ndarray:
    rep = np.zeros(len(values), dtype=np.int64)
    seen: dict[int, int] = {}
    for t, v in enumerate(values.tolist()):
        rep[t] = seen.get(v, 0)
        seen[v] = rep[t] + 1
    return rep


def _convert_raw_subject(writer: StoreWriter, plan: SubjectPlan, cfg: ThingsMEGConvertConfig
                         ) -> tuple[list[str], str, dict[str, Any]]:
    n_trials = len(plan.value)
    _, n_t, _ = _window(float(cfg.sfreq), cfg.tmin, cfg.tmax)
    resp = None
    names: list[str] | None = None
    layout = ""
    offset, clamped, per_run = 0, 0, []
    with _progress(len(plan.runs), f"sub-{plan.label} runs", cfg.progress, "run") as bar:
        for rp in plan.runs:
            res = _process_run(rp, cfg)
            if names is None:
                names, layout = res.names, res.layout
                resp = writer.open_responses(plan.label, (n_trials, len(names), n_t), cfg.dtype)
            elif res.names != names:
                raise ThingsMEGInputError(f"{rp.path}: MEG channels differ from {plan.runs[0].path.name}'s "
                                          f"({len(res.names)} vs {len(names)} channels or another order)")
            k = len(res.epochs)
            assert resp is not None
            resp[offset:offset + k] = res.epochs.astype(cfg.dtype)
            offset += k
            clamped += res.n_clamped
            tt = rp.events["trial_type"]
            per_run.append({"session": rp.session, "run": rp.run, "file": rp.path.name, "n_trials": k,
                            "n_events": int(len(tt)), "n_test": int((tt == "test").sum()),
                            "n_catch_dropped": int((~rp.keep).sum()),
                            "clamp_fraction": res.n_clamped / max(res.epochs.size, 1),
                            "trigger_minus_events_tsv_ms": res.trigger_lag_ms})
            bar.set_postfix_str(f"ses-{rp.session:02d} run-{rp.run:02d}")
            bar.update(1)
    assert resp is not None and names is not None and offset == n_trials
    resp.flush()
    del resp
    return names, layout, {"runs": per_run, "n_clamped": clamped, "n_values": n_trials * len(names) * n_t,
                           "n_runs": len(plan.runs)}


def _hebart_chunks(rows: np.ndarray, size: int = 256) -> Iterator[np.ndarray]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def _convert_hebart_subject(writer: StoreWriter, plan: SubjectPlan, cfg: ThingsMEGConvertConfig
                            ) -> tuple[list[str], str, dict[str, Any]]:
    """Derivative epochs -> resampled, baseline-corrected, robust-scaled per session. Memory: one
    session of resampled epochs (~0.4 GB float32 for 2,254 x 271 x 169)."""
    import mne

    assert plan.epochs_path is not None and plan.hebart_rows is not None and plan.hebart_session_of_row is not None
    epochs = mne.read_epochs(plan.epochs_path, preload=False, verbose="error")
    picks = mne.pick_types(epochs.info, meg="mag", ref_meg=False)
    names = [epochs.ch_names[i] for i in picks]
    layout = _check_layout(mne.pick_info(epochs.info, picks), names, plan.epochs_path)
    sf0 = float(epochs.info["sfreq"])
    n_trials = len(plan.hebart_rows)
    resp = None
    offset, clamped, per_session = 0, 0, []
    session_of_row = plan.hebart_session_of_row
    sessions = sorted(set((plan.session + 1).tolist()))
    with _progress(len(sessions), f"sub-{plan.label} sessions", cfg.progress, "session") as bar:
        for s in sessions:
            rows = np.flatnonzero(session_of_row == s)  # every epoch of the session (catch included): fit
            parts, times = [], None
            for chunk in _hebart_chunks(rows):
                ep = epochs[chunk]
                ep.load_data()
                if float(cfg.sfreq) != sf0:
                    ep.resample(float(cfg.sfreq), method=cfg.resample_method, verbose="error")
                parts.append(ep.get_data(picks=picks).astype(np.float32))
                times = ep.times
            assert times is not None
            x = np.concatenate(parts)
            keep = np.flatnonzero(np.isin(rows, plan.hebart_rows))
            scaled, n_c = _scale(x, times, cfg, np.arange(len(rows)), keep)
            del x, parts
            if resp is None:
                resp = writer.open_responses(plan.label, (n_trials, len(names), scaled.shape[-1]), cfg.dtype)
            resp[offset:offset + len(keep)] = scaled.astype(cfg.dtype)
            offset += len(keep)
            clamped += n_c
            per_session.append({"session": s, "n_trials": int(len(keep)), "clamp_fraction": n_c / max(scaled.size, 1)})
            bar.update(1)
    assert resp is not None and offset == n_trials
    n_t = resp.shape[-1]
    resp.flush()
    del resp
    return names, layout, {"sessions": per_session, "n_clamped": clamped, "n_values": n_trials * len(names) * n_t,
                           "n_runs": int(len(set(zip(plan.session.tolist(), plan.run.tolist(), strict=True)))),
                           "tmin": float(times[0]), "tmax": float(times[-1]), "n_times": int(n_t)}


def _convert_subject(writer: StoreWriter, plan: SubjectPlan, cfg: ThingsMEGConvertConfig, images: ImageTable,
                     test_concepts: set[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.input == "raw":
        names, layout, info = _convert_raw_subject(writer, plan, cfg)
        tmin = _window(float(cfg.sfreq), cfg.tmin, cfg.tmax)[2][0]
    else:
        names, layout, info = _convert_hebart_subject(writer, plan, cfg)
        tmin = info["tmin"]
    split = _split(plan, test_concepts, cfg)
    trials = TrialTable(trial_id=plan.trial_id, image_index=np.searchsorted(images.values, plan.value).astype(np.int64),
                        session=plan.session, run=plan.run, repeat=_repeat(plan.value), split=split)
    clean = [clean_channel_name(n) for n in names]
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test", "test_large")}
    stats = {
        "n_trials": int(len(split)), "n_channels": len(names), "split_counts": counts,
        "n_catch_dropped": plan.n_catch, "n_runs": info.pop("n_runs"),
        "sessions": sorted({int(s) + 1 for s in plan.session.tolist()}),
        "n_test_images": int(len(np.unique(plan.value[split == "test"]))),
        "clamp": cfg.clamp, "clamp_fraction": info.pop("n_clamped") / max(info.pop("n_values"), 1),
        "layout": layout, "onset_source": cfg.onset_source if cfg.input == "raw" else "hebart derivative",
        "input": cfg.input, "attribute_mismatches": plan.n_attribute_mismatches,
        "seconds": round(time.perf_counter() - t0, 2), **info,
    }
    writer.write_subject(plan.label, trials, sensor_names=clean, sensor_positions=sensor_positions(clean),
                         sfreq=float(cfg.sfreq), tmin=float(tmin), statistics=stats)
    return stats


@dataclass
class ThingsMEGPlan:
    """Everything the write phase needs, read and checked by the plan phase."""

    subjects: list[SubjectPlan]
    images: ImageTable
    test_concepts: set[int]


class ThingsMEGConverter(Converter[ThingsMEGPlan]):
    """THINGS-MEG (BIDS) -> prepared store, in the base's phases (braindecode_fw/data/convert/base.py)."""

    kind = "things_meg"
    title = "THINGS-MEG"
    modality = "meg"
    config_class = ThingsMEGConvertConfig
    provenance_match = {"source": "things_meg"}

    cfg: ThingsMEGConvertConfig

    def locate(self) -> None:
        cfg = self.cfg
        if not cfg.store:
            raise DataError("dataset.store: not set (where the prepared THINGS-MEG store is written)")
        if not cfg.root:
            raise DataError("dataset.root: not set; pass the BIDS folder of OpenNeuro ds004212, e.g. "
                             "`bdf-prepare dataset=things_meg dataset.root=/data/ds004212 "
                             "dataset.images_root=/data/THINGS/Images`")
        if not cfg.images_root:
            raise DataError("dataset.images_root: not set; pass the THINGS image folder (<concept>/<stem>.jpg), "
                             "e.g. dataset.images_root=/data/THINGS/Images")
        self.root, self.images_root = Path(cfg.root), Path(cfg.images_root)
        if not self.root.is_dir():
            raise ThingsMEGInputError(f"{self.root}: dataset.root does not exist or is not a folder")
        if not self.images_root.is_dir():
            raise ThingsMEGInputError(f"{self.images_root}: dataset.images_root does not exist or is not a folder")

    def fingerprint(self) -> str:
        return self.cfg.fingerprint()

    def plan(self) -> ThingsMEGPlan:
        cfg, root = self.cfg, self.root
        available = discover_subjects(root)
        labels = cfg.subjects if cfg.subjects is not None else available
        if not labels:
            raise ThingsMEGInputError(f"{root}: no subject with runs found (participants.tsv / sub-*/ses-*/meg/)")
        for s in labels:
            if not (root / f"sub-{s}").is_dir():
                raise ThingsMEGInputError(f"{root / f'sub-{s}'}: missing subject folder (dataset.subjects: {labels}; "
                                          f"found {available})")
        plan_fn = _plan_raw_subject if cfg.input == "raw" else _plan_hebart_subject
        plans = []
        for s in labels:
            p = plan_fn(cfg, root, s)
            what = (f"{len(p.runs)} run(s) found, events.tsv columns and values" if cfg.input == "raw"
                    else f"{p.epochs_path.name} epochs and their metadata")
            self.check(f"sub-{s}: {what}; {p.attributes_path.name} aligned with the trials "
                       f"({len(p.value)} image trials, {p.n_catch} catch dropped)")
            if p.n_attribute_mismatches:  # logged per run by _plan_raw_subject; listed once in the report
                self.warnings.append(f"sub-{s}: {p.n_attribute_mismatches} exp/test row(s) whose things_image_nr differs "
                          f"from events.tsv value (the events.tsv value is used)")
            if cfg.input == "raw":
                self._check_run_sidecars(p)
            self._check_trials(p, root)
            plans.append(p)
        images = _plan_images(cfg, plans, self.images_root)
        self.check(f"{len(images.files)} THINGS image files exist under dataset.images_root, one image_path per "
                   f"THINGS image number")
        test_concepts = {int(c) for p in plans for c in p.category[p.trial_type == "test"].tolist()}
        return ThingsMEGPlan(plans, images, test_concepts)

    def _check_run_sidecars(self, p: SubjectPlan) -> None:
        """Read each converted run's channels.tsv / meg.json / coordsystem.json (the recording is
        compared with them when it is read) and report what they say, quirks included."""
        tag = f"sub-{p.label}"
        for rp in p.runs:
            rp.sidecars = read_run_sidecars(rp.path)
        scs = [rp.sidecars for rp in p.runs if rp.sidecars is not None]
        n = len(scs)
        with_names = [sc for sc in scs if sc.meg_names is not None]
        if with_names:
            counts = sorted({len(sc.meg_names or []) for sc in with_names})
            other = sum(sc.n_typed_other > 0 for sc in with_names)
            bad = [sc.meg_json_path.name for sc in with_names
                   if sc.meg_channel_count is not None and sc.meg_channel_count != len(sc.meg_names or [])]
            if bad:
                self.warn(f"{tag}: the MEG sensors of channels.tsv are not meg.json's MEGChannelCount in {bad[:3]}"
                          f"{'...' if len(bad) > 3 else ''} ({len(bad)} run(s))")
            self.check(f"{tag}: channels.tsv of {len(with_names)}/{n} runs list {'/'.join(map(str, counts))} MEG "
                       f"sensors" + (f" (typed OTHER in {other} run(s): recognised by their CTF sensor names)"
                                     if other else "") + "; each recording's MEG channels must be these")
        missing = [sc.channels_path.name for sc in scs if sc.meg_names is None]
        if missing:
            self.skip_check(f"{tag}: no channels.tsv for {len(missing)} run(s) ({missing[0]}...): their channel "
                            f"names are not compared with a sidecar")
        rates = sorted({sc.sfreq for sc in scs if sc.sfreq is not None})
        if rates:
            self.check(f"{tag}: meg.json SamplingFrequency {'/'.join(f'{r:g}' for r in rates)} Hz in "
                       f"{sum(sc.sfreq is not None for sc in scs)}/{n} runs; each recording's rate must match")
        if any(sc.sfreq is None for sc in scs):
            self.skip_check(f"{tag}: {sum(sc.sfreq is None for sc in scs)} run(s) without a meg.json "
                            f"SamplingFrequency: their rate is not compared with a sidecar")
        coords = [sc for sc in scs if sc.coord_units is not None]
        note = f"{tag}: coordsystem.json not used (sensor positions come from MNE's {CTF_LAYOUT} layout); " \
               f"{len(coords)}/{n} runs have one"
        absent = [sc.coordsystem_path.name for sc in scs if sc.coord_units is None]
        if absent:
            note += f" (missing: {', '.join(absent[:3])}{'...' if len(absent) > 3 else ''})"
        metre_like = [sc for sc in coords if str(sc.coord_units).lower() == "cm" and sc.coord_max_abs is not None
                      and sc.coord_max_abs < 1.0]
        if metre_like:
            top = max(sc.coord_max_abs or 0.0 for sc in metre_like)
            note += (f"; {len(metre_like)} say units 'cm' with head-coil coordinates of at most {top:.3f} "
                     f"(metres, not cm)")
        self.skip_check(note)

    def _check_trials(self, p: SubjectPlan, root: Path) -> None:
        """What the events say, checked and reported: trials per run, catch trials, test images and
        their repetitions, exp images shown once, THINGS concept numbers within the category table
        and one concept per image."""
        tag = f"sub-{p.label}"
        if p.runs:
            # the sample column (the converter's onsets) against onset x the rate (meg.json, else 1200 Hz)
            n_rows, off = 0, []
            for rp in p.runs:
                ev = rp.events
                rate = rp.sidecars.sfreq if rp.sidecars is not None and rp.sidecars.sfreq else 1200.0
                has = (ev["sample"] >= 0) & np.isfinite(ev["onset"])
                n_rows += int(has.sum())
                if (np.abs(ev["sample"][has] - ev["onset"][has] * rate) > 1.0).any():
                    off.append(rp.events_path.name)
            if off:
                self.warn(f"{tag}: events.tsv sample differs from onset x the sampling rate by more than one sample "
                          f"in {len(off)} run(s) ({off[0]}...); the sample column is used")
            elif n_rows:
                self.check(f"{tag}: events.tsv sample = onset x the sampling rate on all {n_rows} rows")
            per_run: dict[tuple[int, int, int], int] = {}
            for rp in p.runs:
                tt = rp.events["trial_type"]
                key = (int(len(tt)), int((tt == "test").sum()), int((tt == "catch").sum()))
                per_run[key] = per_run.get(key, 0) + 1
            self.check(f"{tag}: events per run: " + ", ".join(
                f"{k} run(s) of {n} ({t} test, {c} catch)" for (n, t, c), k in sorted(per_run.items())))
        self.check(f"{tag}: {p.n_catch} catch trial(s) (N/A THINGS numbers) dropped")
        test_v = p.value[p.trial_type == "test"]
        exp_v = p.value[p.trial_type == "exp"]
        reps = np.unique(np.unique(test_v, return_counts=True)[1], return_counts=True)
        self.check(f"{tag}: {len(np.unique(test_v))} test image(s), " + ", ".join(
            f"{k} shown {r}x" for r, k in zip(reps[0].tolist(), reps[1].tolist(), strict=True)) +
            f" over {len(np.unique(p.session))} session(s)")
        exp_u, exp_n = np.unique(exp_v, return_counts=True)
        self.check(f"{tag}: {len(exp_u)} exp image(s), {int((exp_n == 1).sum())} shown once")
        both = np.intersect1d(exp_u, test_v)
        if len(both):
            self.warn(f"{tag}: {len(both)} THINGS image number(s) are both exp and test trials (e.g. {int(both[0])})")
        if len(exp_u) and (exp_n > 1).any():
            self.warn(f"{tag}: {int((exp_n > 1).sum())} exp image(s) shown more than once (e.g. "
                      f"{int(exp_u[exp_n > 1][0])})")
        order = np.argsort(p.value, kind="stable")
        v, c = p.value[order], p.category[order]
        clash = np.flatnonzero((v[1:] == v[:-1]) & (c[1:] != c[:-1]))
        if len(clash):
            i = int(clash[0])
            raise ThingsMEGInputError(f"{tag}: THINGS image {int(v[i])} has things_category_nr {int(c[i])} in one trial "
                                      f"and {int(c[i + 1])} in another (events.tsv of the converted runs)")
        table = root / CATEGORY_TABLE
        if not table.exists():
            self.skip_check(f"{tag}: no {CATEGORY_TABLE}: THINGS concept numbers not checked against it")
            return
        n_concepts = read_category_table(table)
        out = (p.category < 1) | (p.category > n_concepts)
        if out.any():
            raise ThingsMEGInputError(f"{tag}: things_category_nr {int(p.category[out][0])} is outside 1..{n_concepts}, "
                                      f"the rows of {table}")
        self.check(f"{tag}: the {len(np.unique(p.value))} image(s) have one THINGS concept each, "
                   f"{len(np.unique(p.category))} concept(s) within the {n_concepts} rows of {CATEGORY_TABLE}")

    def validate(self, plan: ThingsMEGPlan) -> None:
        _check_images(plan.images)
        self.check(f"{len(plan.images.files)} THINGS image files open as images")

    def write(self, writer: StoreWriter, plan: ThingsMEGPlan) -> Written:
        cfg, root, images_root = self.cfg, self.root, self.images_root
        plans, images, test_concepts = plan.subjects, plan.images, plan.test_concepts
        _, n_t, times = _window(float(cfg.sfreq), cfg.tmin, cfg.tmax)
        _write_images(writer, images, cfg)
        writer.write_extra("things_images", {
            "things_image_nr": [int(v) for v in images.values], "stem": images.stems, "concept": images.concepts,
            "test_concepts": sorted(test_concepts)})
        subjects = {p.label: _convert_subject(writer, p, cfg, images, test_concepts) for p in plans}
        if cfg.input == "raw":
            window = {"tmin": float(times[0]), "tmax": float(times[-1]), "n_times": int(n_t)}
        else:
            st = next(iter(subjects.values()))
            window = {"tmin": st["tmin"], "tmax": st["tmax"], "n_times": st["n_times"],
                      "source": "the Hebart derivative's epochs"}
        fingerprint = cfg.fingerprint()
        provenance = {
            "source": "things_meg",
            "converter": CONVERTER_VERSION,
            "config": cfg.content(),
            "config_fingerprint": fingerprint,
            "root": str(root),
            "images_root": str(images_root),
            "input": cfg.input,
            "onset_source": (cfg.onset_source if cfg.input == "raw"
                             else "Hebart derivative (events.tsv sample, photodiode)"),
            "sfreq": float(cfg.sfreq),
            "window": window,
            "resample": f"mne {cfg.resample_method} resampling of the continuous run before epoching"
                        if cfg.input == "raw" else f"mne {cfg.resample_method} resampling of the epochs",
            "band_pass": [cfg.l_freq, cfg.h_freq] if cfg.input == "raw" else "0.1-40 Hz (Hebart derivative)",
            "baseline": cfg.baseline,
            "scaling": ("robust per channel (median, IQR = q75 - q25) fitted per recording = run on all its "
                        "image epochs (catch included)" if cfg.input == "raw" else
                        "robust per channel (median, IQR) fitted per session on all its epochs"),
            "clamp": cfg.clamp,
            "zscore_at_load": False,
            "normalisation": "robust-scaled and clamped by the converter; the datamodule must not z-score again",
            "split": cfg.split,
            "split_rule": ("test: trial_type test; test_large: exp trials of the test concepts "
                           "(things_category_nr of the test images); train: other exp; val: train images with "
                           "splitmix64(THINGS image number, val_seed) < val_fraction" if cfg.split == "benchetrit"
                           else "original (Hebart): test: trial_type test; train: all exp; val as benchetrit"),
            "val": {"fraction": cfg.val_fraction, "seed": cfg.val_seed, "rule": "hash of THINGS image number"},
            "subjects": [p.label for p in plans],
            "subject_index": {p.label: i for i, p in enumerate(plans)},
            "sessions": {p.label: sorted({int(s) + 1 for s in p.session.tolist()}) for p in plans},
            "trial_id": "row of the trial in the subject's acquisition order over all its runs (catch included) "
                        "= row of sample_attributes_P{n}.csv = epoch index of the Hebart derivative",
            "run": "0-based within the session (BIDS run-NN - 1 when all runs are present)",
            "repeat": "0-based presentation count of the image among the subject's converted trials",
            "images": {"ids": "THINGS file stems", "source_ids": "THINGS image numbers (events.tsv value)",
                       "captions": cfg.caption_template + " with underscores as spaces",
                       "resize": f"PIL bicubic to {cfg.image_size} px (centre square crop first)"},
            "channels": "MEG sensors (picks mag), names without the -1609 suffix, positions of MNE's CTF-275 "
                        "layout min-max normalised to [0, 1]",
        }
        return Written(provenance, subjects, {"input": cfg.input, "onset_source": provenance["onset_source"],
                                              "split": cfg.split, "window": window})

    def table(self, summary: dict[str, Any]) -> list[str]:
        lines = ["subject   runs  trials  channels  train/val/test/test_large  catch dropped  clamped %  layout"]
        for tag, st in summary["subjects"].items():
            c = st["split_counts"]
            lines.append(f"{tag:<9} {st['n_runs']:>4}  {st['n_trials']:>6}  {st['n_channels']:>8}  "
                         f"{c['train']}/{c['val']}/{c['test']}/{c['test_large']:<12} {st['n_catch_dropped']:>13}  "
                         f"{100 * st['clamp_fraction']:>9.4f}  {st['layout']}")
        lines.append(f"{summary['n_images']} images at {summary['image_size']} px; input {summary['extras']['input']}; "
                     f"converted in {summary['seconds']:.1f} s")
        # what the events and sidecars said (trial counts, catch, test repetitions, concepts, channels, rate)
        lines += [f"checked: {c}" for c in summary["checked"] if c.startswith("sub-")]
        lines += [f"not checked: {c}" for c in summary["not_checked"]]
        return lines


def convert_things_meg(dataset_cfg: Any) -> dict[str, Any]:
    """Convert THINGS-MEG (``dataset.root``, BIDS) into the prepared store at ``dataset.store``.

    Returns the converter summary (braindecode_fw/data/convert/base.py ``REPORT_KEYS``) with per-subject
    statistics and a printable ``report``; ``noop`` is true when the existing store already matches
    the configuration.
    """
    return ThingsMEGConverter.convert(dataset_cfg)
