"""The contracts between the pipeline stages: the batch a datamodule delivers, the names of the
outputs a decoder returns, and what a target encoder reads from a store (docs/architecture.md §4).

Nothing here imports torch, Lightning or another module of the package, so every layer (data,
targets, models, objectives, generation, tasks) can import it without import cycles or cost.

Decoder outputs (``Decoder.forward`` returns a flat ``{key: tensor}``; docs/architecture.md §4.4)
-------------------------------------------------------------------------------------------------

============================  =================================================  =======================================
key                           produced by                                        read by
============================  =================================================  =======================================
``<target>``                  every decoder: the prediction ``(B, *shape)``      loss terms, retrieval, generators
``<target>/backbone``         ``TokenDecoder`` (MindEye2, STTM)                  the diffusion prior (inside the decoder)
``regression/<target>``       ``MEGDecoder`` (regression "MSE" heads)            ``ClipMSEObjective``, generation
``<target>/index``, ``/scale``  ``BrainITDecoder`` (sampled query tokens)        ``multiscale_infonce`` terms
``<target>/main``             ``NeuroPictorDecoder`` (``clip_txt``)              the ``L_sem`` ``mse`` term
``lowlevel_aux_tokens``       ``TokenDecoder``'s low-level head (MindEye2)       ``token_contrast`` terms
``control_map``               ``NeuroPictorDecoder``                             ``controlnet_modulated`` generator
``loss/<name>``               decoders computing a loss from their internals     ``aux`` terms of a ``TermsObjective``
============================  =================================================  =======================================

Generated images (``Reconstructor.reconstruct`` returns ``{key: (n, 3, H, W)}``, docs/architecture.md §4.5):
``final`` always, ``lowlevel`` when the generator produced a low-level image first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: importing the contracts does not import torch
    import numpy as np
    import torch

# ---------------------------------------------------------------------------------------------
# The batch (produced by data/datamodule.py, consumed by objectives, lit.py, decoders' stage 0)


@dataclass
class Batch:
    """One batch, as :class:`~braindecode_fw.data.datamodule.BrainDataModule` delivers it.

    ``responses``: ``(B, F)`` or, for output averaging, ``(B, R, F)`` with ``repeat_mask`` ``(B, R)``
    marking real repetitions; ``F`` is the largest feature count in the batch (rows are zero-padded
    beyond their subject's count; MEG windows are ``(B, C, T)`` / ``(B, R, C, T)``).
    ``subject``: ``B`` subject names (adapters route rows by them). ``image_index``: ``(B,)`` row of
    each trial's stimulus in the store's image table. ``targets[name]``: ``(B, *shape)``.
    ``images``: uint8 ``(B, H, W, 3)`` stimulus images, only when the run has online targets
    (encoded on the device, docs/architecture.md §4.2)."""

    subject: list[str]
    responses: torch.Tensor
    image_index: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    repeat_mask: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.subject)


# ---------------------------------------------------------------------------------------------
# Decoder output keys

AUX_LOSS_PREFIX = "loss/"
"""``loss/<name>``: a scalar loss a decoder computes itself because it needs its internals (the
diffusion prior's, MindBridge's cycle and reconstruction losses, NeuroPictor's diffusion loss).
Produced only when ``targets`` are passed to ``Decoder.forward`` (training and validation);
repetition averaging drops these keys (``Decoder.forward``), and ``TermsObjective``'s ``aux`` terms
read them (``objectives.py``). The prefix is reserved: no other output may start with it."""

REGRESSION_PREFIX = "regression/"
"""``regression/<target>``: the regression ("MSE") head's prediction of ``<target>``, beside the
contrastive ("CLIP") head's ``<target>`` (``MEGDecoder``, Benchetrit et al. 2023,
docs/methods/meg_brainmodule.md §4). ``ClipMSEObjective`` trains it with the MSE term, and generation
conditions on it instead of ``<target>`` where a decoder has one (:meth:`~braindecode_fw.models.decoder.Decoder.generation_output`)."""

BACKBONE_SUFFIX = "/backbone"
"""``<target>/backbone``: ``TokenDecoder``'s (MindEye2, STTM) token-head output before the per-token
projector, ``(B, T, W)``: what the diffusion prior reads (docs/methods/mindeye2.md §2–3;
``TokenDecoder.sample_prior``)."""

SAMPLED_INDEX_SUFFIX = "/index"
"""``<target>/index``: ``(S,)`` indices of the query tokens ``BrainITDecoder`` predicted when it sampled
a subset (``token_sampling``, docs/methods/brainit.md §4); ``<target>`` then holds only those ``S``
tokens. Read by ``multiscale_infonce`` terms (``objectives.py``), which take the same target tokens."""

SAMPLED_SCALE_SUFFIX = "/scale"
"""``<target>/scale``: ``(S,)`` scale of each sampled query token (next to ``<target>/index``), read by
``multiscale_infonce`` terms (``losses.multiscale_infonce``)."""

MAIN_SUFFIX = "/main"
"""``<semantic_target>/main``: ``NeuroPictorDecoder``'s ``clip_txt`` tokens without the extra branch
(docs/methods/neuropictor.md §2–3), which the ``L_sem`` ``mse`` term reads."""

LOWLEVEL_AUX_TOKENS = "lowlevel_aux_tokens"
"""``lowlevel_aux_tokens``: ``(B, N, C)`` tokens of MindEye2's low-level auxiliary head
(``TokenDecoder`` with a low-level head and its teacher target trained; docs/methods/mindeye2.md §2),
distilled by a ``token_contrast`` term (docs/methods/mindeye2.md §4)."""

CONTROL_MAP = "control_map"
"""``control_map``: ``(B, C, h, w)`` control features of ``NeuroPictorDecoder`` (docs/methods/neuropictor.md §2),
declared in ``auxiliary_output_shapes`` and read by the ``controlnet_modulated`` generator
(``generation/controlnet.py``)."""


def aux_loss_key(name: str) -> str:
    """``loss/<name>``: the output key of the decoder's auxiliary loss ``name``."""
    return AUX_LOSS_PREFIX + name


def is_aux_loss(key: str) -> bool:
    """Whether output ``key`` is an auxiliary loss (``loss/<name>``), not a prediction."""
    return key.startswith(AUX_LOSS_PREFIX)


def regression_key(target: str) -> str:
    """``regression/<target>``: the regression head's output for ``target``."""
    return REGRESSION_PREFIX + target


def backbone_key(target: str) -> str:
    """``<target>/backbone``: the token head's output the prior reads."""
    return target + BACKBONE_SUFFIX


# ---------------------------------------------------------------------------------------------
# Generated images (Reconstructor.reconstruct, generation/reconstructor.py)

GENERATED_FINAL = "final"
"""``final``: the generated images ``(n, 3, H, W)`` in [0, 1], always present."""

GENERATED_LOWLEVEL = "lowlevel"
"""``lowlevel``: the low-level image ``(n, 3, H, W)`` a generator decoded before refining it (MindEye2's
blurry reconstruction, docs/methods/mindeye2.md §6); present only when it made one."""


# ---------------------------------------------------------------------------------------------
# What target encoders and the target cache read from a store (data/store.py produces it)


class StimulusStore(Protocol):
    """The part of :class:`~braindecode_fw.data.store.PreparedStore` that target encoders
    (``targets/``) read: its identity (the target cache's key, ``targets/cache.py``), the stimulus
    images ``(n_images, H, W, 3)`` uint8 and ``images/metadata.json`` (captions for text targets).
    Declared here so that ``targets/`` never imports ``data/`` (``data/datamodule.py`` imports
    ``targets/``)."""

    root: Any
    name: str
    version: str
    images: np.ndarray
    image_metadata: dict[str, Any]
