"""One loader for every diffusers pipeline: a hub id or a local folder (docs/architecture.md §4.5).

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

from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.metrics.weights import offline
from braindecode_fw.ops.console import route_diffusers_logging

log = logging.getLogger(__name__)


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()


def _resolve(ref: str | Path, config_key: str, marker: str, what: str) -> tuple[str, bool]:
    """(reference, is_local): a local folder must hold ``marker``."""
    ref = str(ref)
    if not _looks_local(ref):
        return ref, False
    folder = Path(ref).expanduser()
    if not (folder / marker).is_file():
        raise MissingFileError(f"{config_key}: {folder} is not a diffusers {what} folder (no {marker}); "
                                f"give a hub id or a folder written by save_pretrained")
    return str(folder), True


def _from_pretrained(cls: Any, ref: str, local: bool, config_key: str, **kwargs: Any) -> Any:
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; older ones only know it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            return cls.from_pretrained(ref, local_files_only=local or offline(), **kwargs)
    except OSError as e:
        raise MissingFileError(
            f"{config_key}: cannot load {cls.__name__} from {ref!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"download it with `huggingface-cli download {ref}` where the hub is reachable, or point "
            f"{config_key} to a local folder") from None


def _diffusers_class(name: str, config_key: str) -> Any:
    import diffusers

    route_diffusers_logging()
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ConfigError(f"{config_key}: diffusers has no class {name!r}")
    return cls


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
    cls = _diffusers_class(pipeline_class, "generator.pipeline")
    ref, local = _resolve(model, config_key, "model_index.json", "pipeline")
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
    pipe = _from_pretrained(cls, ref, local, config_key, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_model(model_class: str | type, model: str | Path, *, config_key: str, dtype: str = "float32",
               subfolder: str | None = None, revision: str | None = None) -> Any:
    """One diffusers model (e.g. a ``ControlNetModel``, or a pipeline's ``text_unet`` with
    ``subfolder``) from a hub id or a ``save_pretrained`` folder, with the same errors as
    :func:`load_pipeline`. ``model_class``: a ``diffusers`` class name or the class itself."""
    cls = _diffusers_class(model_class, config_key) if isinstance(model_class, str) else model_class
    marker = "config.json" if subfolder is None else f"{subfolder}/config.json"
    ref, local = _resolve(model, config_key, marker, "model")
    kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    return _from_pretrained(cls, ref, local, config_key, **kwargs)


def load_config(model: str | Path, *, subfolder: str, config_key: str, revision: str | None = None) -> dict:
    """A component's config (e.g. ``scheduler/scheduler_config.json``) from a hub id or a folder."""
    from diffusers import ConfigMixin

    class _Config(ConfigMixin):
        config_name = "scheduler_config.json" if subfolder == "scheduler" else "config.json"

    ref, local = _resolve(model, config_key, f"{subfolder}/{_Config.config_name}", "component")
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if revision:
        kwargs["revision"] = revision
    try:
        return dict(_Config.load_config(ref, local_files_only=local or offline(), **kwargs))
    except OSError as e:
        raise MissingFileError(f"{config_key}: cannot read {subfolder} config from {ref!r} ({str(e).splitlines()[0]})"
                                ) from None
