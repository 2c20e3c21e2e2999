"""The ``hydra/sweeper: bdf_optuna`` config node (registered in Hydra's ConfigStore on import).

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module before it
is in ``sys.modules``, and dataclasses cannot resolve string annotations then.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore


class Direction(Enum):
    """Whether the sweeper minimises or maximises the value the task function returns."""

    minimize = 1
    maximize = 2


def _default_sampler() -> dict[str, Any]:
    return {"_target_": "optuna.samplers.TPESampler", "seed": None}


@dataclass
class BdfOptunaSweeperConf:
    """``hydra.sweeper`` for Optuna searches.

    ``params`` maps config keys to Hydra override-grammar values: ``interval(a,b)`` (float),
    ``int(interval(a,b))``, ``tag(log, interval(a,b))`` (log scale), ``choice(a,b,c)`` or ``a,b,c``,
    ``range(a,b[,step])`` (stop excluded, as in Hydra), or a plain value (passed to every job as
    an ordinary override). Sweep overrides given on the command line are merged in and win.
    """

    _target_: str = "hydra_plugins.bdf_optuna_sweeper.optuna_sweeper.BdfOptunaSweeper"
    # an Optuna sampler built with hydra.utils.instantiate; any keyword the sampler accepts can be
    # added (e.g. n_startup_trials for TPE)
    sampler: Any = field(default_factory=_default_sampler)
    direction: Direction = Direction.minimize
    # trials run by one invocation (a resumed study gets n_trials more)
    n_trials: int = 20
    # trials asked from Optuna and launched together, as one batch, through hydra.launcher
    n_jobs: int = 1
    # null: in-memory study; or an Optuna storage URL, e.g. sqlite:///${hydra.sweep.dir}/optuna.db
    storage: str | None = None
    # required to resume: the same storage + study_name continue the study
    study_name: str | None = None
    load_if_exists: bool = True
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="bdf_optuna", node=BdfOptunaSweeperConf, provider="bdf_optuna_sweeper"
)
