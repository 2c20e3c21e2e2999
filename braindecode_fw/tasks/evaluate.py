"""``bdf-evaluate``: the literature's metric table for reconstructions or a decoder checkpoint.

Three inputs (docs/evaluation.md): ``run=<bdf-reconstruct folder>``, ``recon_dir=<folder|array>
gt_dir=<folder|array>``, ``ckpt=<decoder checkpoint>`` (retrieval only). The work is
:func:`braindecode_fw.pipeline.evaluation.evaluate`, which ``bdf-reconstruct evaluate=true`` also
runs.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from braindecode_fw.pipeline.evaluation import evaluate as evaluate_inputs


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Writes ``metrics.{json,csv,md}``, ``per_image.csv`` and plots into ``cfg.paths.output_dir``;
    returns the table."""
    return evaluate_inputs(cfg)
