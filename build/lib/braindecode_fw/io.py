"""Crash-safe file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the complete new one."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


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
