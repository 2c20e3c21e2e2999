"""The reconstruction folder: what ``bdf-reconstruct`` writes and ``bdf-evaluate run=`` reads.

Layout (docs/data_format.md, "Reconstruction folders")::

    <run>/manifest.json                   format, version, store, dataset_version, test_set,
                                          generator, config, items[], embeddings{}
    <run>/<subject>/final/<image>_s<k>.png     sample k for one test image (uint8 RGB)
    <run>/<subject>/lowlevel/<image>.png       optional low-level image given to the generator
                                               (blurry VAE decode, or the lowlevel=dip image)
    <run>/<subject>/embeddings.safetensors     optional: "pred" and "target" retrieval embeddings

``items`` rows: ``subject``, ``image_index`` (row of the store's ``images/images.npy``),
``image_id``, ``sample``, ``seed``, ``path`` and ``lowlevel_path`` (relative to the run folder, or
null). Every file is written to a temporary name and renamed; an image or embeddings file is
complete before the manifest names it, and the manifest is rewritten atomically after every
batch, so a crash (even SIGKILL) leaves a manifest whose every entry is a complete file on disk
(images written after its last rewrite are simply not listed yet), and a rerun skips the listed
ones (resume) after removing the killed writer's temporaries (docs/operations.md, "Interrupted
writes").
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braindecode_fw.errors import DataError, MissingFileError
from braindecode_fw.io import atomic_write_json, remove_dead_temporaries, write_bytes_replacing
from braindecode_fw.ops.faults import fault_point

FORMAT = "bdf-reconstructions"
FORMAT_VERSION = 1


@dataclass
class ReconItem:
    subject: str
    image_index: int
    image_id: str
    sample: int
    seed: int
    path: str
    lowlevel_path: str | None = None


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"{path}: expected a uint8 (h, w, 3) image, got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes_replacing(path, buffer.getvalue())  # the folder was cleaned once when opened


class ReconstructionWriter:
    """Adds reconstructed images to a run folder; reopening an existing folder resumes it."""

    def __init__(self, root: str | Path, *, store: str | Path, dataset_version: str | None, test_set: str | None,
                 generator: dict[str, Any], config: dict[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for folder, _, _ in os.walk(self.root):  # temporaries of a killed earlier run
            remove_dead_temporaries(folder)
        self.meta: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "store": str(store),
            "dataset_version": dataset_version, "test_set": test_set, "generator": generator,
            "config": config or {}, "items": [], "embeddings": {},
        }
        manifest = self.root / "manifest.json"
        if manifest.exists():
            previous = open_reconstructions(self.root)
            if previous.meta.get("dataset_version") != dataset_version:
                raise DataError(f"{manifest}: written for dataset version {previous.meta.get('dataset_version')}, "
                                 f"now {dataset_version}; use a new output folder")
            self.meta["items"] = [asdict(i) for i in previous.items]
            self.meta["embeddings"] = previous.meta.get("embeddings", {})
        self._done = {(i["subject"], i["image_index"], i["sample"]) for i in self.meta["items"]}

    def has(self, subject: str, image_index: int, sample: int = 0) -> bool:
        return (subject, int(image_index), int(sample)) in self._done

    def add(self, subject: str, image_index: int, image_id: str, image: np.ndarray, *, sample: int = 0,
            seed: int = 0, lowlevel: np.ndarray | None = None) -> ReconItem:
        rel = Path(subject) / "final" / f"{image_id}_s{sample}.png"
        _save_png(self.root / rel, image)
        low_rel = None
        if lowlevel is not None:
            low_rel = Path(subject) / "lowlevel" / f"{image_id}.png"
            _save_png(self.root / low_rel, lowlevel)
        fault_point("recon.image", self.root / rel)
        item = ReconItem(subject, int(image_index), str(image_id), int(sample), int(seed), str(rel),
                         str(low_rel) if low_rel else None)
        if not self.has(subject, image_index, sample):
            self.meta["items"].append(asdict(item))
            self._done.add((subject, int(image_index), int(sample)))
        return item

    def add_embeddings(self, subject: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Retrieval embeddings for the subject's test images, in the order of ``image_indices``."""
        from safetensors.torch import save

        rel = Path(subject) / "embeddings.safetensors"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_replacing(path, save({"pred": pred.float().contiguous(), "target": target.float().contiguous()}))
        fault_point("recon.embeddings", path)
        self.meta["embeddings"][subject] = str(rel)

    def flush(self) -> Path:
        """Rewrite the manifest (atomically): it lists the files written so far, all complete."""
        return atomic_write_json(self.root / "manifest.json", self.meta)


@dataclass
class ReconstructionSet:
    root: Path
    meta: dict[str, Any]
    items: list[ReconItem]

    @property
    def subjects(self) -> list[str]:
        return sorted({i.subject for i in self.items})

    def select(self, subject: str, sample: int = 0) -> list[ReconItem]:
        """The subject's items for one sample index, ordered by image index."""
        return sorted((i for i in self.items if i.subject == subject and i.sample == sample),
                      key=lambda i: i.image_index)

    def embeddings(self, subject: str) -> dict[str, torch.Tensor] | None:
        rel = self.meta.get("embeddings", {}).get(subject)
        if rel is None:
            return None
        from safetensors.torch import load_file

        return load_file(str(self.root / rel))


def open_reconstructions(root: str | Path) -> ReconstructionSet:
    """Read and validate a reconstruction folder; every problem is named with its file and field."""
    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise MissingFileError(f"{manifest}: not a reconstruction folder (no manifest.json; bdf-reconstruct "
                                f"writes one)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{manifest}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest}: format_version {meta.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}")
    problems, items = [], []
    fields = {f: t for f, t in ReconItem.__annotations__.items()}
    for n, raw in enumerate(meta.get("items", [])):
        missing = [f for f in fields if f not in raw and f != "lowlevel_path"]
        if missing:
            problems.append(f"items[{n}]: missing field(s) {missing}")
            continue
        item = ReconItem(**{f: raw.get(f) for f in fields})
        for rel in (item.path, item.lowlevel_path):
            if rel is not None and not (root / rel).is_file():
                problems.append(f"items[{n}]: file {rel} does not exist")
        items.append(item)
    for subject, rel in meta.get("embeddings", {}).items():
        if not (root / rel).is_file():
            problems.append(f"embeddings.{subject}: file {rel} does not exist")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{manifest}: {shown}")
    return ReconstructionSet(root, meta, items)
