"""Where the metric networks' weights come from (one resolver for every extractor).

A weights reference is one of:

- ``random`` or ``random:<seed>``: random initialisation (tests, benchmarks);
- ``torchvision:<NAME>`` (``torchvision:IMAGENET1K_V1``, ``torchvision:DEFAULT``): the
  torchvision weights enum of the architecture, read from the torch-hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``) where torchvision itself stores them;
- an ``https://`` URL: a checkpoint cached under the same folder by its file name (SwAV's
  ``swav_800ep_pretrain.pth.tar`` is the one ``torch.hub.load('facebookresearch/swav:main',
  'resnet50')`` downloads);
- ``hf-hub:<owner>/<repo>/<file>``: a file of a Hugging Face Hub repository (hub cache;
  ``HF_HUB_OFFLINE=1`` is honoured);
- a local path to a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict.

Downloads happen only when allowed (``download=True`` and neither ``BDF_OFFLINE`` nor
``HF_HUB_OFFLINE`` is set); otherwise a missing file is an error that names it and says where to
put it. Pickled checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from braindecode_fw.errors import ConfigError


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not available locally (and may not be downloaded)."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0", "false", "False")
               for v in ("BDF_OFFLINE", "HF_HUB_OFFLINE"))


def is_random(ref: str | None) -> bool:
    return ref is None or str(ref) == "random" or str(ref).startswith("random:")


def random_seed(ref: str | None, default: int = 0) -> int:
    if ref is not None and str(ref).startswith("random:"):
        return int(str(ref).split(":", 1)[1])
    return default


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state_dict_file(path: str | Path, *, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a pickled checkpoint (``weights_only=True``); a
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{what}: weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file is unreadable
        raise ConfigError(f"{what}: cannot read weights {path} ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what}: {path} does not hold a state dict of tensors")
    return state


def _cached_url(url: str, *, what: str, download: bool, config_key: str) -> Path:
    target = hub_checkpoint_dir() / Path(url.split("?")[0]).name
    if target.is_file():
        return target
    if download and not offline():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except Exception as e:  # noqa: BLE001
            raise MissingWeightsError(f"{what}: downloading {url} failed ({type(e).__name__}: {e}); download it "
                                      f"by hand to {target}, or set {config_key} to a local file") from None
        return target
    raise MissingWeightsError(
        f"{what}: weights not found at {target} (downloads are off here); download {url} to that path "
        f"(or set TORCH_HOME), or set {config_key}=/path/to/weights.pth")


def resolve_state_dict(
    ref: str,
    *,
    arch: str,
    what: str,
    config_key: str,
    download: bool = True,
) -> dict[str, torch.Tensor]:
    """Load the state dict named by ``ref`` (see module docstring) for a model ``arch``
    (``torchvision:<name>`` architectures only for ``torchvision:`` weights)."""
    ref = str(ref)
    if ref.startswith("torchvision:"):
        if not arch.startswith("torchvision:"):
            raise ConfigError(f"{config_key}: torchvision weights need a torchvision architecture, got {arch!r}")
        from torchvision.models import get_model_weights

        name = ref.split(":", 1)[1]
        enum = get_model_weights(arch.split(":", 1)[1])
        try:
            weights = enum[name] if name != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise ConfigError(f"{config_key}: {arch} has no weights {name!r}; "
                             f"available: {[w.name for w in enum]} or DEFAULT") from None
        return load_state_dict_file(_cached_url(weights.url, what=what, download=download, config_key=config_key),
                                    what=what)
    if ref.startswith(("https://", "http://")):
        return load_state_dict_file(_cached_url(ref, what=what, download=download, config_key=config_key), what=what)
    if ref.startswith("hf-hub:"):
        parts = ref.removeprefix("hf-hub:").split("/")
        if len(parts) < 3:
            raise ConfigError(f"{config_key}: hf-hub weights are 'hf-hub:<owner>/<repo>/<file>', got {ref!r}")
        from huggingface_hub import hf_hub_download

        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            path = hf_hub_download(repo, filename, local_files_only=offline() or not download)
        except Exception as e:  # noqa: BLE001
            raise MissingWeightsError(
                f"{what}: {filename} of hub repo {repo} is not available ({type(e).__name__}); run "
                f"`huggingface-cli download {repo} {filename}` where the hub is reachable, or set "
                f"{config_key}=/path/to/{Path(filename).name}") from None
        return load_state_dict_file(path, what=what)
    return load_state_dict_file(ref, what=what)


def load_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    what: str,
    strip_prefix: str | None = None,
    allowed_missing: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``model``; only keys starting with one of ``allowed_missing`` may be
    missing (e.g. SwAV's checkpoint has no ``fc.``), unexpected keys (projection heads) are ignored
    only when the model has no such parameter at all."""
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    mine = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in state.items()
           if k in mine and mine[k].shape != v.shape]
    if bad:
        raise ConfigError(f"{what}: weight shapes do not match the model: {bad[:3]}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(allowed_missing))]
    if missing:
        raise ConfigError(f"{what}: the weights lack {len(missing)} parameter(s) of the model, e.g. {missing[:3]} "
                         f"(wrong architecture for these weights?)")
