"""Console entry points. Each is a Hydra app over the configs shipped inside the package
(``braindecode_fw/conf/``) that calls one task function. Users add their own config folder with
Hydra's ``--config-dir <folder>`` or ``hydra.searchpath=[file://<folder>]``;
``BDF_CONFIG_DIR`` replaces the shipped tree altogether.

User errors (bad config keys, missing or invalid data, unknown subjects, ...: the
:mod:`braindecode_fw.errors` types, see :func:`is_user_error`) are reported as one line
``bdf-<cmd>: error: <what and where>`` with exit code 2; set ``BDF_DEBUG=1`` for the full
traceback. Any other exception is a bug: its traceback is printed, followed by one line saying so,
and the exit code is 1.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from braindecode_fw.errors import ConfigError

#: The shipped config tree; inside the package so that a wheel carries it (pyproject package-data).
CONF_DIR = Path(os.environ.get("BDF_CONFIG_DIR", Path(__file__).resolve().parent / "conf"))

log = logging.getLogger("braindecode_fw")

if not OmegaConf.has_resolver("bdf_uid"):
    # one random id per process: unique run directories even for jobs started in the same second
    OmegaConf.register_new_resolver("bdf_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def is_user_error(exc: BaseException) -> bool:
    """Whether the CLI reports ``exc`` as a one-line user error (exit 2) rather than a bug.

    User errors: the project's :class:`~braindecode_fw.errors.UserError` types (also when wrapped,
    e.g. by Hydra's instantiate), Hydra composition errors, OmegaConf errors (a ``???`` value left
    unset, a key a custom config lacks, a value of the wrong type), a config node whose keys do not
    fit its target's signature, Lightning's refusal of a trainer setting (``trainer.precision=...``),
    and operating-system errors on a named file (permission denied, disk full). Everything else is a
    bug in the framework or a library: it keeps its traceback.
    """
    from hydra.errors import HydraException, InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    from braindecode_fw.errors import is_signature_mismatch
    from braindecode_fw.errors import is_user_error as raised_by_user_input

    if raised_by_user_input(exc):
        return True
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__
        if cause is not None and is_signature_mismatch(cause):  # a node's keys do not fit its _target_
            return True
        return cause is None or is_user_error(cause)
    if isinstance(exc, HydraException | OmegaConfBaseException | MisconfigurationException):
        return True
    return isinstance(exc, OSError) and getattr(exc, "filename", None) is not None


def _describe_error(exc: BaseException) -> str:
    """A one-line description of ``exc`` and its causes."""
    from hydra.errors import InstantiationException

    msgs = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = _one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)
        if isinstance(e, InstantiationException):
            text = text.replace("Error in call to target", "cannot build")
        if text and text not in msgs:
            msgs.append(text)
        e = e.__cause__ or e.__context__
    return ": ".join(msgs) if msgs else type(exc).__name__


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def user_config_dirs(argv: list[str], prog: str) -> list[str]:
    """The folders given with Hydra's ``--config-dir``/``-cd`` (each must exist)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd"):
            value = argv[i + 1] if i + 1 < len(argv) else ""
        elif arg.startswith("--config-dir="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if not value or not Path(value).is_dir():
            _fail(prog, f"--config-dir: folder not found: {value or '(none given)'} (expected a folder of "
                        f"config groups, e.g. <folder>/experiment/<name>.yaml)")
        dirs.append(str(Path(value).resolve()))
    return dirs


def _with_search_path(overrides: list[str], config_dirs: list[str]) -> list[str]:
    """``overrides`` with ``config_dirs`` put in front of any ``hydra.searchpath`` override."""
    if not config_dirs:
        return overrides
    given = [o for o in overrides if o.startswith("hydra.searchpath=")]
    rest = [o for o in overrides if o not in given]
    entries = [f"file://{d}" for d in config_dirs]
    for o in given:
        entries += [e.strip() for e in o.split("=", 1)[1].strip().strip("[]").split(",") if e.strip()]
    return [f"hydra.searchpath=[{','.join(entries)}]", *rest]


def check_overrides(config_name: str, overrides: list[str], prog: str, config_dirs: list[str] | None = None) -> None:
    """Compose once before Hydra runs, to turn composition errors into one clear line.

    Unknown keys get a did-you-mean suggestion; unknown group options list the available ones; the
    stable core keys (``braindecode_fw.schema.CORE_KEYS``) are checked for type and range.
    ``config_dirs`` (``--config-dir``) are searched after the shipped configs, as Hydra does.
    Sweeps (``-m``) are checked by Hydra itself.
    """
    overrides = _with_search_path(overrides, config_dirs or [])
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                cfg = compose(config_name, overrides=overrides)
            except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
                _fail(prog, _explain_composition_error(config_name, overrides, e))
            from braindecode_fw.schema import check_core

            try:
                check_core(cfg)
            except ValueError as e:
                _fail(prog, _one_line(e))
    finally:
        GlobalHydra.instance().clear()


def _explain_composition_error(config_name: str, overrides: list[str], exc: Exception) -> str:
    from hydra import compose

    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        bad = [o for o in overrides if o.split("=", 1)[0].lstrip("~+") == full_key]
        parent, _, leaf = full_key.rpartition(".")
        suggestion = ""
        try:
            base = compose(config_name, overrides=[o for o in overrides if o not in bad])
            node = OmegaConf.select(base, parent) if parent else base
            if isinstance(node, DictConfig):
                keys = [str(k) for k in node.keys()]
                # a truncated name (retrieval.subset) means the key it starts: difflib would
                # rank retrieval.n_subsets first
                close = [k for k in keys if k.startswith(leaf)][:1] or difflib.get_close_matches(leaf, keys, n=1)
                if close:
                    suggestion = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?"
        except Exception:  # noqa: BLE001 - the suggestion is best-effort
            pass
        where = f" in override '{bad[0]}'" if bad else ""
        return f"unknown config key '{full_key}'{where}{suggestion} (use +{full_key}=... to add a new key)"
    text = _one_line(exc)
    text = text.replace("Available options in", "available options in").replace("; ;", ";")
    return text


def _remove_stub_run_dir(cfg: DictConfig) -> None:
    """After a one-line user error: remove the run folder when it holds only what Hydra wrote
    (``.hydra/``, the log, the resolved config), so mistakes leave no stub runs behind; a folder with any output of
    the task is kept."""
    import shutil

    try:
        run_dir = Path(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - no resolvable run folder: nothing to clean
        return
    if not run_dir.is_dir():
        return
    contents = list(run_dir.iterdir())
    # config_resolved.yaml: written before training starts, only a copy of the config
    if all(p.name in (".hydra", "config_resolved.yaml") or (p.is_file() and p.suffix == ".log") for p in contents):
        logging.shutdown()  # release the log file before removing it
        shutil.rmtree(run_dir, ignore_errors=True)


def run_app(config_name: str, task: Callable[[DictConfig], Any], prog: str) -> None:
    """Run ``task`` as a Hydra app with one-line user errors."""
    argv = sys.argv[1:]
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    is_special = any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-c", "--cfg",
                           "--shell-completion", "-sc") or a.startswith("--cfg") for a in argv)
    config_dirs = user_config_dirs(argv, prog)
    if not is_special:
        check_overrides(config_name, overrides, prog, config_dirs)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        from braindecode_fw.ops.console import route_library_logging
        from braindecode_fw.ops.loggers import finish_wandb

        route_library_logging()
        try:
            return task(cfg)
        except Exception as e:
            if not is_user_error(e):
                log.exception("%s failed (run directory %s)", prog, cfg.paths.get("output_dir", "?"))
                print(f"{prog}: internal error: {type(e).__name__} is not a mistake in your input but a bug "
                      f"in braindecode_fw or a library it calls; please report it with the traceback "
                      f"printed here and the run folder's .hydra/ configs", file=sys.stderr)
                raise
            if os.environ.get("BDF_DEBUG"):
                raise
            log.debug("error details", exc_info=True)
            _remove_stub_run_dir(cfg)
            _fail(prog, _describe_error(e))
        finally:
            finish_wandb()  # a failed job must not leave a W&B run open for the next job of a sweep

    if not Path(sys.argv[0]).is_file():
        # keep a real script path when there is one: Lightning's DDP launcher re-runs sys.argv[0]
        # for the other ranks
        sys.argv[0] = prog
    _main()


