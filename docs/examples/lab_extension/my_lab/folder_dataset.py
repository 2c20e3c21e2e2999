"""A converter for a lab's own fMRI format into braindecode_fw's prepared store (docs/extending.md).

The raw layout (what this lab's preprocessing writes)::

    <root>/images/<image_id>.png          the stimuli (any size; resized to ``image_size``)
    <root>/<subject>/betas.npy            float32 (n_trials, n_voxels), one row per trial
    <root>/<subject>/trials.csv           image_id,session,split   (one line per row of betas.npy)

The converter subclasses :class:`braindecode_fw.data.convert.base.Converter`, which runs its phases
in a fixed order: ``configure`` (the typed config below), ``locate`` (required keys and folders;
then :meth:`FolderConverter.fingerprint` decides what happens to a store already at ``dataset.store``:
the same configuration and inputs -> nothing to do; anything else -> refused unless
``dataset.replace=true``), ``plan`` (read and check every input; nothing is written while an input is wrong, and each error
names the file and what was expected), ``validate``, ``write`` (through
:class:`~braindecode_fw.data.store.StoreWriter`: a temporary folder renamed at the end, so an
interrupted run leaves nothing that opens), then the report ``bdf-prepare`` prints.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from braindecode_fw.data.convert.base import Converter, Written
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.errors import ConfigError, DataError, MissingFileError

SPLITS = ("train", "val", "test")


@dataclass
class FolderDatasetConfig:
    """The keys of conf/dataset/lab_folder.yaml (which holds every default); each value is checked
    against its annotation when the converter starts (``dataset.image_size: expected an integer``)."""

    name: str
    kind: str
    converter: str
    modality: str
    store: str | None
    auto_prepare: bool
    root: str | None
    subjects: list[str]
    image_size: int
    force: bool
    replace: bool


@dataclass
class FolderPlan:
    image_files: dict[str, Path]  # image id -> png
    subjects: dict[str, tuple[np.ndarray, list[dict[str, str]]]]  # subject -> (betas (trials, voxels), rows)
    ids: list[str]  # the images used, sorted: row order of images/images.npy


def _read_trials(path: Path, n_rows: int, known_images: set[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (expected image_id,session,split per row of betas.npy)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != {"image_id", "session", "split"}:
        raise DataError(f"{path}: columns {sorted(rows[0])}, expected image_id, session, split")
    if len(rows) != n_rows:
        raise DataError(f"{path}: {len(rows)} rows, but betas.npy has {n_rows} trials")
    for line, row in enumerate(rows, start=2):
        if row["image_id"] not in known_images:
            raise DataError(f"{path}:{line}: image_id {row['image_id']!r} has no file in images/")
        if row["split"] not in SPLITS:
            raise DataError(f"{path}:{line}: split {row['split']!r}, expected one of {SPLITS}")
        if not row["session"].isdigit():
            raise DataError(f"{path}:{line}: session {row['session']!r}, expected a non-negative integer")
    return rows


class FolderConverter(Converter[FolderPlan]):
    """``dataset.root`` (the layout above) -> prepared store ``dataset.store``."""

    kind = "lab_folder"
    title = "lab folder"
    modality = "fmri"
    config_class = FolderDatasetConfig

    cfg: FolderDatasetConfig

    def locate(self) -> None:
        if not self.cfg.root:
            raise ConfigError("dataset.root: not set (the folder with images/ and one folder per subject)")
        self.root = Path(self.cfg.root)

    def content(self) -> dict[str, Any]:
        """The keys that decide what the store holds (recorded as ``provenance.config``)."""
        return {"subjects": list(self.cfg.subjects), "image_size": int(self.cfg.image_size)}

    def fingerprint(self) -> str:
        """Hash of :meth:`content` and of every input file's name and size: a re-run on the same
        files with the same keys is a no-op; changed inputs or keys need ``dataset.replace=true``
        (or another ``dataset.name``)."""
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        sources = {str(p.relative_to(self.root)): p.stat().st_size for p in files}
        blob = json.dumps({"content": self.content(), "sources": sources}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def plan(self) -> FolderPlan:
        root = self.root
        image_files = {p.stem: p for p in sorted((root / "images").glob("*.png"))}
        if not image_files:
            raise MissingFileError(f"{root / 'images'}: no .png stimuli")
        subjects = {}
        for subject in self.cfg.subjects:
            betas_path = root / subject / "betas.npy"
            if not betas_path.is_file():
                raise MissingFileError(f"{betas_path}: missing (dataset.subjects lists {subject!r})")
            betas = np.load(betas_path, mmap_mode="r", allow_pickle=False)
            if betas.ndim != 2 or betas.dtype != np.float32:
                raise DataError(f"{betas_path}: expected float32 (n_trials, n_voxels), got {betas.dtype} "
                                 f"{betas.shape}")
            rows = _read_trials(root / subject / "trials.csv", len(betas), set(image_files))
            self.check(f"{subject}: betas.npy float32 {betas.shape}; trials.csv columns, one row per trial, "
                       f"known images, splits, sessions")
            subjects[subject] = (betas, rows)
        ids = sorted({r["image_id"] for _, rows in subjects.values() for r in rows})
        return FolderPlan(image_files, subjects, ids)

    def write(self, writer: StoreWriter, plan: FolderPlan) -> Written:
        size = self.image_size
        images = np.stack([np.asarray(Image.open(plan.image_files[i]).convert("RGB").resize((size, size),
                                                                                          Image.BICUBIC))
                           for i in plan.ids])
        writer.write_images(images, plan.ids)
        index = {image_id: i for i, image_id in enumerate(plan.ids)}
        for subject, (betas, rows) in plan.subjects.items():
            image_index = np.array([index[r["image_id"]] for r in rows], dtype=np.int64)
            repeat = np.zeros(len(rows), dtype=np.int64)
            seen: dict[int, int] = {}
            for k, i in enumerate(image_index):
                repeat[k] = seen.get(int(i), 0)
                seen[int(i)] = repeat[k] + 1
            trials = TrialTable(trial_id=np.arange(len(rows), dtype=np.int64), image_index=image_index,
                                session=np.array([int(r["session"]) for r in rows], dtype=np.int64),
                                run=np.zeros(len(rows), dtype=np.int64), repeat=repeat,
                                split=np.array([r["split"] for r in rows]))
            writer.write_subject(subject, trials, np.ascontiguousarray(betas))
        provenance = {"source": "lab folder format", "root": str(self.root), "config": self.content(),
                      "config_fingerprint": self.fingerprint()}
        return Written(provenance, subjects={})

    def table(self, summary: dict[str, Any]) -> list[str]:
        lines = [f"{summary['dataset']}: {summary['n_images']} images, {len(summary['subjects'])} subject(s) "
                 f"from {self.root}"]
        for subject, st in summary["subjects"].items():
            lines.append(f"  {subject}: {st['n_voxels']} voxels, trials {st['split_trials']}")
        return lines


convert_folder_dataset = FolderConverter.convert  # what conf/dataset/lab_folder.yaml's converter: names


def write_example_raw_data(root: str | Path, *, n_images: int = 60, n_voxels: int = 80, seed: int = 0) -> Path:
    """A tiny raw dataset in the layout above (for docs/extending.md and its test): procedural
    images and two subjects whose betas are a fixed random linear function of the pixels + noise,
    so a decoder can learn something."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels = []
    for i in range(n_images):
        yy, xx = np.mgrid[0:32, 0:32] / 32.0
        f, phase, colour = rng.uniform(1, 4), rng.uniform(0, 6.3), rng.uniform(0.2, 1.0, 3)
        img = (0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(phase) + yy * np.sin(phase))))[..., None] * colour
        img = (img * 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"img{i:03d}.png")
        pixels.append(img.reshape(-1).astype(np.float32) / 255)
    pixels = np.stack(pixels)
    test = set(range(n_images - 10, n_images))
    for subject in ("subjA", "subjB"):
        (root / subject).mkdir(exist_ok=True)
        weights = rng.standard_normal((pixels.shape[1], n_voxels)).astype(np.float32) / 30
        rows, betas = [], []
        for rep in range(2):
            for i in range(n_images):
                split = "test" if i in test else ("val" if i % 10 == 0 else "train")
                rows.append((f"img{i:03d}", rep, split))
                betas.append(pixels[i] @ weights + 0.3 * rng.standard_normal(n_voxels).astype(np.float32))
        np.save(root / subject / "betas.npy", np.stack(betas).astype(np.float32))
        with open(root / subject / "trials.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "session", "split"])
            w.writerows(rows)
    return root
