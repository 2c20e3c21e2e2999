"""Search-space parsing and the ask/tell loop of the ``bdf_optuna`` sweeper.

Hydra's plugin scan skips modules whose name starts with ``_``, so Optuna is imported here only
when a sweep actually starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, QuotedString
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from braindecode_fw.io import atomic_write_text

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
_CATEGORICAL_TYPES = (bool, int, float, str, type(None))


class SweepConfigError(ValueError):
    """The sweeper's configuration (search space, direction, storage) or the task's return is wrong."""


# ---- search space ---------------------------------------------------------------------------

@dataclass
class SearchSpace:
    """Optuna distributions for the swept keys plus the overrides every job gets unchanged.

    ``verbatim`` holds, per key, the choices that are not plain scalars (lists, dicts): Optuna
    stores them as their override strings, which are passed to Hydra as they are.
    """

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    verbatim: dict[str, set[str]] = field(default_factory=dict)

    def format_value(self, key: str, value: Any) -> str:
        """``value`` (as Optuna stores it) in Hydra's override grammar."""
        if isinstance(value, str) and value in self.verbatim.get(key, ()):
            return value
        return Override._get_value_element_as_str(value)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of one job: the fixed ones, then one ``key=value`` per swept key."""
        return [*self.fixed, *(f"{k}={self.format_value(k, params[k])}" for k in self.distributions)]


def _param_line(key: str, value: Any) -> str:
    """One ``hydra.sweeper.params`` entry as an override line (strings are override grammar)."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        value = OmegaConf.to_container(value, resolve=True)
    text = value if isinstance(value, str) else Override._get_value_element_as_str(value)
    return f"{key}={text}"


def distribution_for(override: Override) -> tuple[BaseDistribution, set[str]]:
    """The Optuna distribution of one sweep override, and its verbatim (non-scalar) choices.

    ``interval(a,b)`` -> FloatDistribution; ``int(interval(a,b))`` -> IntDistribution;
    ``tag(log, ...)`` sets ``log``; ``range(a,b[,step])`` -> Int/FloatDistribution over the values
    Hydra's range yields (stop excluded) with ``step``; ``choice(...)`` / ``a,b,c`` ->
    CategoricalDistribution.
    """
    key = override.get_key_element()
    value = override.value()
    tags = getattr(value, "tags", set()) or set()
    use_log = "log" in tags
    try:
        if override.is_interval_sweep():
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=use_log), set()
            return FloatDistribution(float(value.start), float(value.end), log=use_log), set()
        if override.is_range_sweep():
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError("the range is empty")
            step = abs(value.step)
            if use_log and step != 1:
                raise ValueError("tag(log, range(...)) needs step 1 (Optuna cannot combine log and step)")
            if all(isinstance(v, int) for v in values):
                return IntDistribution(min(values), max(values), log=use_log, step=1 if use_log else int(step)), set()
            if use_log:
                raise ValueError("tag(log, ...) on a float range: use tag(log, interval(a,b))")
            return FloatDistribution(float(min(values)), float(max(values)), step=float(step)), set()
        if override.is_choice_sweep():
            choices: list[Any] = []
            verbatim: set[str] = set()
            for item in override.sweep_iterator():
                if isinstance(item, QuotedString):
                    item = item.text
                if not isinstance(item, _CATEGORICAL_TYPES):
                    item = Override._get_value_element_as_str(item)
                    verbatim.add(item)
                choices.append(item)
            if not choices:
                raise ValueError("no choices")
            return CategoricalDistribution(choices), verbatim
    except ValueError as e:
        raise SweepConfigError(f"search space: {key}={override.get_value_string()}: {e}") from None
    raise SweepConfigError(f"search space: {key}={override.get_value_string()}: unsupported sweep type")


def build_search_space(params: Mapping[str, Any] | None, arguments: Sequence[str],
                       parser: OverridesParser | None = None) -> SearchSpace:
    """Merge ``hydra.sweeper.params`` with the command-line overrides (the command line wins).

    Sweep values become Optuna distributions; plain values (from either source) are passed to
    every job as ordinary overrides.
    """
    parser = parser or OverridesParser.create()
    lines = [_param_line(k, v) for k, v in (params or {}).items()]
    merged: dict[str, Override] = {}
    for o in parser.parse_overrides([*lines, *arguments]):
        name = o.get_key_element().lstrip("~+")
        merged.pop(name, None)  # a later entry replaces an earlier one and takes its place at the end
        merged[name] = o
    space = SearchSpace()
    for o in merged.values():
        if o.is_sweep_override():
            key = o.get_key_element()
            space.distributions[key], verbatim = distribution_for(o)
            if verbatim:
                space.verbatim[key] = verbatim
        else:
            space.fixed.append(o.input_line or f"{o.get_key_element()}={o.get_value_element_as_str()}")
    return space


