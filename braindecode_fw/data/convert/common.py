"""What the dataset converters share: the validation-image rule and clean-up after killed runs."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.data.store import _pid_alive, remove_stale_partials  # noqa: F401  (converters import them from here)
from braindecode_fw.errors import DataError

log = logging.getLogger(__name__)


def plain_config(dataset_cfg: Any) -> dict[str, Any]:
    """A ``dataset`` config (OmegaConf node or mapping) as a plain, resolved dict for a converter."""
    if hasattr(dataset_cfg, "_get_node"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(dataset_cfg, resolve=True)
    return dict(dataset_cfg)


def hash_uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    """A stable uniform [0, 1) per id (splitmix64 of id and seed): same answer for any subset."""
    with np.errstate(over="ignore"):
        z = (ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_val_image(image_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool per entry of ``image_ids`` (dataset image ids, e.g. NSD 73k ids): held out for
    validation when ``hash_uniform(id, seed) < fraction``. Every presentation of an image lands in
    the same split, and an image's split does not depend on which subjects or sessions are
    converted, nor on the converter (raw NSD and MindEye2's release agree)."""
    return hash_uniform(np.asarray(image_ids), seed) < fraction


def matching_store(store: Path, fingerprint: str, **provenance: Any) -> dict[str, Any] | None:
    """``dataset.json`` of the complete store at ``store`` when its ``provenance.config_fingerprint``
    is ``fingerprint`` and every given provenance field matches (e.g. ``source="nsd"``); else None:
    a re-run with the same inputs and options is then a no-op."""
    try:
        meta = json.loads((store / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    prov = meta.get("provenance") or {}
    if prov.get("config_fingerprint") != fingerprint or any(prov.get(k) != v for k, v in provenance.items()):
        return None
    return meta


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and builtin values only; any other class or function a pickle names
    (what a crafted file would use to run code) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays of strings are read")
        return super().find_class(module, name)


def load_string_array(path: Path) -> np.ndarray:
    """A ``.npy`` file of strings, e.g. NSD's ``COCO_73k_annots_curated.npy`` (73000 × 5 captions,
    saved as an object array, i.e. a pickle): plain arrays are read as they are; an object array is
    unpickled with :class:`_ArrayOnlyUnpickler`, so nothing in the file is executed. A file that
    needs anything else raises a ValueError naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # object arrays cannot be memory-mapped or read without a pickle
        pass
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype != np.dtype(object):
            raise DataError(f"{path}: unreadable .npy array of dtype {dtype}")
        try:
            array = _ArrayOnlyUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - unpickling errors of every kind: name the file
            raise DataError(f"{path}: not a plain array of strings ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise DataError(f"{path}: the pickled array does not match its header shape {tuple(shape)}")
    if not all(isinstance(v, str | bytes) for v in array.ravel()[:1000]):
        raise DataError(f"{path}: expected strings, found {type(array.ravel()[0]).__name__}")
    return array
