"""Config mappings -> the dataclasses that mirror them (synthetic worlds, converters).

Hydra already rejects unknown keys of structured configs; these dataclasses are built from plain
``dataset`` mappings instead, so the check happens here, once: every unknown key is named, with the
known ones, in the config path where it was found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def check_keys(cls: type, mapping: Mapping[str, Any], message: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{message} {unknown}; known keys: {sorted(known)}")


def dataclass_from_mapping(cls: type[T], mapping: Mapping[str, Any], *, what: str,
                           nested: Mapping[str, type] | None = None, nested_path: str = "dataset.world") -> T:
    """``cls(**mapping)`` with nested mappings turned into their dataclasses (``nested``: field ->
    class). Unknown keys raise ``ValueError("dataset: unknown <what> key(s) [...]; known keys:
    [...]")``; unknown keys of a nested field ``f`` raise ``"<nested_path>.<f>: unknown key(s) ..."``."""
    check_keys(cls, mapping, f"dataset: unknown {what} key(s)")
    kw = dict(mapping)
    for key, sub_cls in (nested or {}).items():
        if key in kw and isinstance(kw[key], Mapping):
            check_keys(sub_cls, kw[key], f"{nested_path}.{key}: unknown key(s)")
            kw[key] = sub_cls(**kw[key])
    return cls(**kw)
