"""Building a prepared store from the data source named by ``dataset.kind`` (a converter of real
files or a synthetic-world generator), and reusing one that is up to date (:func:`ensure_store`).
``bdf-prepare`` and ``bdf-train`` (``dataset.auto_prepare``) call it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from braindecode_fw.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

# dataset.kind -> "module:function" converting ``dataset_cfg`` into ``dataset_cfg.store``; each returns
# the converter summary (braindecode_fw/data/convert/base.py REPORT_KEYS) whose "report" bdf-prepare
# prints. A kind not listed here is looked up as a Converter subclass of that kind in the module
# braindecode_fw/data/convert/<kind>.py, so a new shipped dataset is that module + its dataset config.
CONVERTERS = {
    "nsd": "braindecode_fw.data.convert.nsd:convert_nsd",
    "mindeye2": "braindecode_fw.data.convert.mindeye:convert_mindeye2",
    "mindeye1_avg": "braindecode_fw.data.convert.mindeye:convert_mindeye1_avg",
    "things_meg": "braindecode_fw.data.convert.things_meg:convert_things_meg",
}
# generated worlds: dataset.kind -> ("module:config class", "module:generator")
SYNTHETIC = {
    "synthetic_fmri": ("braindecode_fw.data.synthetic.world:SyntheticWorldConfig",
                       "braindecode_fw.data.synthetic.world:generate_world"),
    "synthetic_meg": ("braindecode_fw.data.synthetic.meg_world:SyntheticMEGWorldConfig",
                      "braindecode_fw.data.synthetic.meg_world:generate_meg_world"),
}
PREPARERS = (*SYNTHETIC, *CONVERTERS)


def _load(spec: str) -> Any:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _world_config(dataset_cfg: DictConfig):
    """The world config of a synthetic dataset (``dataset.world``), validated."""
    config_cls = _load(SYNTHETIC[dataset_cfg.kind][0])
    return config_cls.from_mapping(OmegaConf.to_container(dataset_cfg.world, resolve=True))


def _converter_function(obj: Any) -> Any:
    """A converter function as is; a :class:`~braindecode_fw.data.convert.base.Converter` subclass -> its
    ``convert`` classmethod."""
    from braindecode_fw.data.convert.base import Converter

    if isinstance(obj, type) and issubclass(obj, Converter):
        return obj.convert
    return obj


def _module_converter(kind: Any) -> Any:
    """The ``Converter`` subclass with ``kind`` in ``braindecode_fw/data/convert/<kind>.py``, or None."""
    import importlib
    import importlib.util

    from braindecode_fw.data.convert.base import Converter

    if not isinstance(kind, str) or not kind.isidentifier():
        return None
    name = f"braindecode_fw.data.convert.{kind}"
    if importlib.util.find_spec(name) is None:
        return None
    module = importlib.import_module(name)
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Converter) and getattr(v, "kind", None) == kind]
    return found[0].convert if found else None


def _converter(spec: str) -> Any:
    """``"package.module:function"`` or ``"package.module:ConverterClass"`` (``dataset.converter``) ->
    the converter function, or a clear error."""
    import importlib

    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise DataError(f"dataset.converter: expected 'package.module:function', got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"dataset.converter: cannot import {module!r} ({e}); is its folder on PYTHONPATH "
                         f"or the package installed?") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise DataError(f"dataset.converter: {module!r} has no function {name!r}")
    return _converter_function(fn)


def _guards_itself(fn: Any) -> bool:
    """Whether the converter function ``fn`` is a :class:`Converter`'s ``convert`` (whose ``run``
    applies :func:`check_existing_store` with its own fingerprint)."""
    from braindecode_fw.data.convert.base import Converter

    owner = getattr(fn, "__self__", None)
    return isinstance(owner, type) and issubclass(owner, Converter)


def _noop_world(store: Path, meta: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """The summary of a synthetic world found up to date at ``store`` (nothing generated)."""
    report = (f"synthetic world {store} is up to date (built from this dataset.world: fingerprint {fingerprint}, "
              f"version {meta.get('version')}); nothing to do (dataset.force=true regenerates it)")
    return {"noop": True, "store": str(store), "store_version": meta.get("version"),
            "config_fingerprint": fingerprint, "seconds": 0.0, "report": report}


def _flag(dataset_cfg: DictConfig, key: str) -> bool:
    """``dataset.<key>`` (``force``/``replace``) as a bool; the converters' config dataclasses type
    them too, this covers the synthetic worlds and ``dataset.converter`` functions."""
    value = dataset_cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"dataset.{key}: expected true or false, got {value!r}")
    return value


def prepare(dataset_cfg: DictConfig) -> dict[str, Any]:
    """Convert/generate the dataset described by ``dataset_cfg`` into ``dataset_cfg.store``.

    ``dataset.converter: "package.module:function"`` (or ``"package.module:ConverterClass"``) names a
    converter outside the package (a lab's own format; docs/extending.md): it is called with the
    ``dataset`` config, writes the store with :class:`~braindecode_fw.data.store.StoreWriter` and
    returns a summary whose ``report`` is printed. Otherwise ``dataset.kind`` picks one of
    :data:`CONVERTERS` or :data:`SYNTHETIC`, or the ``Converter`` of that kind in
    ``braindecode_fw/data/convert/<kind>.py``.

    What is already at ``dataset.store`` is never replaced silently
    (:func:`~braindecode_fw.data.convert.common.check_existing_store`): a store built from the same
    configuration is a no-op (the summary has ``noop: true``; ``dataset.force=true`` rebuilds it),
    one built from another configuration is refused unless ``dataset.replace=true``. A plain
    converter function declares no fingerprint: any finished store there needs ``dataset.replace=true``.
    """
    from braindecode_fw.data.convert.common import check_existing_store

    guard = {"force": _flag(dataset_cfg, "force"), "replace": _flag(dataset_cfg, "replace"),
             "name": dataset_cfg.get("name")}
    if dataset_cfg.get("converter"):
        fn = _converter(dataset_cfg.converter)
        if not _guards_itself(fn) and dataset_cfg.get("store"):
            check_existing_store(dataset_cfg.store, None, what=str(dataset_cfg.converter), **guard)
        summary = fn(dataset_cfg)
        if not isinstance(summary, dict):
            raise DataError(f"dataset.converter: {dataset_cfg.converter} returned {type(summary).__name__}, "
                             f"expected a summary dict (with a 'report' line to print)")
        return summary
    kind = dataset_cfg.get("kind")
    if kind in SYNTHETIC:
        world = _world_config(dataset_cfg)
        store = Path(dataset_cfg.store)
        fingerprint = world.fingerprint()
        existing = check_existing_store(store, fingerprint, what="synthetic world", config=dataclasses.asdict(world),
                                        config_prefix="dataset.world", source="synthetic", **guard)
        if existing is not None:
            return _noop_world(store, existing, fingerprint)
        generate = _load(SYNTHETIC[kind][1])
        return generate(world, store, name=dataset_cfg.name, overwrite=True)
    if kind in CONVERTERS:
        import importlib

        module, function = CONVERTERS[kind].split(":")
        return getattr(importlib.import_module(module), function)(dataset_cfg)
    found = _module_converter(kind)
    if found is not None:
        return found(dataset_cfg)
    raise DataError(f"dataset.kind: no preparer for {kind!r}; available: {list(PREPARERS)} (or set "
                     f"dataset.converter: 'package.module:function' for a converter of your own)")


def ensure_store(dataset_cfg: DictConfig) -> Path:
    """Return the prepared store path.

    Synthetic worlds with ``dataset.auto_prepare`` go through :func:`prepare`: generated on first
    use, reused when up to date, and refused (never regenerated in place) when the store there was
    generated from another ``dataset.world``. Any other store is used as is when finished; a folder
    without ``dataset.json`` or a missing store fails with what to do.
    """
    store = Path(dataset_cfg.store)
    generated = dataset_cfg.get("kind") in SYNTHETIC
    if generated and bool(dataset_cfg.get("auto_prepare", False)):
        summary = prepare(dataset_cfg)
        if not summary.get("noop"):
            log.info("synthetic world generated into %s in %.1f s", store, summary["seconds"])
        return store
    command = f"bdf-prepare dataset={dataset_cfg.name}" + ("" if generated else " dataset.root=<raw data root>")
    if (store / "dataset.json").exists():
        return store
    if store.is_dir():
        raise MissingFileError(f"dataset.store: {store} is not a finished store (no dataset.json), e.g. a half-copied "
                               f"store or another folder; copy the whole store again, or rebuild it there with "
                               f"`{command} dataset.replace=true`")
    raise MissingFileError(f"dataset.store: prepared store not found at {store}; run `{command}`")


def describe(summary: dict[str, Any]) -> str:
    """Human-readable report of a freshly generated synthetic world: per subject its size and oracle
    (fMRI: measured ncsnr + top-1; MEG: sources, SNR, clamping + top-1/top-5, both directions)."""
    if summary.get("modality") == "meg":
        return _describe_meg(summary)
    lines = ["subject  voxels  trials  ncsnr p5/p50/p95 (measured, NSD formula)  oracle b→i / i→b top-1"]
    for s, st in summary["subjects"].items():
        m = st["ncsnr_measured_percentiles"]
        o = st["oracle"]
        lines.append(f"{s:<8} {st['n_voxels']:>6}  {st['n_trials']:>6}  "
                     f"{m['5']:.3f} / {m['50']:.3f} / {m['95']:.3f}{'':>19}"
                     f"{o['brain_to_image_top1']:.3f} / {o['image_to_brain_top1']:.3f}")
    mean = summary["oracle"]["mean"]
    lines.append(f"mean oracle top-1: brain→image {mean['brain_to_image_top1']:.3f}, image→brain "
                 f"{mean['image_to_brain_top1']:.3f}; chance {summary['oracle']['chance_top1']:.4f}; "
                 f"generated in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def _describe_meg(summary: dict[str, Any]) -> str:
    lines = ["subject  sources  trials  sensors x times  snr    clamped   oracle b→i top-1/top-5   i→b top-1/top-5"]
    for s, st in summary["subjects"].items():
        o = st["oracle"]
        lines.append(f"{s:<8} {st['n_sources']:>7}  {st['n_trials']:>6}  {st['n_sensors']:>7} x {st['n_times']:<5}  "
                     f"{st['snr']:<5.3f}  {st['clamped_fraction']:.1e}   "
                     f"{o['brain_to_image_top1']:.3f} / {o['brain_to_image_top5']:.3f}{'':>10}"
                     f"{o['image_to_brain_top1']:.3f} / {o['image_to_brain_top5']:.3f}")
    oracle = summary["oracle"]
    mean = oracle["mean"]
    lines.append(f"mean oracle brain→image top-1 {mean['brain_to_image_top1']:.3f}, top-5 "
                 f"{mean['brain_to_image_top5']:.3f}; image→brain top-1 {mean['image_to_brain_top1']:.3f}, top-5 "
                 f"{mean['image_to_brain_top5']:.3f}; chance top-1 {oracle['chance_top1']:.4f}, top-5 "
                 f"{oracle['chance_top5']:.4f}; generated in {summary['seconds']:.1f} s")
    return "\n".join(lines)
