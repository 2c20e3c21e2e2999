"""Fault injection for the crash-safety tests: kill the process at a named moment of a writer.

Every writer that must survive a power cut or an out-of-memory kill calls
:func:`fault_point` at its dangerous moments. Unset (always, outside tests) it costs one environment
lookup. With ``BDF_FAULT_KILL=<point>[:<path substring>][@<n>]`` the process sends itself
``SIGKILL`` at the ``n``-th (default: first) call of ``point`` whose path contains the substring: no
``finally``, ``except`` or ``atexit`` handler runs, exactly like a kill from outside.
tests/ops/test_faults.py runs each writer in a subprocess this way and checks what is left on disk
(docs/operations.md, "Interrupted writes").

Points (``path`` is what the substring is matched against):

========================  =====================================================  ==================
point                     moment                                                 path
========================  =====================================================  ==================
``file.written``          atomic_write_bytes/text/json: the temporary is         the target file
                          complete, not yet renamed over the target
``dir.written``           atomic_write_dir / demo publish_folder: the            the target folder
                          temporary folder is filled, the old one untouched
``dir.swap``              atomic_write_dir / publish_folder: the old folder is   the target folder
                          moved aside, the new one not yet renamed in
``store.subject``         StoreWriter.write_subject: responses written, the      the subject folder
                          rest of the subject not
``store.finalize``        StoreWriter.finalize: dataset.json written in the      the store
                          partial folder, nothing published
``store.swap``            StoreWriter.finalize: the old store moved aside to     the store
                          ``.replaced-<pid>``, the new one not yet renamed in
``world.subject``         synthetic fMRI / MEG world: one subject's responses    the store
                          streamed, its trials not yet written
``targets.chunk``         target cache: a chunk encoded into the temporary       the cache file
``targets.written``       target cache: the temporary is complete, not renamed   the cache file
``checkpoint.written``    AtomicCheckpointIO: torch.save done into the           the checkpoint
                          temporary, not yet renamed over the checkpoint
``recon.image``           reconstruction folder: an image file written, the      the image
                          manifest not yet updated
``recon.embeddings``      reconstruction folder: embeddings file written, the    the embeddings file
                          manifest not yet updated
``bench.json``            bdf-bench: results measured, the JSON not yet written  the JSON file
``tiny.written``          tiny diffusers pipeline cache: saved into the          the pipeline folder
                          temporary folder, not yet published
========================  =====================================================  ==================

Example: ``BDF_FAULT_KILL=checkpoint.written:last.ckpt@3 bdf-train ...`` dies while saving
``last.ckpt`` for the third time.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "BDF_FAULT_KILL"

_hits: dict[tuple[str, str | None], int] = {}  # (point, substring) -> matching calls so far


def parse_spec(spec: str) -> tuple[str, str | None, int]:
    """``"<point>[:<substring>][@<n>]"`` -> (point, substring or None, n >= 1)."""
    n, rest = 1, spec
    head, at, tail = spec.rpartition("@")
    if at and tail.isdigit():
        rest, n = head, int(tail)
    point, colon, substring = rest.partition(":")
    if not point or n < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <point>[:<path substring>][@<n>], n >= 1")
    return point, (substring if colon else None), n


def fault_point(name: str, path: str | Path | None = None) -> None:
    """SIGKILL this process here when ``BDF_FAULT_KILL`` names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, substring, n = parse_spec(spec)
    if point != name or (substring is not None and substring not in str(path)):
        return
    key = (point, substring)
    _hits[key] = _hits.get(key, 0) + 1
    if _hits[key] == n:
        os.kill(os.getpid(), signal.SIGKILL)
