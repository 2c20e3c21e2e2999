"""MEG sensor layouts: channel names and 2-D positions for the spatial attention (docs/datasets/things_meg.md, docs/methods/meg_brainmodule.md §2).

The positions follow brainmagick's convention: MNE's 2-D ``CTF-275`` layout (``mne.channels.read_layout``),
channel names cleaned of their system suffix (``MLC11-1609`` / ``MLC11-2622`` -> ``MLC11``), x and y
min-max normalised *separately* to ``[0, 1]`` over the whole 275-sensor layout (so a subject with a
missing sensor keeps the same coordinates for all others), and channels the layout does not know get
:data:`MISSING_POSITION` (-0.1, -0.1), which the brain module masks out.

THINGS-MEG records 272 of the 275 CTF sensors: ``MLF25``, ``MRF43`` and ``MRO13`` are missing
(docs/datasets/things_meg.md); the Hebart derivative also drops ``MRO11`` (271 channels).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

CTF_LAYOUT = "CTF-275"
THINGS_MEG_MISSING = ("MLF25", "MRF43", "MRO13")
HEBART_DERIVATIVE_DROPPED = ("MRO11",)
MISSING_POSITION = -0.1
_SUFFIX = re.compile(r"-\d+$")


def clean_channel_name(name: str) -> str:
    """``"MLC11-1609"`` -> ``"MLC11"`` (CTF system suffixes differ between recordings and layouts)."""
    return _SUFFIX.sub("", name.strip())


@functools.lru_cache(maxsize=4)
def _layout(kind: str) -> tuple[tuple[str, ...], np.ndarray]:
    try:
        import mne
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("MEG sensor layouts need MNE: pip install 'braindecode_fw[meg]'") from err
    layout = mne.channels.read_layout(kind)
    names = tuple(clean_channel_name(n) for n in layout.names)
    xy = np.asarray(layout.pos[:, :2], dtype=np.float64)
    lo, hi = xy.min(0), xy.max(0)
    return names, ((xy - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def layout_channel_names(kind: str = CTF_LAYOUT) -> list[str]:
    """All sensor names of an MNE layout, cleaned (275 for ``CTF-275``), in layout order."""
    return list(_layout(kind)[0])


def things_meg_channel_names(suffix: str = "") -> list[str]:
    """The 272 THINGS-MEG sensors (CTF-275 minus :data:`THINGS_MEG_MISSING`), in layout order;
    ``suffix="-1609"`` gives the names as they appear in the raw recordings."""
    return [n + suffix for n in layout_channel_names() if n not in THINGS_MEG_MISSING]


def sensor_positions(names: Sequence[str], kind: str = CTF_LAYOUT) -> np.ndarray:
    """2-D positions in ``[0, 1]²`` for ``names`` (suffixes allowed), ``(C, 2)`` float32; channels
    absent from the layout get :data:`MISSING_POSITION` in both coordinates."""
    layout_names, xy = _layout(kind)
    index = {n: i for i, n in enumerate(layout_names)}
    out = np.full((len(names), 2), MISSING_POSITION, dtype=np.float32)
    for c, name in enumerate(names):
        i = index.get(clean_channel_name(name))
        if i is not None:
            out[c] = xy[i]
    return out


def valid_positions(positions: np.ndarray) -> np.ndarray:
    """``(C, 2)`` -> ``(C,)`` bool: channels with a real layout position."""
    return ~np.all(np.isclose(np.asarray(positions), MISSING_POSITION), axis=-1)
