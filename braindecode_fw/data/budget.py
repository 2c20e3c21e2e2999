"""Data budgets: how much of a subject's recording a run may learn from (new-subject adaptation).

A budget is one of ``{sessions: k}`` (the first k scanning sessions), ``{minutes: m}`` (every trial
shown in the first m minutes of scanning, at ``trial_seconds`` per trial: NSD shows an image for
3 s with a 1 s gap, so 4 s; 750 trials ≈ one 1-hour session) or ``{trials: n}`` (the first n
training trials). All three become one chronological cut-off over the subject's trials, ordered by
(session, run, trial-table row): training *and validation* trials before the cut-off are kept, so
model selection sees no labelled data outside the budget either. Test trials are never cut.

Normalisation statistics are label-free and keep using every trial of a session (as a deployed
decoder z-scores a new session's responses); only which labelled trials are learned from changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from braindecode_fw.data.store import TrialTable
from braindecode_fw.errors import DataError

UNITS = ("sessions", "minutes", "trials")


@dataclass(frozen=True)
class Budget:
    """One subject's budget: ``unit`` in :data:`UNITS` and a positive ``amount``."""

    unit: str
    amount: float

    @classmethod
    def parse(cls, spec: Mapping[str, Any], key: str) -> Budget:
        """From a config mapping with exactly one of ``sessions``/``minutes``/``trials`` set
        (others null); ``key`` names the config node in errors."""
        given = {k: v for k, v in dict(spec).items() if v is not None}
        unknown = sorted(set(given) - set(UNITS))
        if unknown:
            raise DataError(f"{key}: unknown budget field(s) {unknown}; use one of {list(UNITS)}")
        if len(given) != 1:
            raise DataError(f"{key}: give exactly one of {list(UNITS)}, got {given or 'none'}")
        (unit, amount), = given.items()
        try:
            amount = float(amount)
        except (TypeError, ValueError):
            raise DataError(f"{key}.{unit}: a number, got {amount!r}") from None
        if amount <= 0 or (unit != "minutes" and amount != int(amount)):
            kind = "a positive number" if unit == "minutes" else "a positive whole number"
            raise DataError(f"{key}.{unit}: {kind}, got {amount:g}")
        return cls(unit, amount)

    def describe(self) -> str:
        return f"{self.amount:g} {self.unit}"


def chronological_order(trials: TrialTable) -> np.ndarray:
    """Row indices of ``trials`` in presentation order (session, run, then table order)."""
    return np.lexsort((np.arange(len(trials)), trials.run, trials.session))


def budget_mask(trials: TrialTable, budget: Budget, trial_seconds: float = 4.0) -> np.ndarray:
    """``(n_trials,)`` bool: the trials inside ``budget`` (every split; callers combine it with
    the split they read). Raises if the budget selects no training trial."""
    order = chronological_order(trials)
    if budget.unit == "sessions":
        sessions = np.unique(trials.session)[: int(budget.amount)]
        inside = np.isin(trials.session, sessions)
    else:
        if budget.unit == "minutes":
            cutoff = int(budget.amount * 60 // trial_seconds)
        else:  # trials: everything up to and including the n-th training trial
            is_train = trials.split[order] == "train"
            cumulative = np.cumsum(is_train)
            reached = np.flatnonzero(cumulative >= int(budget.amount))
            cutoff = int(reached[0]) + 1 if len(reached) else len(order)
        inside = np.zeros(len(trials), dtype=bool)
        inside[order[:cutoff]] = True
    if not np.any(inside & (trials.split == "train")):
        raise DataError(f"budget {budget.describe()} selects no training trial")
    return inside
