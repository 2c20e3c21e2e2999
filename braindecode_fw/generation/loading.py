"""One loader for every diffusers pipeline: a hub id or a local folder (design.md §4 "Reconstructor").

Real pipelines (``stabilityai/stable-diffusion-2-1-unclip``, ``shi-labs/versatile-diffusion``, ...)
and the tiny ones the tests and the synthetic world build with ``save_pretrained`` go through
:func:`load_pipeline`, so the code path a user's hub id takes is the one the tests exercise.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from braindecode_fw.metrics.weights import offline

log = logging.getLogger(__name__)


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()


def load_pipeline(
    pipeline_class: str,
    model: str | Path,
    *,
    config_key: str = "generator.model",
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    variant: str | None = None,
    components: dict[str, Any] | None = None,
) -> Any:
    """``diffusers.<pipeline_class>.from_pretrained(model)`` with a clear error for a missing
    folder or an unavailable hub id. ``components`` replaces or removes (``None``) components, e.g.
    no text encoder when prompt embeddings are passed directly."""
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise ValueError(f"generator.pipeline: diffusers has no pipeline {pipeline_class!r}")
    ref = str(model)
    local = _looks_local(ref)
    if local:
        folder = Path(ref).expanduser()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{config_key}: {folder} is not a diffusers pipeline folder (no model_index.json); "
                                    f"give a hub id or a folder written by save_pretrained")
        ref = str(folder)
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype), **(components or {})}
    if local:
        # components saved as absent (e.g. no text tower when prompt embeddings are passed in)
        index = json.loads((Path(ref) / "model_index.json").read_text())
        for key, value in index.items():
            if not key.startswith("_") and (value is None or value == [None, None]):
                kwargs.setdefault(key, None)
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; older ones only know it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            pipe = cls.from_pretrained(ref, local_files_only=local or offline(), **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"{config_key}: cannot load {pipeline_class} from {ref!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"download it with `huggingface-cli download {ref}` where the hub is reachable, or point "
            f"{config_key} to a local folder") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
