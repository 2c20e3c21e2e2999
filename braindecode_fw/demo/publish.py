"""Atomic publication of a model folder: written under a private temporary name, renamed when complete."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from braindecode_fw.io import atomic_write_dir


def publish_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on an empty temporary sibling of ``folder``, then replace ``folder`` by it
    (:func:`~braindecode_fw.io.atomic_write_dir`). A crash, even a kill, leaves the previous folder
    (or none) and no half-written one; every file is made readable by everyone (package data)."""

    def write_readable(tmp: Path) -> None:
        write(tmp)
        for path in tmp.rglob("*"):  # safetensors writes 0600
            path.chmod(0o755 if path.is_dir() else 0o644)

    return atomic_write_dir(folder, write_readable)
