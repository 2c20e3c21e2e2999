"""Where the real files for reader/converter tests live, and the skip when they are absent.

The project's shared folder sits beside the repository (``<repo>/../shared/realdata``: CI checks out
``../shared`` next to the repository). ``BDF_REALDATA`` points elsewhere (e.g. from a worktree).
Nobody on this project wrote these files: real CTF recordings from MNE's testing data and the
THINGS-MEG (OpenNeuro ds004212, CC0) sidecars of sub-BIGMEG1; see its README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REALDATA = Path(os.environ.get("BDF_REALDATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata")


def realdata(*parts: str) -> Path:
    """``REALDATA / parts``, or skip the calling test (or module, at import) when it is absent."""
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real files not found at {path} (the shared realdata folder beside the repository; "
                    f"set BDF_REALDATA to its location)", allow_module_level=True)
    return path
