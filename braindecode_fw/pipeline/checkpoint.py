"""Reading ``bdf-train`` checkpoints (``weights_only=True``) and checking that the store they are
evaluated on is the one they were trained on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.io import load_tensors


def load_checkpoint(path: str | Path, what: str = "ckpt") -> dict[str, Any]:
    """Load a bdf-train checkpoint safely (``weights_only=True``, :func:`~braindecode_fw.io.load_tensors`)
    and check it is one of ours; errors name ``what`` (the config key) and the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what}: checkpoint not found: {path}")
    ckpt = load_tensors(path, what)
    if not isinstance(ckpt, dict) or "braindecode_fw" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{what}: {path} was not written by bdf-train (no 'braindecode_fw' entry)")
    return ckpt



log = logging.getLogger(__name__)


def check_checkpoint_store(extra: dict[str, Any], ckpt_path: str | Path, store_path: str | Path, *,
                           allow_other_store: bool = False) -> None:
    """Refuse to run a checkpoint on a store other than the one it was trained on: another store
    version (the world regenerated with another seed, a dataset converted again with other options)
    means other responses for the same subject names, and the decoder would be scored at chance
    without an error. ``allow_other_store`` turns the version check into a warning; subjects whose
    feature counts differ from the decoder's are always an error. ``extra``: the checkpoint's
    ``braindecode_fw`` entry."""
    from braindecode_fw.data.store import open_store

    store = open_store(store_path, check_finite=False)
    trained = extra.get("dataset_version")
    if trained and trained != store.version:
        world = ((extra.get("config") or {}).get("dataset") or {}).get("world")
        now = store.meta.get("provenance", {}).get("config")
        differs = ""
        if isinstance(world, dict) and isinstance(now, dict):
            keys = [k for k in sorted(set(world) | set(now)) if world.get(k) != now.get(k)]
            differs = f"; the world config differs in {', '.join(f'dataset.world.{k}' for k in keys)}" if keys else ""
        message = (f"ckpt: {ckpt_path} was trained on store version {trained}, but {store_path} now holds version "
                   f"{store.version}{differs}. Prepare the store it was trained on again, point store= to it, or set "
                   f"allow_other_store=true to run it on this store anyway")
        if not allow_other_store:
            raise ConfigError(message)
        log.warning("%s (allow_other_store=true: continuing)", message)
    wrong = {s: (int(n), store.subjects[s].n_features) for s, n in (extra.get("n_features") or {}).items()
             if s in store.subjects and store.subjects[s].n_features != int(n)}
    if wrong:
        listed = ", ".join(f"{s}: decoder {a}, store {b}" for s, (a, b) in sorted(wrong.items()))
        raise ConfigError(f"ckpt: {ckpt_path}'s decoder and {store_path} disagree on the feature count of "
                         f"{listed}; it is a checkpoint of another dataset")
