"""Config mappings -> the dataclasses that mirror them (synthetic worlds, converters, demo models).

One source per default: the packaged YAML file under ``braindecode_fw/conf/`` (what a user reads and
overrides, with a comment per key) holds every default value; the dataclass declares the fields with
their types, docstrings and ranges, and :func:`config_dataclass` fills every field left unset from that
YAML (read once). ``SyntheticWorldConfig()`` in Python therefore equals the composed Hydra config of
``dataset=synthetic``, and editing a default means editing one line of YAML.

Hydra already rejects unknown keys of structured configs; these dataclasses are built from plain
``dataset`` mappings instead, so the checks happen here, once, while the dataclass is built: every
unknown key is named with the known ones, and every value is checked against its field's annotation
(``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``tuple[...]``, ``dict``, ``X | None``) and the
range declared next to the field (:func:`setting`), e.g. ``ValueError("dataset.world.seed: expected an
integer, got 'abc'")`` or ``"dataset.chunk_trials: expected an integer >= 1, got -5"``: the message
names the full config key, what was given and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from braindecode_fw.errors import ConfigError, UnknownNameError

T = TypeVar("T")
CONF_ROOT = Path(__file__).resolve().parent / "conf"


class _FromYaml:
    """Sentinel default of a :func:`config_dataclass` field: "take the packaged YAML's value"."""

    _instance: _FromYaml | None = None

    def __new__(cls) -> _FromYaml:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<default from the packaged YAML>"

    def __deepcopy__(self, memo: dict) -> _FromYaml:
        return self


FROM_YAML: Any = _FromYaml()


def setting(*, min: float | None = None, max: float | None = None, gt: float | None = None,
            lt: float | None = None) -> Any:
    """A field whose default comes from the packaged YAML, with an optional range checked when the
    dataclass is built: ``min``/``max`` inclusive, ``gt``/``lt`` exclusive (for lists: every item)."""
    bounds = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("lt", lt)) if v is not None}
    return dataclasses.field(default=FROM_YAML, metadata=bounds)


# ------------------------------------------------------------------------------------------------
# the packaged YAML defaults
# ------------------------------------------------------------------------------------------------


@functools.cache
def _load_yaml(relpath: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = CONF_ROOT / relpath
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _no_interpolation(value: Any) -> Any:
    """Interpolations (``${paths.data_dir}/...``) need the composed config: outside Hydra they are None."""
    if isinstance(value, str) and "${" in value:
        return None
    if isinstance(value, dict):
        return {k: _no_interpolation(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_interpolation(v) for v in value]
    return value


def yaml_section(relpath: str, section: str | None = None) -> dict[str, Any]:
    """The mapping at ``section`` (dotted) of ``braindecode_fw/conf/<relpath>``, interpolations as None
    (a fresh copy: callers may modify it)."""
    node: Any = _load_yaml(relpath)
    for part in (section.split(".") if section else []):
        if not isinstance(node, dict) or part not in node:
            raise UnknownNameError(f"braindecode_fw/conf/{relpath}: no section {section!r}")
        node = node[part]
    return _no_interpolation(copy.deepcopy(node))


# ------------------------------------------------------------------------------------------------
# checking values against annotations
# ------------------------------------------------------------------------------------------------

_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _NAMES:
        return _NAMES[tp]
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list (items: {_describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the annotation ``tp`` asks (lists for ``list``, tuples for ``tuple``; numbers are
    never converted: an int stays an int where a float is allowed), or :class:`_Mismatch`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_check_value(v, args[0], key) for v in value] if args else list(value)
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _check_range(value: Any, bounds: Mapping[str, float], key: str, expected: str) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = (v >= bounds.get("min", v) and v <= bounds.get("max", v)
              and ("gt" not in bounds or v > bounds["gt"]) and ("lt" not in bounds or v < bounds["lt"]))
        if not ok:
            parts = [f">= {bounds['min']}" if "min" in bounds else "", f"> {bounds['gt']}" if "gt" in bounds else "",
                     f"< {bounds['lt']}" if "lt" in bounds else "", f"<= {bounds['max']}" if "max" in bounds else ""]
            rng = " and ".join(p for p in parts if p)
            what = "every item" if isinstance(value, (list, tuple)) else expected
            raise ConfigError(f"{key}: expected {what} {rng}, got {value!r}")


def check_keys(cls: type, mapping: Mapping[str, Any], message: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"{message} {unknown}; known keys: {sorted(known)}")


def _build_nested(sub_cls: type, value: Any, default: Any, key: str) -> Any:
    """A nested dataclass field from a (partial) mapping: missing keys from the parent's YAML section."""
    if isinstance(value, sub_cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(sub_cls))}, "
                         f"got {value!r}")
    check_keys(sub_cls, value, f"{key}: unknown key(s)")
    merged = {**(default if isinstance(default, Mapping) else {}), **value}
    return build_checked(sub_cls, merged, key)


