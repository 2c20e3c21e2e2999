"""Atomic publication of a model folder: written under a private temporary name, renamed when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def publish_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on an empty temporary sibling of ``folder``, then replace ``folder`` by it.
    A crash leaves the previous folder (or none) and no half-written one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.rglob("*"):  # package data: readable by everyone (safetensors writes 0600)
            path.chmod(0o755 if path.is_dir() else 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
