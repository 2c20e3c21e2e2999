"""``bdf-reconstruct ckpt=<decoder checkpoint> generator=<name>``: images from held-out brain data.

The work is :func:`braindecode_fw.pipeline.reconstruction.reconstruct`.

Runs the decoder on the test split (repetitions averaged as in training), checks that it provides
what the generator needs, generates ``n_samples`` images per test image with per-image seeds
(optionally keeping the one closest to the *predicted* embedding), and writes a reconstruction
folder (docs/data_format.md): PNGs, retrieval embeddings, a manifest rewritten after every batch
(rerunning with the same ``out=`` resumes), a comparison grid (ground truth | low-level | final)
logged to the configured loggers, and optionally the evaluation table (``evaluate=true``).

``lowlevel=dip`` adds Brain-IT's low-level stage (docs/methods/brainit.md §6 step 1 -> step 2): the decoder's
predicted VGG tokens of each batch to generate are inverted into images (Deep Image Prior,
:class:`~braindecode_fw.generation.feature_inversion.FeatureInverter`) that the generator starts
from (``lowlevel_target``, ``lowlevel_kind: image``, ``strength`` < 1).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from braindecode_fw.pipeline.reconstruction import reconstruct as reconstruct_images


def reconstruct(cfg: DictConfig) -> dict[str, Any]:
    """Writes the reconstruction folder (``cfg.out``, default ``<run dir>/reconstructions``); returns
    the summary."""
    return reconstruct_images(cfg)
