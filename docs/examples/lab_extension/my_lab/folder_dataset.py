"""A converter for a lab's own fMRI format into braindecode_fw's prepared store (docs/extending.md).

The raw layout (what this lab's preprocessing writes)::

    <root>/images/<image_id>.png          the stimuli (any size; resized to ``image_size``)
    <root>/<subject>/betas.npy            float32 (n_trials, n_voxels), one row per trial
    <root>/<subject>/trials.csv           image_id,session,split   (one line per row of betas.npy)

Converters follow one order: read and check everything first (nothing is written while an input is
wrong, and each error names the file and what was expected), then write the store through
:class:`~braindecode_fw.data.store.StoreWriter` (a temporary folder renamed at the end, so an
interrupted run leaves nothing that opens), then return a summary whose ``report`` ``bdf-prepare``
prints.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from braindecode_fw.data.store import StoreWriter, TrialTable

SPLITS = ("train", "val", "test")


def _read_trials(path: Path, n_rows: int, known_images: set[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected image_id,session,split per row of betas.npy)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != {"image_id", "session", "split"}:
        raise ValueError(f"{path}: columns {sorted(rows[0])}, expected image_id, session, split")
    if len(rows) != n_rows:
        raise ValueError(f"{path}: {len(rows)} rows, but betas.npy has {n_rows} trials")
    for line, row in enumerate(rows, start=2):
        if row["image_id"] not in known_images:
            raise ValueError(f"{path}:{line}: image_id {row['image_id']!r} has no file in images/")
        if row["split"] not in SPLITS:
            raise ValueError(f"{path}:{line}: split {row['split']!r}, expected one of {SPLITS}")
        if not row["session"].isdigit():
            raise ValueError(f"{path}:{line}: session {row['session']!r}, expected a non-negative integer")
    return rows


def convert_folder_dataset(dataset_cfg: Any) -> dict[str, Any]:
    """``dataset.root`` (the layout above) -> prepared store ``dataset.store``.

    Keys: ``root``, ``store``, ``name``, ``subjects`` (folder names), ``image_size``, ``overwrite``.
    """
    if not dataset_cfg.get("root"):
        raise ValueError("dataset.root: not set (the folder with images/ and one folder per subject)")
    root = Path(dataset_cfg.root)
    image_files = {p.stem: p for p in sorted((root / "images").glob("*.png"))}
    if not image_files:
        raise FileNotFoundError(f"{root / 'images'}: no .png stimuli")
    # 1. read and check every input before writing anything
    subjects = {}
    for subject in dataset_cfg.subjects:
        betas_path = root / subject / "betas.npy"
        if not betas_path.is_file():
            raise FileNotFoundError(f"{betas_path}: missing (dataset.subjects lists {subject!r})")
        betas = np.load(betas_path, mmap_mode="r", allow_pickle=False)
        if betas.ndim != 2 or betas.dtype != np.float32:
            raise ValueError(f"{betas_path}: expected float32 (n_trials, n_voxels), got {betas.dtype} {betas.shape}")
        rows = _read_trials(root / subject / "trials.csv", len(betas), set(image_files))
        subjects[subject] = (betas, rows)
    ids = sorted({r["image_id"] for _, rows in subjects.values() for r in rows})
    index = {image_id: i for i, image_id in enumerate(ids)}
    size = int(dataset_cfg.image_size)
    images = np.stack([np.asarray(Image.open(image_files[i]).convert("RGB").resize((size, size), Image.BICUBIC))
                       for i in ids])
    # 2. write the store (atomically)
    with StoreWriter(dataset_cfg.store, name=dataset_cfg.name, modality="fmri",
                     overwrite=bool(dataset_cfg.get("overwrite", True))) as writer:
        writer.write_images(images, ids)
        for subject, (betas, rows) in subjects.items():
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
        writer.finalize({"source": "lab folder format", "root": str(root)}, image_size=size)
    # 3. report
    lines = [f"{dataset_cfg.name}: {len(ids)} images, {len(subjects)} subject(s) from {root}"]
    for subject, (betas, rows) in subjects.items():
        counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        lines.append(f"  {subject}: {betas.shape[1]} voxels, trials {counts}")
    return {"store": str(dataset_cfg.store), "report": "\n".join(lines)}


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