def build_checked(cls: type[T], mapping: Mapping[str, Any], key: str) -> T:
    """``cls(**mapping)`` for a plain dataclass (no YAML source of its own), every field checked."""
    obj = cls(**mapping)
    check_fields(obj, key)
    return obj


def check_fields(obj: Any, key: str, defaults: Mapping[str, Any] | None = None) -> None:
    """Check (and normalise: lists, tuples, nested dataclasses) every field of the dataclass ``obj``
    against its annotation and declared range; errors name ``<key>.<field>``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        full = f"{key}.{f.name}" if key else f.name
        tp = hints.get(f.name, Any)
        value = getattr(obj, f.name)
        nested = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if nested:
            value = _build_nested(nested[0], value, (defaults or {}).get(f.name), full)
        else:
            try:
                value = _check_value(value, tp, full)
            except _Mismatch:
                raise ConfigError(f"{full}: expected {_describe(tp)}, got {value!r}") from None
            if f.metadata:
                _check_range(value, f.metadata, full, _describe(tp).split(" or ")[0])
        object.__setattr__(obj, f.name, value)


def config_dataclass(source: str, section: str | None = None, *, key: str,
                     also: tuple[tuple[str, str, tuple[str, ...]], ...] = ()) -> Any:
    """Class decorator: a dataclass whose defaults are the packaged YAML's values.

    ``source``/``section``: the YAML file under ``braindecode_fw/conf/`` and the dotted section that the
    dataclass mirrors (``"dataset/synthetic.yaml", "world"``); ``key``: the config path of that section
    in error messages (``dataset.world``); ``also``: ``(file, section, fields)`` for fields whose default
    lives in another file (the demo models take the scene size from the synthetic world). Every field
    must default to :data:`FROM_YAML` (plain or via :func:`setting`); a field the YAML lacks fails when
    the first instance is built. After construction every field is checked (:func:`check_fields`), then
    the class's own ``__post_init__`` runs (cross-field checks)."""

    def wrap(cls: type[T]) -> type[T]:
        own_post_init = cls.__dict__.get("__post_init__")

        def defaults() -> dict[str, Any]:
            out = yaml_section(source, section)
            for other, other_section, names in also:
                extra = yaml_section(other, other_section)
                out.update({n: extra[n] for n in names})
            return out

        def __post_init__(self) -> None:
            values = defaults()
            for f in dataclasses.fields(self):
                if getattr(self, f.name) is FROM_YAML:
                    if f.name not in values:
                        raise UnknownNameError(f"{key}.{f.name}: no default in braindecode_fw/conf/{source}")
                    object.__setattr__(self, f.name, values[f.name])
            check_fields(self, key, values)
            if own_post_init is not None:
                own_post_init(self)

        cls.__post_init__ = __post_init__
        cls.yaml_source = (source, section)
        cls.yaml_defaults = staticmethod(defaults)
        cls.config_key = key
        return dataclasses.dataclass(cls)

    return wrap


