"""Crash-safe file writes: write to a temporary name in the same folder, then rename.

Temporaries carry the writer's process id: ``<name>.tmp-<pid>`` (files), ``.<name>.partial-<pid>``
and ``.<name>.old-<pid>`` (folders; the store's ``<name>.partial-<pid>`` / ``<name>.replaced-<pid>``).
A process killed mid-write (SIGKILL, OOM, power cut) cannot remove its own, so every writer first
calls :func:`remove_dead_temporaries`: temporaries of processes that no longer exist are removed,
and a folder moved aside by a writer killed before the new one was renamed in is put back
(docs/operations.md, "Interrupted writes"). Temporaries of live processes are left alone: a
concurrent writer (a parallel sweep job) is still using them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.ops.faults import fault_point

log = logging.getLogger(__name__)

#: kinds of temporary sibling: a file being written, a folder being filled, a previous folder moved
#: aside (atomic_write_dir) or a previous store moved aside (StoreWriter)
TEMPORARY_KINDS = ("tmp", "partial", "old", "replaced")
_RESTORABLE = ("old", "replaced")
_KIND = "|".join(TEMPORARY_KINDS)
_ANY_TEMPORARY = re.compile(rf"\.?(?P<name>.+?)\.(?P<kind>{_KIND})-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # PermissionError: exists (another user); Overflow: impossible pid
    return True


def _is_dead_writer(pid: int) -> bool:
    # this process's own temporaries count as dead: it is not writing them while it asks (and a
    # container's main process gets the same pid every run, so they may be an earlier run's)
    return pid == os.getpid() or not pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temporaries(folder: Path, name: str | None) -> list[tuple[Path, str, str, int]]:
    """(path, name of what it stands in for, kind, writer pid) of every temporary in ``folder``."""
    pattern = (_ANY_TEMPORARY if name is None else
               re.compile(rf"\.?(?P<name>{re.escape(name)})\.(?P<kind>{_KIND})-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?"))
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # a folder one may write into but not list: nothing to clean
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m:
            found.append((entry, m["name"], m["kind"], int(m["pid"])))
    return found


def restore_moved_aside(folder: str | Path, name: str | None = None) -> list[Path]:
    """Where ``folder/<name>`` (any name when None) is missing but a dead writer's ``.old-<pid>`` /
    ``.replaced-<pid>`` of it exists (killed between moving the previous version aside and renaming
    the new one in), rename the newest of those back: the previous state is restored. Returns the
    restored paths. Readers call it too (:func:`~braindecode_fw.data.store.open_store`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    aside = [(p, t) for p, t, kind, pid in _temporaries(folder, name) if kind in _RESTORABLE and _is_dead_writer(pid)]
    restored = []
    for target in sorted({t for _, t in aside}):
        real = folder / target
        if real.exists() or real.is_symlink():
            continue
        newest = max((p for p, t in aside if t == target), key=lambda p: p.stat().st_mtime)
        try:
            os.replace(newest, real)
        except OSError:  # another process restored it first
            continue
        log.warning("restored %s from %s (its writer was killed before the new version was in place)",
                    real, newest.name)
        restored.append(real)
    return restored


def remove_dead_temporaries(folder: str | Path, name: str | None = None, *,
                            on_live: Callable[[Path, int], None] | None = None) -> list[Path]:
    """Clean up after writers of ``folder/<name>`` (any name when None) killed mid-write: first
    :func:`restore_moved_aside`, then every temporary (:data:`TEMPORARY_KINDS`) of a process that no
    longer exists is removed. A live process's temporary is left alone (a concurrent writer) and
    passed to ``on_live(path, pid)``, which may raise. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    restore_moved_aside(folder, name)
    removed = []
    for path, _, _, pid in _temporaries(folder, name):
        if not _is_dead_writer(pid):
            if on_live is not None:
                on_live(path, pid)
            continue
        log.warning("removing %s left by an interrupted write (pid %d)", path, pid)
        _remove(path)
        removed.append(path)
    return removed


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
    remove_dead_temporaries(path.parent, path.name)
    return write_bytes_replacing(path, data)


def write_bytes_replacing(path: Path, data: bytes) -> Path:
    """:func:`atomic_write_bytes` without the clean-up of dead temporaries first: for writers of many
    files in one folder that clean it once (the reconstruction folder)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        fault_point("file.written", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(folder: str | Path, write: Callable[[Path], Any]) -> Path:
    """Fill the directory ``folder`` with ``write(tmp)`` so that it never holds a half-written result.

    ``write`` fills an empty temporary sibling (``.<name>.partial-<pid>``), which is renamed to
    ``folder`` when ``write`` returns; an older ``folder`` is moved aside first (``.<name>.old-<pid>``)
    and removed afterwards (a directory cannot be replaced in one rename, so for that moment
    ``folder`` is absent, never partial; a writer killed right then leaves the old one, which the
    next write of ``folder`` renames back: :func:`remove_dead_temporaries`). When ``write`` raises,
    the temporary folder is removed and ``folder`` is left as it was. Returns ``folder``.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    remove_dead_temporaries(folder.parent, folder.name)  # killed writers', this pid's included
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fault_point("dir.written", folder)
        if folder.exists():
            os.replace(folder, old)
            fault_point("dir.swap", folder)
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
