"""One skeleton for every dataset converter: plan -> validate -> write -> report (docs/extending.md §2).

A converter turns a dataset's raw files into the prepared store (docs/data_format.md). Every shipped
converter (NSD, MindEye2, MindEye1's avg split, THINGS-MEG) and a lab's own one subclass
:class:`Converter` and fill in its phases; :meth:`Converter.run` calls them in a fixed order:

1. ``configure``: the ``dataset`` config -> a typed config object (unknown keys, wrong types and
   out-of-range values are one-line errors naming ``dataset.<key>``);
2. ``locate``: cheap checks of the required keys and folders; then the store's fingerprint
   (``fingerprint``) decides what happens to what is already at ``dataset.store``
   (:func:`~braindecode_fw.data.convert.common.check_existing_store`): a complete store built from
   the same configuration is left as is (a no-op, ``dataset.force=true`` rebuilds it); one built
   from another configuration (or without a fingerprint), or a folder that is not a finished store,
   is refused before anything is read, unless ``dataset.replace=true`` (or another
   ``dataset.name``); stale ``.partial-<pid>`` folders of killed runs are removed;
3. ``plan``: read every small input (designs, tables, headers) and decide what to write;
4. ``validate``: every check that needs the whole plan (cross-file consistency, real-release
   invariants, stimulus headers). Nothing has been written before this phase ends, so a failed
   check leaves no folder behind;
5. ``write``: stream the store through :class:`~braindecode_fw.data.store.StoreWriter` (a temporary
   folder renamed at the end; values that can only be checked while streaming, e.g. NaN betas in
   the middle of a file, abort the write and remove the partial folder); the base finalises it;
6. ``report``: the summary in one schema for every converter (:data:`REPORT_KEYS`), with a printable
   ``report`` text that ``bdf-prepare`` prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from braindecode_fw.data.convert.common import (
    check_existing_store,
    plain_config,
    remove_stale_partials,
)
from braindecode_fw.data.store import SPLITS, StoreWriter, TrialTable
from braindecode_fw.errors import DataError

log = logging.getLogger(__name__)

PlanT = TypeVar("PlanT")

#: Top-level keys of every converter's summary (docs/data_format.md, "Converter report"), no-op included.
REPORT_KEYS = (
    "dataset",  # dataset.name: the store's name
    "converter",  # the converter's id (its ``kind``)
    "modality",  # "fmri" | "meg"
    "store",  # path of the prepared store
    "store_version",  # dataset.json version (content fingerprint) of the store now on disk
    "config_fingerprint",  # hash of the configuration (and, for some converters, the input files); or None
    "noop",  # true when an up-to-date store was found and nothing was written
    "skipped",  # same as noop (the MindEye converters' earlier name)
    "subjects",  # subject id -> {n_trials, split_trials, n_voxels | n_sensors + n_times, ...statistics.json}
    "n_images",  # rows of images/images.npy
    "image_size",  # side of the stored images
    "checked",  # what was checked before anything was written, one line per check
    "not_checked",  # checks that did not apply (e.g. real-release counts on a fixture), and why
    "warnings",  # problems that did not stop the conversion (dataset.validate=warn, dropped inputs)
    "extras",  # dataset-specific fields (e.g. THINGS-MEG's input, MindEye2's test convention)
    "seconds",  # wall time of this call
    "report",  # the printable text
)


class ConverterInputError(DataError):
    """A raw input is missing or not in the expected format; the message names the file."""


@dataclass
class Written:
    """What :meth:`Converter.write` hands back: the store's ``provenance`` (``dataset.json``; part of
    the store version), the per-subject statistics it wrote (``statistics.json``), and dataset-specific
    report fields (``extras``)."""

    provenance: dict[str, Any]
    subjects: dict[str, dict[str, Any]]
    extras: dict[str, Any] = field(default_factory=dict)


def configure_dataclass(cls: type, mapping: Mapping[str, Any], what: str) -> Any:
    """``mapping`` -> the dataclass ``cls``, each field checked against its annotation
    (``braindecode_fw.schema``): for converter configs without a packaged YAML (a lab's own).
    Unknown and missing keys are named with the known ones."""
    from braindecode_fw.schema import build_checked, check_keys

    check_keys(cls, mapping, f"dataset: unknown {what} key(s)")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in mapping]
    if missing:
        raise DataError(f"dataset: {what} key(s) {missing} missing; expected keys: "
                         f"{sorted(f.name for f in dataclasses.fields(cls))}")
    return build_checked(cls, dict(mapping), "dataset")


def subject_summary(subject_dir: Path, modality: str) -> dict[str, Any]:
    """The report's common per-subject fields, read back from a written store subject folder:
    ``n_trials``, ``split_trials`` ({train, val, test[, test_large]}: trials) and ``n_voxels`` (fMRI,
    responses ``(trials, voxels)``) or ``n_sensors`` + ``n_times`` (MEG, ``(trials, sensors, times)``)."""
    trials = TrialTable.read(subject_dir / "trials.tsv")
    shape = np.load(subject_dir / "responses.npy", mmap_mode="r").shape
    split = np.asarray(trials.split)
    counts = {s: int((split == s).sum()) for s in SPLITS}
    if not counts["test_large"]:
        del counts["test_large"]
    out: dict[str, Any] = {"n_trials": len(trials), "split_trials": counts}
    if modality == "meg":
        out.update(n_sensors=int(shape[1]), n_times=int(shape[2]))
    else:
        out["n_voxels"] = int(shape[1])
    return out


class Converter(ABC, Generic[PlanT]):
    """A dataset converter: subclass, set the class attributes, fill in the phases (module docstring).

    Class attributes: ``kind`` (the converter's id, ``dataset.kind``), ``title`` (how messages and the
    report name the dataset, e.g. ``"NSD"``), ``modality`` (``"fmri"``/``"meg"``), ``config_class`` (a
    :func:`braindecode_fw.schema.config_dataclass` with ``from_mapping``, or a plain dataclass),
    ``provenance_match`` (provenance fields an up-to-date store must also carry, e.g. ``{"source":
    "nsd"}``), ``fingerprint_covers`` (what the fingerprint hashes, for the no-op report) and
    ``content_field`` (the provenance field where :meth:`content` is recorded, so that a refusal
    to replace a store built from another configuration can name the keys that differ).

    ``convert(dataset_cfg)`` (a classmethod) is the function ``bdf-prepare`` calls.
    """

    kind: ClassVar[str]
    title: ClassVar[str]
    modality: ClassVar[str] = "fmri"
    config_class: ClassVar[type]
    provenance_match: ClassVar[dict[str, Any]] = {}
    fingerprint_covers: ClassVar[str] = "this configuration"
    content_field: ClassVar[str] = "config"

    def __init__(self, dataset_cfg: Any):
        self.checked: list[str] = []
        self.not_checked: list[str] = []
        self.warnings: list[str] = []
        self.cfg = self.configure(plain_config(dataset_cfg))

    @classmethod
    def convert(cls, dataset_cfg: Any) -> dict[str, Any]:
        """``dataset_cfg`` (the ``dataset`` config: OmegaConf node or mapping) -> the store; returns
        the summary (:data:`REPORT_KEYS`)."""
        return cls(dataset_cfg).run()

    # ---- phases (override) ----------------------------------------------------------------------

    def configure(self, mapping: dict[str, Any]) -> Any:
        """The typed config; default: ``config_class.from_mapping`` or :func:`configure_dataclass`."""
        from_mapping = getattr(self.config_class, "from_mapping", None)
        if from_mapping is not None:
            return from_mapping(mapping)
        return configure_dataclass(self.config_class, mapping, f"{self.title} converter")

    def locate(self) -> None:
        """Cheap checks of required keys and folders, before the fingerprint is computed."""

    def fingerprint(self) -> str | None:
        """What an up-to-date store's ``provenance.config_fingerprint`` must be; None: never a no-op
        (and an existing store at ``dataset.store`` is then only replaced with ``dataset.replace=true``)."""
        return None

    def content(self) -> Mapping[str, Any] | None:
        """The content-determining configuration, as recorded in the store's
        ``provenance[content_field]`` (default: ``cfg.content()`` when the config has one)."""
        content = getattr(self.cfg, "content", None)
        return content() if callable(content) else None

    @abstractmethod
    def plan(self) -> PlanT:
        """Read and check every small input; return what :meth:`write` needs. Writes nothing."""

    def validate(self, plan: PlanT) -> None:
        """Checks over the whole plan; raise on an error, :meth:`warn` on a tolerated problem. Writes nothing."""

    @abstractmethod
    def write(self, writer: StoreWriter, plan: PlanT) -> Written:
        """Write images and subjects through ``writer`` (not ``finalize``: the base does that)."""

    def table(self, summary: dict[str, Any]) -> list[str]:
        """The report's dataset-specific lines (default: one line per subject)."""
        lines = [f"{self.title}: {summary['n_images']} images, {len(summary['subjects'])} subject(s)"]
        for tag, st in summary["subjects"].items():
            size = (f"{st['n_voxels']} voxels" if "n_voxels" in st
                    else f"{st['n_sensors']} sensors x {st['n_times']} samples")
            lines.append(f"  {tag}: {size}, trials {st['split_trials']}")
        return lines

    def close(self) -> None:
        """Release what the phases opened (called after success and failure)."""

    # ---- helpers for the phases -----------------------------------------------------------------

    def check(self, what: str) -> None:
        """Record a check that passed (the report's ``checked``)."""
        self.checked.append(what)

    def skip_check(self, what: str) -> None:
        """Record a check that did not apply, and why (the report's ``not_checked``)."""
        self.not_checked.append(what)
        log.info("%s: %s", self.title, what)

    def warn(self, problem: str) -> None:
        """A problem that does not stop the conversion: logged and listed in the report."""
        self.warnings.append(problem)
        log.warning("%s: %s", self.title, problem)

    @property
    def store(self) -> Path:
        store = getattr(self.cfg, "store", None)
        if not store:
            raise DataError(f"dataset.store: not set (where the prepared {self.title} store is written)")
        return Path(str(store)).expanduser()

    @property
    def force(self) -> bool:
        return bool(getattr(self.cfg, "force", False))

    @property
    def replace(self) -> bool:
        """``dataset.replace``: replace a store at ``dataset.store`` built from another configuration."""
        return bool(getattr(self.cfg, "replace", False))

    @property
    def overwrite(self) -> bool:
        """Whether :class:`StoreWriter` may replace what is at ``dataset.store`` once
        :func:`check_existing_store` allowed it (a subclass may forbid it altogether)."""
        return True

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    # ---- the fixed order ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            self.locate()
            store = self.store
            fingerprint = self.fingerprint()
            remove_stale_partials(store)
            existing = check_existing_store(store, fingerprint, force=self.force, replace=self.replace,
                                            name=getattr(self.cfg, "name", None), what=self.title,
                                            config=self.content(), config_field=self.content_field,
                                            **self.provenance_match)
            if existing is not None:
                summary = self._summary(store, existing, fingerprint, noop=True, extras={}, t0=t0)
                log.info(summary["report"])
                return summary
            plan = self.plan()
            self.validate(plan)
            with StoreWriter(store, name=str(self.cfg.name), modality=self.modality,
                             overwrite=self.overwrite) as writer:
                written = self.write(writer, plan)
                writer.finalize(written.provenance, image_size=self.image_size)
        finally:
            self.close()
        meta = json.loads((store / "dataset.json").read_text())
        return self._summary(store, meta, fingerprint, noop=False, extras=written.extras, t0=t0,
                             statistics=written.subjects)

    def _summary(self, store: Path, meta: dict[str, Any], fingerprint: str | None, *, noop: bool,
                 extras: dict[str, Any], t0: float, statistics: dict[str, dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
        subjects = {}
        for tag in meta.get("subjects", []):
            sdir = store / "subjects" / tag
            stats = (statistics or {}).get(tag)
            if stats is None and (sdir / "statistics.json").exists():
                stats = json.loads((sdir / "statistics.json").read_text())
            subjects[tag] = {**(stats or {}), **subject_summary(sdir, self.modality)}
        summary: dict[str, Any] = {
            "dataset": meta.get("name"), "converter": self.kind, "modality": self.modality, "store": str(store),
            "store_version": meta.get("version"), "config_fingerprint": fingerprint, "noop": noop, "skipped": noop,
            "subjects": subjects, "n_images": meta.get("n_images"), "image_size": meta.get("image_size"),
            "checked": list(self.checked), "not_checked": list(self.not_checked), "warnings": list(self.warnings),
            "extras": dict(extras), "seconds": time.perf_counter() - t0,
        }
        summary["report"] = self.report(summary)
        return summary

    def report(self, summary: dict[str, Any]) -> str:
        """The printable text: the no-op line, or the converter's :meth:`table`, then every warning,
        then the store version and how many checks passed before writing."""
        if summary["noop"]:
            return (f"{self.title} store {summary['store']} is up to date (built from {self.fingerprint_covers}: "
                    f"fingerprint {summary['config_fingerprint']}, version {summary['store_version']}); "
                    f"nothing to do (dataset.force=true reconverts)")
        lines = self.table(summary)
        lines += [f"warning: {w}" for w in summary["warnings"]]
        lines.append(f"store version {summary['store_version']}; {len(summary['checked'])} input checks passed "
                     f"before writing" + (f", {len(summary['not_checked'])} did not apply"
                                          if summary["not_checked"] else ""))
        return "\n".join(lines)


def check_report_schema(summary: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming what differs when ``summary`` does not follow :data:`REPORT_KEYS`."""
    missing = [k for k in REPORT_KEYS if k not in summary]
    extra = sorted(set(summary) - set(REPORT_KEYS))
    if missing or extra:
        raise DataError(f"converter summary: missing key(s) {missing}, unexpected key(s) {extra}")
    for tag, st in summary["subjects"].items():
        need = ["n_trials", "split_trials", *(["n_sensors", "n_times"] if summary["modality"] == "meg"
                                                 else ["n_voxels"])]
        lacking = [k for k in need if k not in st]
        if lacking:
            raise DataError(f"converter summary: subjects.{tag} lacks {lacking}")


__all__ = ["REPORT_KEYS", "Converter", "ConverterInputError", "Written", "check_report_schema",
           "configure_dataclass", "subject_summary"]
