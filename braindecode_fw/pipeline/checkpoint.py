"""Reading ``bdf-train`` checkpoints (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a bdf-train checkpoint safely (``weights_only=True``) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"ckpt: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "braindecode_fw" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt: {path} was not written by bdf-train (no 'braindecode_fw' entry)")
    return ckpt

