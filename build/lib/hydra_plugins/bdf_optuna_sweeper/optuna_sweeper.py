"""The ``bdf_optuna`` Sweeper plugin class (Hydra instantiates it from ``hydra.sweeper``)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# registers hydra/sweeper=bdf_optuna in the ConfigStore when Hydra scans hydra_plugins.*
from hydra_plugins.bdf_optuna_sweeper.config import BdfOptunaSweeperConf  # noqa: F401


class BdfOptunaSweeper(Sweeper):
    """Optuna search over Hydra overrides with the ask/tell API (see the package docstring).

    Each batch of ``n_jobs`` trials is asked from Optuna, launched through ``hydra.launcher``
    (job number = trial number), and told back: the job's return value (``optimized_metric``),
    ``FAIL`` when the job raised or exited non-zero. Configured by ``BdfOptunaSweeperConf``.
    """

    def __init__(self, sampler: Any = None, direction: Any = "minimize", n_trials: int = 20,
                 n_jobs: int = 1, storage: str | None = None, study_name: str | None = None,
                 load_if_exists: bool = True, params: dict[str, Any] | None = None) -> None:
        self.sampler = sampler
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name
        self.load_if_exists = load_if_exists
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from hydra_plugins.bdf_optuna_sweeper._impl import TrialTask

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TrialTask(task_function), config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from hydra_plugins.bdf_optuna_sweeper._impl import run_search

        return run_search(self, arguments)
