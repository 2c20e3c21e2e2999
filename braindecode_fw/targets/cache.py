"""On-disk cache of target embeddings, keyed by (dataset version, encoder id).

Layout: ``<cache_dir>/<dataset name>-<dataset version>/<feature>-<encoder id>.npy`` (memory-mapped
on read) with a ``.json`` sidecar describing the encoder. A changed dataset (new version) or
encoder (new id) maps to a new file, so stale embeddings are never reused. Files are written to a
temporary name in chunks and renamed when complete (the sidecar just before it); temporaries of
killed encodings are removed by the next one (docs/operations.md, "Interrupted writes").

A store is anything with the :class:`~braindecode_fw.contracts.StimulusStore` attributes (a
:class:`~braindecode_fw.data.store.PreparedStore`): ``targets/`` does not import ``data/``, which
imports it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from braindecode_fw.contracts import StimulusStore
from braindecode_fw.io import atomic_write_json, remove_dead_temporaries
from braindecode_fw.ops.faults import fault_point
from braindecode_fw.ops.progress import Progress
from braindecode_fw.targets.encoders import TargetEncoder

log = logging.getLogger(__name__)


def target_cache_path(cache_dir: str | Path, store: StimulusStore, encoder: TargetEncoder) -> Path:
    return Path(cache_dir) / f"{store.name}-{store.version}" / f"{encoder.feature_name}-{encoder.encoder_id}.npy"


def load_or_compute_targets(
    store: StimulusStore,
    encoder: TargetEncoder,
    cache_dir: str | Path,
    *,
    dtype: str = "float32",
    chunk: int = 1024,
) -> np.ndarray:
    """Target embeddings for every image of ``store``: ``(n_images, *encoder.output_shape)``.

    Read from the cache when present; otherwise encoded chunk by chunk into a temporary memory map
    (so 73k NSD images × 256×1664 never sit in RAM) and published by rename.
    """
    path = target_cache_path(cache_dir, store, encoder)
    if path.exists():
        log.info("targets %s: cache hit %s", encoder.feature_name, path)
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, path.stem)  # what a killed encoding of this entry left
    n = encoder.n_items(store)
    t0 = time.perf_counter()
    first = encoder.encode_store(store, 0, min(chunk, n))
    tmp = path.with_name(f"{path.stem}.partial-{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, *first.shape[1:]))
    try:
        out[: len(first)] = first.numpy()
        with Progress(n, f"targets {encoder.feature_name}", unit="images", logger=log) as progress:
            progress.update(len(first))
            for start in range(len(first), n, chunk):
                out[start : start + chunk] = encoder.encode_store(store, start, min(start + chunk, n)).numpy()
                progress.update(min(chunk, n - start))
                fault_point("targets.chunk", path)
        out.flush()
        del out
        meta = {"dataset": store.name, "dataset_version": store.version, "feature": encoder.feature_name,
                "encoder_id": encoder.encoder_id, "encoder": encoder.identity(), "output": encoder.output,
                "shape": [n, *first.shape[1:]], "seconds": round(time.perf_counter() - t0, 2)}
        # the sidecar first: the .npy is what a cache hit looks for, so it is renamed in last and a
        # kill in between leaves a sidecar without an entry (rewritten next time), never the reverse
        atomic_write_json(path.with_suffix(".json"), meta)
        fault_point("targets.written", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("targets %s: encoded %d images in %.1f s -> %s", encoder.feature_name, n, meta["seconds"], path)
    return np.load(path, mmap_mode="r")