def _train(cfg: DictConfig) -> float | None:
    from braindecode_fw.tasks.train import train

    return _optimized(cfg, train(cfg))


def _adapt(cfg: DictConfig) -> float | None:
    from braindecode_fw.tasks.adapt import adapt

    return _optimized(cfg, adapt(cfg))


def _optimized(cfg: DictConfig, result: dict) -> float | None:
    """The value a sweeper optimises (``optimized_metric``), with a clear error when absent."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in result:
        options = sorted(k for k in result if k.startswith(("test/", "val/")))
        raise ConfigError(f"optimized_metric: {name!r} was not produced; available: {options}")
    return float(result[name])


def _evaluate(cfg: DictConfig) -> None:
    from braindecode_fw.tasks.evaluate import evaluate

    evaluate(cfg)


def _reconstruct(cfg: DictConfig) -> None:
    from braindecode_fw.tasks.reconstruct import reconstruct

    reconstruct(cfg)


def _prepare(cfg: DictConfig) -> None:
    from braindecode_fw.tasks.prepare import prepare_task

    prepare_task(cfg)


def _bench(cfg: DictConfig) -> None:
    from braindecode_fw.tasks.bench import bench

    bench(cfg)


def _dashboard(cfg: DictConfig) -> None:
    from braindecode_fw.ops.dashboard import dashboard

    dashboard(cfg.tool, cfg.run, port=cfg.port, host=cfg.host, print_only=cfg.print_only)


def dashboard_main() -> None:
    run_app("dashboard", _dashboard, "bdf-dashboard")


def train_main() -> None:
    run_app("train", _train, "bdf-train")


def adapt_main() -> None:
    run_app("adapt", _adapt, "bdf-adapt")


def evaluate_main() -> None:
    run_app("evaluate", _evaluate, "bdf-evaluate")


def reconstruct_main() -> None:
    run_app("reconstruct", _reconstruct, "bdf-reconstruct")


def prepare_main() -> None:
    run_app("prepare", _prepare, "bdf-prepare")


def bench_main() -> None:
    run_app("bench", _bench, "bdf-bench")
