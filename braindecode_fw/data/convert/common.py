"""What the dataset converters share: the validation-image rule, clean-up after killed runs and the
guard that keeps an existing prepared store from being replaced by one with other contents
(:func:`check_existing_store`)."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from braindecode_fw.data.store import remove_stale_partials  # noqa: F401  (converters import it from here)
from braindecode_fw.errors import DataError, OutputExistsError

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


def _flat(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "dataset",
                       limit: int = 4) -> list[str]:
    """``"<prefix>.<key> <stored> -> <wanted>"`` for every (flattened) key whose value differs
    between a store's recorded configuration and the requested one, at most ``limit`` of them
    (then ``"... and N more"``)."""
    a, b = _flat(stored, prefix), _flat(wanted, prefix)
    missing = object()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    show = [f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        show.append(f"... and {len(keys) - limit} more")
    return show


def _ways_out(store: Path, name: Any) -> str:
    """The two ways past a refusal; the second names ``dataset.name`` when the store path derives
    from it (``.../prepared/${dataset.name}``, every packaged dataset config), else ``dataset.store``."""
    beside = (f"another dataset.name=<new name> to prepare it beside this one (in {store.parent}/<new name>)"
              if name is not None and store.name == str(name) else
              "another dataset.store=<new folder> to prepare it beside this one")
    return f"set dataset.replace=true to replace it, or {beside}"


def check_existing_store(store: str | Path, fingerprint: str | None, *, force: bool = False,
                         replace: bool = False, name: Any = None, what: str = "",
                         config: Mapping[str, Any] | None = None, config_field: str = "config",
                         config_prefix: str = "dataset", **provenance: Any) -> dict[str, Any] | None:
    """What to do with whatever is at ``dataset.store`` before a store is prepared there: shared by
    every converter (:meth:`~braindecode_fw.data.convert.base.Converter.run`, a ``dataset.converter``
    function) and the synthetic worlds (:func:`braindecode_fw.data.prepare.prepare`, also behind
    ``bdf-train``'s ``dataset.auto_prepare``).

    Returns the existing ``dataset.json`` when the store at ``store`` is complete and was built from
    the same configuration (``provenance.config_fingerprint == fingerprint`` and every ``provenance``
    field given matches): the caller then writes nothing (a no-op), unless ``force``. Returns None
    when the caller may write: nothing is there (or an empty folder), ``force`` on an up-to-date
    store, or ``replace``. Anything else raises :class:`~braindecode_fw.errors.OutputExistsError`
    naming ``dataset.store``, the existing store's version, what differs (``config``, the requested
    configuration, compared key by key with the store's ``provenance[config_field]``) and the two
    ways out: another store built from other contents would silently replace the one that earlier
    runs and checkpoints were trained on. ``what`` names the dataset in messages (e.g. ``"NSD"``).
    """
    store = Path(store)
    label = f"{what} " if what else ""
    if not store.exists():
        return None
    if not store.is_dir():
        raise OutputExistsError(f"dataset.store: {store} is a file, not a prepared-store folder; remove it, or "
                                f"set another dataset.store")
    meta_path = store / "dataset.json"
    if not meta_path.is_file():
        if not any(store.iterdir()):
            return None  # an empty folder holds nothing to lose
        if replace:
            log.warning("dataset.replace=true: replacing %s (not a finished store: no dataset.json)", store)
            return None
        raise OutputExistsError(f"dataset.store: {store} exists but is not a finished store (no dataset.json), "
                                f"e.g. a half-copied store or another folder; it is left as is: "
                                f"{_ways_out(store, name)}")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if replace:
            log.warning("dataset.replace=true: replacing %s (unreadable dataset.json)", store)
            return None
        raise OutputExistsError(f"dataset.store: {store} holds an unreadable {meta_path.name} ({e}); it is left as "
                                f"is: {_ways_out(store, name)}") from None
    prov = meta.get("provenance") or {}
    if not isinstance(prov, dict):
        prov = {}
    stored = prov.get("config_fingerprint")
    other_source = {k: prov.get(k) for k, v in provenance.items() if prov.get(k) != v}
    if fingerprint is not None and stored == fingerprint and not other_source:
        return None if force else meta
    if replace:
        log.warning("dataset.replace=true: replacing %sstore %s (version %s) with one from this configuration",
                    label, store, meta.get("version"))
        return None
    if other_source:
        k, v = next(iter(other_source.items()))
        why = f"from another source (provenance {k} {v!r}, this is {provenance[k]!r})"
    elif fingerprint is None:
        why = (f"and the {label or 'chosen '}converter declares no fingerprint, so it cannot tell whether the "
               f"contents would be the same")
    elif stored is None:
        why = "with no provenance.config_fingerprint, so it cannot be matched to this configuration"
    else:
        differs = config_differences(prov[config_field], config, config_prefix) \
            if isinstance(prov.get(config_field), Mapping) and config is not None else []
        why = (f"prepared from another configuration: {', '.join(differs)}" if differs else
               f"prepared from another configuration or other input files (fingerprint {stored}, this one "
               f"{fingerprint})")
    raise OutputExistsError(f"dataset.store: {store} already holds the {label}store {meta.get('name')!r} version "
                            f"{meta.get('version')} {why}; it is kept, since runs and checkpoints trained on it "
                            f"need it: {_ways_out(store, name)}")


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
