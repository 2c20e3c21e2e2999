"""The training fast path: the same maths as eager fp32 PyTorch, on faster kernels (``fast_path`` config).

Measured in ``bdf-bench models.enabled=true`` (docs/benchmarks.md "Fast path"), eager fp32 and the
fast path in the same run. What it switches, each on by default where it is exact enough:

- ``fused_optimizer``: ``torch.optim.Adam``/``AdamW`` with ``fused=True``, one kernel pass over
  each parameter and its two moments instead of a Python loop of a dozen elementwise operations.
  The update is the same formula; only floating-point rounding of the intermediate terms can differ
  (at NSD shapes the dominant cost of a step on a CPU: ~700 M parameters for MindBridge).
- ``bf16``: ``auto`` turns ``trainer.precision=32-true`` into ``bf16-mixed`` where the hardware has
  bf16 matrix units (CUDA GPUs that support bf16; CPUs with AMX or AVX512-BF16). Elsewhere
  autocast would emulate bf16 and be slower, so the run stays fp32. Not exact: bf16 keeps 8
  mantissa bits in matmuls (weights, gradients and optimiser state stay fp32).
- ``compile``: ``torch.compile`` of the decoder, off by default: compiling takes minutes, which a
  short run does not win back, and a decoder that dynamo cannot trace runs eagerly with one
  warning (``torch._dynamo.config.suppress_errors``) rather than failing.
- ``nan_check``: the non-finite-loss guard. ``step`` checks every step (a host synchronisation);
  ``deferred`` keeps the first bad step on the device and checks at each logging step and epoch
  end; ``auto`` is ``step`` on a CPU (where checking costs nothing) and ``deferred`` on accelerators.

``fast_path=eager`` switches everything off (the reference the bench compares against).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from braindecode_fw.errors import ConfigError

log = logging.getLogger(__name__)

#: optimisers with a fused kernel in torch (CPU and CUDA): the fast path passes ``fused=True``
FUSED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
NAN_CHECKS = ("auto", "step", "deferred")


@dataclass(frozen=True)
class FastPath:
    """The ``fast_path`` config node (braindecode_fw/conf/fast_path/default.yaml)."""

    fused_optimizer: bool = True
    bf16: bool | str = "auto"
    compile: bool = False
    compile_mode: str | None = None
    nan_check: str = "auto"

    def __post_init__(self) -> None:
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"fast_path.bf16: expected true, false or auto, got {self.bf16!r}")
        if self.nan_check not in NAN_CHECKS:
            raise ConfigError(f"fast_path.nan_check: expected one of {list(NAN_CHECKS)}, got {self.nan_check!r}")
        for key in ("fused_optimizer", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"fast_path.{key}: expected true or false, got {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, node: Any) -> FastPath:
        """From a config node (None or absent: the defaults; unknown keys are named)."""
        if node is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        mapping = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(mapping) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"fast_path: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**mapping)

    @classmethod
    def eager(cls) -> FastPath:
        """Everything off: eager fp32 PyTorch, checked every step."""
        return cls(fused_optimizer=False, bf16=False, compile=False, nan_check="step")


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(check()) for check in checks if callable(check))


def bf16_supported(accelerator: str) -> bool:
    """Whether bf16 autocast is faster than fp32 on ``accelerator`` (``cpu``, ``cuda``/``gpu``, ``auto``)."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if accelerator in ("cpu", "auto"):
        return cpu_has_bf16_matmul()
    return False


def resolve_precision(precision: Any, fast: FastPath, accelerator: str) -> Any:
    """``trainer.precision`` after the fast path: ``32-true`` (or 32) becomes ``bf16-mixed`` when
    ``fast.bf16`` is true, or ``auto`` and :func:`bf16_supported`; any other precision is the user's
    choice and is kept."""
    if str(precision) not in ("32-true", "32") or fast.bf16 is False:
        return precision
    if fast.bf16 is True or bf16_supported(str(accelerator)):
        return "bf16-mixed"
    return precision


def fused_optimizer_factory(factory: Callable[..., torch.optim.Optimizer], fast: FastPath
                            ) -> Callable[..., torch.optim.Optimizer]:
    """``factory`` (a partial ``torch.optim`` constructor from config) that builds the fused kernel
    when the fast path asks for it, the optimiser has one (:data:`FUSED_OPTIMIZERS`), the config
    set neither ``fused`` nor ``foreach`` and every parameter is a floating-point tensor on a device
    the kernel supports; otherwise the optimiser exactly as configured."""
    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {}) or {}
    if not fast.fused_optimizer or func not in FUSED_OPTIMIZERS or "fused" in keywords or "foreach" in keywords:
        return factory

    def build(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        groups = list(params)
        tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        supported = {"cpu", "cuda"}
        if tensors and all(t.device.type in supported and t.is_floating_point() for t in tensors):
            return factory(params=groups, fused=True, **kwargs)
        return factory(params=groups, **kwargs)

    return build


def compile_decoder(decoder: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """``decoder`` compiled in place (``nn.Module.compile``: parameter names, hence checkpoints,
    stay as they are) when ``fast.compile``; graphs dynamo cannot build fall back to eager with a
    warning instead of an error."""
    if not fast.compile:
        return decoder
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a decoder dynamo cannot trace runs eagerly
    decoder.compile(mode=fast.compile_mode)
    log.info("fast_path.compile: %s compiled (mode %s); the first steps include compilation",
             type(decoder).__name__, fast.compile_mode or "default")
    return decoder