def dataclass_from_mapping(cls: type[T], mapping: Mapping[str, Any], *, what: str,
                           nested: Mapping[str, type] | None = None, nested_path: str = "dataset.world") -> T:
    """``cls(**mapping)``: missing keys take the packaged YAML's defaults, nested mappings become their
    dataclasses (their missing keys too). Unknown keys raise ``ValueError("dataset: unknown <what>
    key(s) [...]; known keys: [...]")``; unknown keys of a nested field ``f`` raise ``"<nested_path>.<f>:
    unknown key(s) ..."``; a wrong type or a value out of range names the full key (module docstring)."""
    check_keys(cls, mapping, f"dataset: unknown {what} key(s)")
    kw = dict(mapping)
    for key, sub_cls in (nested or {}).items():
        if key in kw and isinstance(kw[key], Mapping):
            check_keys(sub_cls, kw[key], f"{nested_path}.{key}: unknown key(s)")
    return cls(**kw)


#: The stable core of the task configs: key -> (annotation, range). Checked by the console entry
#: points right after composition, before any data is touched (keys a command's config lacks are
#: skipped), so ``trainer.max_epochs=abc`` or ``data.batch_size=0`` is one line naming the key.
CORE_KEYS: dict[str, tuple[Any, dict[str, float]]] = {
    "seed": (int, {}),
    "trainer.max_epochs": (int | None, {"min": 1}),
    "trainer.accumulate_grad_batches": (int, {"min": 1}),
    "optim.optimizer.lr": (float, {"gt": 0}),
    "optim.optimizer.weight_decay": (float, {"min": 0}),
    "data.batch_size": (int, {"min": 1}),
    "data.num_workers": (int, {"min": 0}),
    "evaluation.subset_size": (int, {"min": 2}),
    "evaluation.n_subsets": (int, {"min": 1}),
    "evaluation.large_subset_size": (int, {"min": 2}),
    "retrieval.subset_size": (int, {"min": 2}),
    "retrieval.n_subsets": (int, {"min": 1}),
    "metrics.eval_size": (int, {"min": 8}),
    "reconstruction.n_images": (int, {"min": 0}),
    "n_samples": (int, {"min": 1}),
    "batch_size": (int | None, {"min": 1}),
    "trial_seconds": (float | None, {"gt": 0}),
    "limit": (int | None, {"min": 1}),
    "optimized_metric": (str | None, {}),
}

#: What a finished job's metrics are called (``result.json``): ``optimized_metric`` must name one,
#: so a name without these prefixes can be refused before hours of training rather than after.
METRIC_PREFIXES = ("test/", "val/")


def check_core(cfg: Any) -> None:
    """Type and range of every :data:`CORE_KEYS` entry present in the composed config ``cfg``;
    raises ``ConfigError("<key>: expected ..., got ...")``; ``optimized_metric`` must start with one of
    :data:`METRIC_PREFIXES`. Interpolations are resolved where they
    can be (Hydra's own ``${hydra:...}`` exist only inside a run and are skipped)."""
    from omegaconf import OmegaConf

    absent = object()
    for key, (tp, bounds) in CORE_KEYS.items():
        try:
            value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an interpolation only a running job can resolve
            continue
        if value is absent:
            continue
        expected = _describe(tp)
        try:
            _check_value(value, tp, key)
        except _Mismatch:
            raise ConfigError(f"{key}: expected {expected}, got {value!r}") from None
        _check_range(value, bounds, key, expected)
    metric = OmegaConf.select(cfg, "optimized_metric", default=None, throw_on_missing=False)
    if isinstance(metric, str) and metric and not metric.startswith(METRIC_PREFIXES):
        raise ConfigError(f"optimized_metric: {metric!r} is not a metric a job reports; those start with "
                          f"{' or '.join(repr(p) for p in METRIC_PREFIXES)}, e.g. 'test/brain_to_image_top1'")
