"""Warm start (``init_from``): a new run starts from a checkpoint's decoder weights where names and
shapes match, then trains with its own data, loss, optimiser and schedule from step 0.

This is fine-tuning, not resuming (``ckpt_path`` continues the same run: optimiser state, epoch,
RNG). Typical uses: NeuroPictor's per-subject refining after multi-subject pretraining (docs/methods/neuropictor.md
§4; the refined model adds the semantic mapper's extra branch, which the pretrained one lacks), or
a longer schedule started from a short run. Parameters and buffers the checkpoint lacks, or holds with
another shape, keep the new model's initialisation; the report says which, and is saved with the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from braindecode_fw.errors import ConfigError, DataError, MissingFileError
from braindecode_fw.io import load_tensors

log = logging.getLogger(__name__)

PREFIX = "decoder."


def read_decoder_weights(checkpoint: str | Path) -> dict[str, Any]:
    """The decoder tensors (names without the ``decoder.`` prefix) of the ``bdf-train`` checkpoint
    ``checkpoint``, read pickle-free. Raises errors naming ``init_from`` and the file when it is
    missing, unreadable or holds no decoder weights — cheap enough to run before any data work."""
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingFileError(f"init_from: no checkpoint at {path}")
    state = load_tensors(path, "init_from")
    source = {k.removeprefix(PREFIX): v for k, v in ((state.get("state_dict") if isinstance(state, dict) else None)
                                                      or {}).items() if k.startswith(PREFIX)}
    if not source:
        raise DataError(f"init_from: {path} holds no decoder weights (expected a bdf-train checkpoint with "
                        f"'{PREFIX}*' entries in its state_dict)")
    return source


def load_matching_weights(decoder: nn.Module, checkpoint: str | Path,
                          source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy into ``decoder`` every tensor of the ``bdf-train`` checkpoint ``checkpoint`` (its
    ``state_dict`` entries under ``decoder.``) whose name and shape match one of ``decoder``'s.
    ``source``: those tensors already read by :func:`read_decoder_weights`.
    Returns ``{"checkpoint", "loaded", "shape_mismatch": {name: [ckpt shape, model shape]},
    "not_in_checkpoint", "not_in_model"}`` (names). Raises errors naming ``init_from`` when the
    file is missing, is not a decoder checkpoint, or shares no tensor."""
    path = Path(checkpoint)
    if source is None:
        source = read_decoder_weights(path)
    own = decoder.state_dict()
    loaded = sorted(k for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape))
    mismatch = {k: [list(source[k].shape), list(own[k].shape)] for k in sorted(source)
                if k in own and k not in loaded}
    if not loaded:
        raise ConfigError(f"init_from: no tensor of {path} matches the configured decoder in name and shape "
                         f"({len(mismatch)} names match with other shapes); is it a checkpoint of this model?")
    decoder.load_state_dict({k: source[k] for k in loaded}, strict=False)
    report = {"checkpoint": str(path), "loaded": loaded, "shape_mismatch": mismatch,
              "not_in_checkpoint": sorted(set(own) - set(source)), "not_in_model": sorted(set(source) - set(own))}
    log.info("init_from %s: %d of the decoder's %d tensors loaded; %d with another shape, %d not in the "
             "checkpoint (kept as initialised)", path, len(loaded), len(own), len(mismatch),
             len(report["not_in_checkpoint"]))
    return report
