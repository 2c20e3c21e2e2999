"""The linear (ridge) decoder baseline, scored with the same retrieval protocol as the trained decoder.

Benchetrit et al. 2023 compare their MEG module against "linear decoders" (the 7× retrieval gain,
docs/methods/meg_brainmodule.md §7): per subject, a ridge regression from the flattened response (``voxels`` for fMRI,
``sensors × times`` for MEG) to the target, the penalty chosen by exact leave-one-out error
(:func:`~braindecode_fw.models.ridge.fit_ridge`). It learns from the same training trials as the
decoder and is evaluated on the same test items (repetitions averaged in input space), so the report
shows decoder, linear baseline, oracle ceiling and chance side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from braindecode_fw.models.ridge import fit_ridge

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(10.0 ** e for e in range(-1, 7))


def linear_baseline_predictions(dm: Any, target: str, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                                max_train_trials: int | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per subject: fit ridge on its training trials, predict its averaged test items.

    Returns the format of :func:`braindecode_fw.lit.predict` (``pred`` ``(n, *shape)``, ``target``,
    ``image_index``, ``outputs`` empty) plus ``alpha`` (the chosen penalty) and ``n_train``.
    ``max_train_trials`` caps the trials per subject (random, seeded) to bound the ``N × N`` Gram matrix.
    """
    shape = dm.target_shapes[target]
    test = dm.repeated_dataset("test", average_inputs=True)
    out: dict[str, dict[str, Any]] = {}
    for subject in dm.split_subjects("test"):
        x, y = dm.subject_arrays(subject, target, "train", limit=max_train_trials, seed=seed)
        fit = fit_ridge(x.flatten(1), y, alphas)
        if fit.still_improving_at_edge():
            log.warning("%s: ridge penalty %.3g is at the edge of %s; widen evaluation.linear_baseline.alphas",
                        subject, fit.alpha, list(alphas))
        rows = [i for i, p in enumerate(test.subject_pos) if test.subjects[p] == subject]
        batch = test.__getitems__(rows)
        responses = batch.responses
        n_own = dm.n_features[subject]
        pred = fit.predict(responses[:, :n_own].flatten(1)).float().reshape(len(rows), *shape)
        out[subject] = {"pred": pred.numpy(), "target": batch.targets[target].numpy(),
                        "image_index": batch.image_index.numpy(), "outputs": {}, "alpha": fit.alpha,
                        "n_train": len(x)}
        log.info("%s: ridge baseline on %d trials × %d features, alpha %.3g", subject, len(x),
                 x[0].numel(), fit.alpha)
    return out