def describe_distribution(dist: BaseDistribution) -> str:
    """A short human form of a distribution for the log."""
    if isinstance(dist, CategoricalDistribution):
        return f"choice{tuple(dist.choices)}"
    if isinstance(dist, FloatDistribution | IntDistribution):
        kind = "int" if isinstance(dist, IntDistribution) else "float"
        extra = ", log" if dist.log else (f", step={dist.step}" if dist.step not in (None, 1) else "")
        return f"{kind}[{dist.low}, {dist.high}{extra}]"
    return repr(dist)


# ---- jobs -----------------------------------------------------------------------------------

class TrialFailed(RuntimeError):
    """A job ended with ``sys.exit(<non-zero>)`` (e.g. a one-line CLI error); its trial fails."""


def _raised_by_submitit(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("submitit"):
            return True
        tb = tb.tb_next
    return False


class TrialTask:
    """Wraps the task function so that a job that calls ``sys.exit(<non-zero>)`` becomes a failed
    trial (an exception Hydra's ``run_job`` records) rather than the end of the whole sweep.

    Exits raised by submitit's preemption/timeout handler (requeue) pass through untouched.
    Picklable, for the submitit launchers.
    """

    def __init__(self, task_function: Callable[[DictConfig], Any]) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as e:
            if e.code in (None, 0) or _raised_by_submitit(e):
                raise
            raise TrialFailed(f"the job exited with status {e.code} (its error is in the job's log)") from e


def _value_of(ret: JobReturn, metric: str | None) -> float:
    value = ret.return_value
    if isinstance(value, bool) or not isinstance(value, int | float):
        name = metric or "null"
        raise SweepConfigError(
            f"the task returned {value!r} ({type(value).__name__}), not a float: the Optuna sweeper "
            f"optimises the value of `optimized_metric` (now {name!r}); set optimized_metric to a "
            "metric the task produces, e.g. optimized_metric=test/brain_to_image_top1")
    return float(value)


def _job_error(ret: JobReturn) -> str:
    err = getattr(ret, "_return_value", None)
    if isinstance(err, BaseException):
        return f"{type(err).__name__}: {err}"
    return str(err)


def _consecutive_runs(numbers: Sequence[int]) -> list[list[int]]:
    """Split trial numbers into runs of consecutive numbers (one launcher call each)."""
    runs: list[list[int]] = []
    for i, n in enumerate(numbers):
        if runs and n == numbers[i - 1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


# ---- the search -----------------------------------------------------------------------------

def make_sampler(sampler: Any) -> optuna.samplers.BaseSampler | None:
    """The configured sampler: already built by Hydra, built here from a ``_target_`` node, or None."""
    if sampler is None or isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if isinstance(sampler, Mapping | DictConfig) and "_target_" in sampler:
        return instantiate(sampler)
    raise SweepConfigError(f"hydra.sweeper.sampler: expected a node with _target_, got {sampler!r}")


def direction_name(direction: Any) -> str:
    name = getattr(direction, "name", direction)
    if name not in ("minimize", "maximize"):
        raise SweepConfigError(f"hydra.sweeper.direction: {direction!r}; use minimize or maximize")
    return str(name)


def _prepare_storage(storage: str | None) -> str | None:
    """Create the folder of a ``sqlite:///<path>`` database (SQLite does not)."""
    if storage and storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return storage


def run_search(sweeper: Any, arguments: list[str]) -> list[Sequence[JobReturn]]:
    """The ask/tell loop: ``n_trials`` trials in batches of ``n_jobs``, launched by Hydra's launcher.

    Job numbers are the trials' numbers in the study, so ``<sweep dir>/<n>`` is trial ``n`` (a
    resumed study continues the numbering). Writes ``<sweep dir>/optimization_results.yaml``.
    """
    config = sweeper.config
    launcher = sweeper.launcher
    assert config is not None and launcher is not None and sweeper.hydra_context is not None
    if sweeper.n_trials < 0 or sweeper.n_jobs < 1:
        raise SweepConfigError(f"hydra.sweeper: n_trials={sweeper.n_trials} must be >= 0 and "
                               f"n_jobs={sweeper.n_jobs} >= 1")
    direction = direction_name(sweeper.direction)
    metric = config.get("optimized_metric")
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    space = build_search_space(sweeper.params, arguments, parser)
    if not space.distributions:
        log.warning("bdf_optuna: the search space is empty (no interval/choice/range in "
                    "hydra.sweeper.params or on the command line); every trial runs the same config")

    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")

    storage = _prepare_storage(sweeper.storage)
    study = optuna.create_study(study_name=sweeper.study_name, storage=storage,
                                sampler=make_sampler(sweeper.sampler), direction=direction,
                                load_if_exists=sweeper.load_if_exists)
    n_before = len(study.trials)
    log.info("bdf_optuna: study %r (%s, storage %s), %s; %d trials in batches of %d",
             study.study_name, direction, storage or "in memory",
             f"continuing after {n_before} earlier trials" if n_before else "new", sweeper.n_trials, sweeper.n_jobs)
    for key, dist in space.distributions.items():
        log.info("bdf_optuna: search %s ~ %s", key, describe_distribution(dist))

    returns: list[Sequence[JobReturn]] = []
    n_failed = 0
    n_done = 0
    while n_done < sweeper.n_trials:
        batch_size = min(sweeper.n_jobs, sweeper.n_trials - n_done)
        trials = [study.ask(fixed_distributions=space.distributions) for _ in range(batch_size)]
        batch = [space.overrides(t.params) for t in trials]
        try:
            sweeper.validate_batch_is_legal(batch)
            results: list[JobReturn] = []
            start = 0
            for run in _consecutive_runs([t.number for t in trials]):
                results.extend(launcher.launch(batch[start:start + len(run)], initial_job_idx=run[0]))
                start += len(run)
        except BaseException:
            for t in trials:  # never leave RUNNING trials in a persistent study
                study.tell(t, state=TrialState.FAIL)
            raise
        for t, overrides, ret in zip(trials, batch, results, strict=True):
            t.set_user_attr("overrides", list(overrides))
            if ret.hydra_cfg is not None:
                t.set_user_attr("run_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
            if ret.status != JobStatus.COMPLETED:
                n_failed += 1
                log.warning("bdf_optuna: trial %d (job %d) failed: %s; told Optuna FAIL, continuing",
                            t.number, t.number, _job_error(ret))
                study.tell(t, state=TrialState.FAIL)
                continue
            try:
                value = _value_of(ret, metric)
            except SweepConfigError:
                study.tell(t, state=TrialState.FAIL)
                for rest in trials[trials.index(t) + 1:]:
                    study.tell(rest, state=TrialState.FAIL)
                raise
            if math.isnan(value):
                n_failed += 1
                log.warning("bdf_optuna: trial %d returned NaN; told Optuna FAIL, continuing", t.number)
                study.tell(t, state=TrialState.FAIL)
            else:
                log.info("bdf_optuna: trial %d: %s = %s", t.number, metric, value)
                study.tell(t, value)
        n_done += batch_size
        returns.append(results)

    summary = write_results(study, sweep_dir, n_this_run=n_done, n_failed_this_run=n_failed, space=space)
    if summary["best_value"] is None:
        log.error("bdf_optuna: no trial of study %r completed; see the failures above", study.study_name)
    else:
        log.info("bdf_optuna: best value %s (trial %s); best parameters:\n%s", summary["best_value"],
                 summary["best_trial"], OmegaConf.to_yaml(summary["best_params"]).rstrip())
    log.info("bdf_optuna: results in %s", sweep_dir / RESULTS_FILE)
    if n_done and n_failed == n_done:
        raise RuntimeError(f"bdf_optuna: all {n_done} trials of this run failed; see the log above and "
                           f"the jobs' logs under {sweep_dir}")
    return returns


def write_results(study: optuna.Study, sweep_dir: Path, *, n_this_run: int, n_failed_this_run: int,
                  space: SearchSpace) -> dict[str, Any]:
    """Write ``optimization_results.yaml`` (best parameters and value over the whole study)."""
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "direction": study.direction.name.lower(),
        "best_value": float(best.value) if best is not None else None,
        "best_trial": best.number if best is not None else None,
        "best_params": dict(best.params) if best is not None else None,
        "best_overrides": ([f"{k}={space.format_value(k, v)}" if k in space.distributions
                            else f"{k}={Override._get_value_element_as_str(v)}" for k, v in best.params.items()]
                           if best is not None else None),
        "best_run_dir": best.user_attrs.get("run_dir") if best is not None else None,
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "n_trials_this_run": n_this_run,
        "n_failed_this_run": n_failed_this_run,
    }
    atomic_write_text(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(summary)))
    return summary

