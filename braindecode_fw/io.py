"""Crash-safe file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braindecode_fw.errors import ConfigError, MissingFileError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the complete new one."""
    return atomic_write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None: strict JSON has no NaN, and
    ``json.dumps`` would write the bare ``NaN`` that other tools refuse. Containers are copied."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as strict JSON (non-finite floats become null, :func:`json_safe`), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(folder: str | Path, write: Callable[[Path], Any]) -> Path:
    """Fill the directory ``folder`` with ``write(tmp)`` so that it never holds a half-written result.

    ``write`` fills an empty temporary sibling (``.<name>.partial-<pid>``), which is renamed to
    ``folder`` when ``write`` returns; an older ``folder`` is moved aside first and removed afterwards
    (a directory cannot be replaced in one rename, so for that moment ``folder`` is absent, never
    partial). When ``write`` raises, the temporary folder is removed and ``folder`` is left as it
    was. Returns ``folder``.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    for leftover in (tmp, old):  # from a crash of this process id earlier
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # the rename of the new one failed: keep the previous result
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_tensors(path: str | Path, what: str, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` whatever torch's default: tensors and plain
    containers only, so a file that would run code when unpickled is refused. Any failure to read
    (damaged, truncated, not a torch file, a pickle of other objects) is a ValueError naming ``what``
    (the config key) and the file; a missing file a FileNotFoundError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what}: no file at {path}")
    try:
        return torch.load(path, map_location=kwargs.pop("map_location", "cpu"), weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{what}: {path} is not a readable checkpoint of tensors ({type(e).__name__}: {first})") from None
