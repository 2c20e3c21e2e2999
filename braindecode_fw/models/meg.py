"""MEG brain module of Défossez et al. 2023 / Benchetrit et al. 2023 (docs/methods/meg_brainmodule.md §2–5).

Pipeline, ``(B, C, T)`` MEG window -> ``{"clip": (B, F), "mse": (B, F)}``:

1. :class:`SpatialAttention` (§2): Fourier-parameterised softmax over the 2-D sensor positions,
   ``(B, C, T) -> (B, 270, T)``; padded / missing channels get ``-inf`` scores, and during training
   one random disk of radius 0.2 is dropped per forward pass.
2. ``Conv1d(270, 270, 1)`` then :class:`SubjectLayers` (one ``270×270`` matrix per subject).
3. :class:`DilatedConvStack` (§3): 10 residual dilated conv layers (dilations 1,2,4,8,16,1,2,4,8,16),
   BN + GELU, a GLU gate after layers 1,3,5,7,9, ``(B, 270, T) -> (B, 320, T)``.
4. Backbone output ("complex_out"): ``Conv1x1 320→640 -> GELU -> Conv1x1 640→F'``, ``(B, F', T)``.
5. :class:`TemporalAggregation` (§4): ``mean`` | ``affine`` | ``attention`` over time -> ``(B, F')``.
6. Two heads ``clip`` / ``mse``: ``LayerNorm -> GELU -> Linear(F'→F)`` each.

The Benchetrit objective ``λ·CLIP + (1−λ)·MSE`` (§5) is :class:`~braindecode_fw.losses.ClipMSELoss`
(importable from here too, its old home) and :class:`~braindecode_fw.objectives.ClipMSEObjective`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.contracts import REGRESSION_PREFIX  # also importable from here, its old home
from braindecode_fw.data.meg_layout import MISSING_POSITION, valid_positions
from braindecode_fw.errors import ConfigError, UnknownNameError
from braindecode_fw.losses import ClipMSELoss  # noqa: F401  (moved to losses.py; old import path kept)
from braindecode_fw.models.decoder import Decoder

# ---------------------------------------------------------------------------------------------
# Spatial attention (§2)


def fourier_positions(positions: torch.Tensor, n_harmonics: int = 32, margin: float = 0.2) -> torch.Tensor:
    """Fourier features of 2-D sensor positions (docs/methods/meg_brainmodule.md §2), ``(..., C, 2) -> (..., C, 2K²)``.

    With ``w = 1 + 2·margin`` and ``φ_kl(p) = 2π(k(x + m) + l(y + m)) / w`` for ``k, l = 0..K-1``, the
    feature vector is ``[cos φ_kl for all (k, l)] ++ [sin φ_kl for all (k, l)]``, each half flattened
    row-major over ``(k, l)`` with ``k`` (the x frequency) the slow index. The margin keeps the basis
    non-periodic over the ``[0, 1]²`` square (positions are min-max normalised per axis).
    """
    if positions.shape[-1] != 2:
        raise ConfigError(f"positions: last dimension must be 2 (x, y), got shape {tuple(positions.shape)}")
    width = 1.0 + 2.0 * margin
    freqs = torch.arange(n_harmonics, device=positions.device, dtype=positions.dtype)
    x = (positions[..., 0] + margin)[..., None, None]  # (..., C, 1, 1)
    y = (positions[..., 1] + margin)[..., None, None]
    phase = 2 * math.pi * (freqs[:, None] * x + freqs[None, :] * y) / width  # (..., C, K, K)
    phase = phase.flatten(-2)  # k slow, l fast
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class SpatialAttention(nn.Module):
    """Défossez's "ChannelMerger" (docs/methods/meg_brainmodule.md §2): ``(B, C, T) -> (B, n_out, T)``.

    ``score[b, j, i] = <H_j, e(p_{b,i})>`` with ``e`` = :func:`fourier_positions` (``2K²`` = 2048
    features for K = 32) and ``H ∈ R^{n_out × 2K²}`` initialised ``N(0, 1)/√(2K²)``; invalid channels
    (padding, or not in the layout) get ``-inf``; in training mode one centre ``c ~ U[0, 1]²`` is drawn
    per forward pass and every channel with ``‖p_i − c‖ ≤ dropout_radius`` gets ``-inf`` too ("spatial
    dropout", the same centre for the whole batch). ``Y_j(t) = Σ_i softmax_i(score_j)_i X_i(t)``.

    Rows left with no usable channel (every channel invalid, or the dropout disk covered all valid
    ones) output **zeros** (weights all zero) rather than NaN; their gradients are zero as well.
    Invalid channels are also zero-filled before the weighted sum, so whatever they hold (even NaN)
    never reaches the output, and their input gradient is exactly zero.
    """

    def __init__(self, n_out: int = 270, n_harmonics: int = 32, dropout_radius: float = 0.2, margin: float = 0.2):
        super().__init__()
        self.n_out, self.n_harmonics = n_out, n_harmonics
        self.dropout_radius, self.margin = dropout_radius, margin
        pos_dim = 2 * n_harmonics**2
        self.heads = nn.Parameter(torch.randn(n_out, pos_dim) / math.sqrt(pos_dim))

    def attention_weights(self, positions: torch.Tensor, valid: torch.Tensor | None = None, batch_size: int = 1,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Softmax weights ``(B, n_out, C)`` for positions ``(B, C, 2)`` or ``(C, 2)`` and ``valid``
        ``(B, C)`` bool (default: channels whose coordinates are all ``≥ 0``, i.e. not the −0.1
        sentinel). In training mode the spatial dropout disk is drawn from ``generator``."""
        if positions.ndim == 2:
            positions = positions.unsqueeze(0).expand(batch_size, -1, -1)
        positions = positions.to(self.heads.dtype)
        if valid is None:
            valid = (positions >= 0).all(-1)
        keep = valid.to(positions.device, torch.bool).expand(positions.shape[:2])
        if self.training and self.dropout_radius > 0:
            dev = generator.device if generator is not None else positions.device
            centre = torch.rand(2, generator=generator, device=dev).to(positions)
            keep = keep & ((positions - centre).norm(dim=-1) > self.dropout_radius)
        feats = fourier_positions(positions, self.n_harmonics, self.margin)  # (B, C, 2K²)
        scores = torch.einsum("jd,bcd->bjc", self.heads, feats)  # (B, n_out, C)
        usable = keep.any(-1)  # (B,)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        # rows with no usable channel: neutral scores (finite softmax), then zeroed by ``keep``
        scores = torch.where(usable[:, None, None], scores, torch.zeros_like(scores))
        return scores.softmax(-1) * keep[:, None, :].to(scores.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x ``(B, C, T)``, positions ``(B, C, 2)`` or ``(C, 2)`` in ``[0, 1]²``, valid ``(B, C)``
        bool -> ``(B, n_out, T)``."""
        b, c = x.shape[:2]
        if positions.shape[-2] != c:
            raise ConfigError(f"positions has {positions.shape[-2]} channels, the input {c}")
        if valid is None:
            valid = (positions >= 0).all(-1)
        valid = valid.to(x.device, torch.bool).expand(b, c)
        w = self.attention_weights(positions, valid, b, generator)
        x = x.masked_fill(~valid[:, :, None], 0.0)
        return torch.einsum("bjc,bct->bjt", w.to(x.dtype), x)


# ---------------------------------------------------------------------------------------------
# Subject layer (§3)


class SubjectLayers(nn.Module):
    """One ``channels × channels`` matrix per subject (docs/methods/meg_brainmodule.md §3):
    ``y[b, d, t] = Σ_c x[b, c, t] W_{s_b}[c, d]``, ``(B, C, T) -> (B, C, T)``.

    Init ``randn/√channels`` (``init="identity"``: identity/√channels). Rows are routed with one
    batched gather + einsum, no Python loop over rows; subjects are id strings (``subj01``…).
    """

    def __init__(self, channels: int, subjects: Sequence[str], init: str = "randn"):
        super().__init__()
        if init not in ("randn", "identity"):
            raise ConfigError(f"SubjectLayers init: 'randn' or 'identity', got {init!r}")
        self.channels, self.init = channels, init
        self.subjects = list(subjects)
        if len(set(self.subjects)) != len(self.subjects):
            raise ConfigError(f"SubjectLayers: duplicate subject ids in {self.subjects}")
        self.weights = nn.Parameter(torch.stack([self._init_matrix() for _ in self.subjects]))

    def _init_matrix(self) -> torch.Tensor:
        if self.init == "identity":
            return torch.eye(self.channels) / math.sqrt(self.channels)
        return torch.randn(self.channels, self.channels) / math.sqrt(self.channels)

    def subject_index(self, subjects: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """Subject ids -> ``(B,)`` long indices into :attr:`weights`; unknown id -> ``KeyError``."""
        lookup = {s: i for i, s in enumerate(self.subjects)}
        missing = [s for s in dict.fromkeys(subjects) if s not in lookup]
        if missing:
            raise UnknownNameError(f"no subject layer for subject {missing[0]!r}; the model has {self.subjects}")
        return torch.tensor([lookup[s] for s in subjects], dtype=torch.long, device=device)

    def add_subject(self, subject: str) -> None:
        """Append a freshly initialised matrix (adaptation); rebuild the optimizer afterwards."""
        if subject in self.subjects:
            raise ConfigError(f"subject {subject!r} already has a subject layer")
        new = self._init_matrix().to(self.weights)[None]
        self.weights = nn.Parameter(torch.cat([self.weights.detach(), new]))
        self.subjects.append(subject)

    def forward(self, x: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        if len(subjects) != len(x):
            raise ConfigError(f"{len(subjects)} subject ids for a batch of {len(x)}")
        w = self.weights.index_select(0, self.subject_index(subjects, x.device))  # (B, C, D)
        return torch.einsum("bct,bcd->bdt", x, w.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Dilated residual conv stack (§3)


class DilatedConvStack(nn.Module):
    """Défossez's conv stack (docs/methods/meg_brainmodule.md §3), ``(B, in_channels, T) -> (B, hidden, T)``.

    Layer ``k = 0..depth-1``: ``Conv1d(k=kernel_size, dilation d_k, padding d_k·(kernel_size−1)/2)
    -> BatchNorm1d -> GELU`` with ``d_k = dilation_growth^(k mod dilation_period)`` (1,2,4,8,16,1,2,4,
    8,16 by default); residual ``x ← x + layer(x)`` whenever shapes match (not layer 0, 270→320);
    after layers ``k`` with ``(k+1) % glu_every == 0`` (1,3,5,7,9) a gate
    ``Conv1d(hidden, 2·hidden, 2·glu_context+1, padding glu_context) -> GLU(dim=1)`` is applied to the
    residual sum. Every layer, the last included, has BN + GELU ("activation_on_last").
    """

    def __init__(self, in_channels: int = 270, hidden: int = 320, depth: int = 10, kernel_size: int = 3,
                 dilation_growth: int = 2, dilation_period: int = 5, glu_every: int = 2, glu_context: int = 1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size must be odd (same-length output), got {kernel_size}")
        self.kernel_size, self.glu_context = kernel_size, glu_context
        self.dilations = [dilation_growth ** (k % dilation_period) for k in range(depth)]
        self.glu_after = [k for k in range(depth) if glu_every and (k + 1) % glu_every == 0]
        self.layers = nn.ModuleList()
        for k, d in enumerate(self.dilations):
            chin = in_channels if k == 0 else hidden
            self.layers.append(nn.Sequential(
                nn.Conv1d(chin, hidden, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2),
                nn.BatchNorm1d(hidden), nn.GELU()))
        self.glus = nn.ModuleDict({
            str(k): nn.Sequential(nn.Conv1d(hidden, 2 * hidden, 2 * glu_context + 1, padding=glu_context),
                                  nn.GLU(dim=1))
            for k in self.glu_after})

    @property
    def receptive_field(self) -> int:
        """Samples of input that one output sample sees: ``1 + Σ d_k(kernel−1) + 2·glu_context·n_glu``."""
        return 1 + sum(d * (self.kernel_size - 1) for d in self.dilations) + 2 * self.glu_context * len(self.glu_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            y = layer(x)
            x = x + y if y.shape == x.shape else y
            if str(k) in self.glus:
                x = self.glus[str(k)](x)
        return x


# ---------------------------------------------------------------------------------------------
# Temporal aggregation and heads (§4)


class TemporalAggregation(nn.Module):
    """Reduce the time axis (docs/methods/meg_brainmodule.md §4), ``(B, F', T) -> (B, F')``.

    - ``mean``: average over time (GAP).
    - ``affine``: ``y[b, f] = Σ_t w_t x[b, f, t] + β`` with ``w ∈ R^T`` shared by all features
      (``nn.Linear(n_times, 1)``, default Linear init; T + 1 parameters).
    - ``attention``: additive (Bahdanau) pooling, ``α = softmax_t(vᵀ tanh(W x_t + b))``,
      ``y = Σ_t α_t x_t`` with ``W: F' → hidden`` (256) and ``v: hidden → 1``; needs ``channels`` = F'.
    """

    KINDS = ("mean", "affine", "attention")

    def __init__(self, kind: str = "affine", n_times: int = 181, channels: int | None = None, hidden: int = 256):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"temporal aggregation: one of {self.KINDS}, got {kind!r}")
        self.kind, self.n_times = kind, n_times
        if kind == "affine":
            self.linear = nn.Linear(n_times, 1)
        elif kind == "attention":
            if channels is None:
                raise ConfigError("temporal aggregation 'attention' needs `channels` (the feature dimension)")
            self.proj = nn.Linear(channels, hidden)
            self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return x.mean(-1)
        if self.kind == "affine":
            if x.shape[-1] != self.n_times:
                raise ConfigError(f"affine temporal aggregation built for {self.n_times} samples, got {x.shape[-1]}")
            return self.linear(x).squeeze(-1)
        h = x.transpose(1, 2)  # (B, T, F')
        alpha = self.score(torch.tanh(self.proj(h))).softmax(1)  # (B, T, 1)
        return (alpha * h).sum(1)


class MEGHead(nn.Module):
    """``LayerNorm(F') -> GELU -> Linear(F' → F)``, ``(B, F') -> (B, F)`` (docs/methods/meg_brainmodule.md §4)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# Full module


class MEGBrainModule(nn.Module):
    """Benchetrit et al. 2023 MEG → image-latent module (docs/methods/meg_brainmodule.md §2–4).

    ``forward(meg, subjects, positions, valid)``: meg ``(B, C, T)`` (C = ``n_sensors``, padded
    channels allowed when marked invalid), subjects ``B`` id strings, positions ``(C, 2)`` or
    ``(B, C, 2)`` in ``[0, 1]²`` (or the ``positions`` buffer given at construction), valid ``(B, C)``
    bool -> ``{"clip": (B, F), "mse": (B, F)}`` (plus ``"features"``, the backbone output
    ``(B, F', T)``, with ``return_features=True``). With ``aggregation=None`` there are no heads
    (brainmagick's speech model) and the output is ``{"features": (B, F', T)}``.

    Shape trace of the recommended config (B, 272 sensors, 181 samples, F' = 2048, F = 768):
    ``(B, 272, 181) -> SA (B, 270, 181) -> 1×1 conv, subject layer (B, 270, 181) -> conv stack
    (B, 320, 181) -> Conv1x1 320→640, GELU, Conv1x1 640→2048 (B, 2048, 181) -> affine (B, 2048) ->
    heads (B, 768)``. The last 1×1 is a ``Conv1d`` (brainmagick uses ``ConvTranspose1d(k=1,
    stride=1)``: the same map and parameter count, weight stored transposed).
    """

    def __init__(self, subjects: Sequence[str], n_sensors: int = 272, n_times: int = 181,
                 spatial_channels: int = 270, hidden: int = 320, depth: int = 10, backbone_out: int = 2048,
                 out_dim: int | None = 768, aggregation: str | None = "affine", heads: Sequence[str] = ("clip", "mse"),
                 n_harmonics: int = 32, dropout_radius: float = 0.2, kernel_size: int = 3,
                 dilation_growth: int = 2, dilation_period: int = 5, glu_every: int = 2, glu_context: int = 1,
                 attention_hidden: int = 256, subject_init: str = "randn",
                 positions: torch.Tensor | None = None):
        super().__init__()
        self.n_sensors, self.n_times = n_sensors, n_times
        self.spatial = SpatialAttention(spatial_channels, n_harmonics, dropout_radius)
        self.initial = nn.Conv1d(spatial_channels, spatial_channels, 1)
        self.subject_layers = SubjectLayers(spatial_channels, subjects, init=subject_init)
        self.encoder = DilatedConvStack(spatial_channels, hidden, depth, kernel_size, dilation_growth,
                                        dilation_period, glu_every, glu_context)
        self.backbone_head = nn.Sequential(nn.Conv1d(hidden, 2 * hidden, 1), nn.GELU(),
                                           nn.Conv1d(2 * hidden, backbone_out, 1))
        self.aggregation = (TemporalAggregation(aggregation, n_times, backbone_out, attention_hidden)
                            if aggregation is not None else None)
        if self.aggregation is not None and out_dim is None:
            raise ConfigError("MEGBrainModule: out_dim is required when aggregation is set")
        self.heads = nn.ModuleDict({name: MEGHead(backbone_out, out_dim) for name in heads}
                                   if self.aggregation is not None else {})
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.float32)
        self.register_buffer("positions", positions)

    @property
    def subjects(self) -> list[str]:
        return list(self.subject_layers.subjects)

    def parameter_counts(self) -> dict[str, int]:
        """``{"shared", "per_subject", "subject_total", "total"}`` trainable parameter counts."""
        subject = sum(p.numel() for p in self.subject_layers.parameters())
        total = sum(p.numel() for p in self.parameters())
        n = max(len(self.subjects), 1)
        return {"shared": total - subject, "per_subject": subject // n, "subject_total": subject, "total": total}

    def backbone(self, meg: torch.Tensor, subjects: Sequence[str], positions: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, C, T) -> (B, F', T)``: spatial attention, 1×1 conv, subject layer, conv stack, 1×1 head."""
        if meg.ndim != 3 or meg.shape[1] != self.n_sensors:
            raise ConfigError(f"meg: expected (B, {self.n_sensors}, T), got {tuple(meg.shape)}")
        if positions is None:
            if self.positions is None:
                raise ConfigError("MEGBrainModule: pass `positions` (no default positions were given)")
            positions = self.positions
        x = self.spatial(meg, positions.to(meg.device), valid, generator)
        x = self.subject_layers(self.initial(x), subjects)
        return self.backbone_head(self.encoder(x))

    def forward(self, meg: torch.Tensor, subjects: Sequence[str], positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, generator: torch.Generator | None = None,
                return_features: bool = False) -> dict[str, torch.Tensor]:
        features = self.backbone(meg, subjects, positions, valid, generator)
        if self.aggregation is None:
            return {"features": features}
        pooled = self.aggregation(features)
        out = {name: head(pooled) for name, head in self.heads.items()}
        if return_features:
            out["features"] = features
        return out


# ---------------------------------------------------------------------------------------------
# The brain module as a framework decoder (docs/architecture.md §4.4)


class MEGDecoder(Decoder):
    """:class:`MEGBrainModule` behind the framework's decoder contract, for every target of the run.

    ``forward(responses, subjects)``: ``(B, C, T)`` MEG windows (``C`` ≤ the largest sensor count of
    the subjects; rows zero-padded beyond their subject's sensors, as the datamodule delivers them) ->
    ``{name: (B, *shape)}`` from the contrastive ("CLIP") head and ``{"regression/<name>": (B, *shape)}``
    from the regression ("MSE") head, one pair of heads per target (Benchetrit et al. 2023,
    docs/methods/meg_brainmodule.md §4: retrieval uses the CLIP head, generation the MSE head). With ``(B, R, C, T)``
    and a ``repeat_mask`` the outputs are averaged over repetitions (:class:`Decoder`).

    Each subject's sensor positions (``(C_s, 2)`` in ``[0, 1]²``) live in the buffers
    ``sensor_positions`` ``(S, C, 2)`` / ``sensor_valid`` ``(S, C)``: set from the data by
    :meth:`configure_from_data` before training and restored from the state dict afterwards, so a
    checkpoint carries its geometry. Padded and layout-less channels are invalid: the spatial
    attention gives them zero weight.
    """

    def __init__(self, module: MEGBrainModule, target_shapes: Mapping[str, Sequence[int]],
                 n_features: Mapping[str, int], regression_heads: bool = True):
        nn.Module.__init__(self)
        if module.aggregation is None:
            raise ConfigError("MEGDecoder: the brain module needs a temporal aggregation (model.aggregation)")
        self.module = module
        self.n_features = {str(s): int(n) for s, n in n_features.items()}
        self.target_shapes = {name: tuple(int(d) for d in shape) for name, shape in target_shapes.items()}
        width = module.backbone_head[-1].out_channels
        self.heads = nn.ModuleDict({n: MEGHead(width, math.prod(s)) for n, s in self.target_shapes.items()})
        self.regression_heads = nn.ModuleDict(
            {n: MEGHead(width, math.prod(s)) for n, s in self.target_shapes.items()} if regression_heads else {})
        subjects = module.subjects
        self.register_buffer("sensor_positions", torch.full((len(subjects), module.n_sensors, 2), MISSING_POSITION))
        self.register_buffer("sensor_valid", torch.zeros(len(subjects), module.n_sensors, dtype=torch.bool))
        for i, s in enumerate(subjects):  # until configured: the first C_s channels, positions unknown
            self.sensor_valid[i, : self.n_features.get(s, module.n_sensors)] = True

    def generation_output(self, name: str) -> str:
        """Benchetrit et al. 2023 retrieve with the CLIP head and generate from the MSE head
        (docs/methods/meg_brainmodule.md §4): ``regression/<name>`` where that head exists."""
        return REGRESSION_PREFIX + name if name in self.regression_heads else name

    def set_sensor_positions(self, subject: str, positions: torch.Tensor | Sequence[Sequence[float]]) -> None:
        """One subject's ``(C_s, 2)`` positions in ``[0, 1]²``; rows at the layout's
        :data:`~braindecode_fw.data.meg_layout.MISSING_POSITION` are invalid."""
        pos = torch.as_tensor(positions, dtype=torch.float32)
        i = self.module.subject_layers.subject_index([subject])[0]
        if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) > self.module.n_sensors:
            raise ConfigError(f"{subject}: sensor positions must be (C <= {self.module.n_sensors}, 2), got {tuple(pos.shape)}")
        self.sensor_positions[i] = MISSING_POSITION
        self.sensor_valid[i] = False
        self.sensor_positions[i, : len(pos)] = pos.to(self.sensor_positions)
        self.sensor_valid[i, : len(pos)] = torch.from_numpy(valid_positions(pos.numpy())).to(self.sensor_valid.device)

    def configure_from_data(self, datamodule) -> None:
        """Sensor positions of every subject from the prepared store; checks modality and window length."""
        store = datamodule.store
        if store is None or store.modality != "meg":
            raise ConfigError(f"model: the MEG brain module needs an MEG dataset; {datamodule.store_path} holds "
                             f"{getattr(store, 'modality', 'no')} data (use dataset=synthetic_meg or things_meg)")
        for s in self.module.subjects:
            if s not in store.subjects:
                continue
            shape = store.subjects[s].responses.shape[1:]
            if shape[1] != self.module.n_times:
                raise ConfigError(f"model.n_times={self.module.n_times} but {s}'s windows in {datamodule.store_path} "
                                 f"have {shape[1]} samples; set model.n_times={shape[1]}")
            self.set_sensor_positions(s, store.subjects[s].sensor_geometry()["positions"])

    def compute(self, responses: torch.Tensor, subjects: Sequence[str],
                targets: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``(B, C, T)`` -> outputs; ``C`` is padded up to the model's sensor count."""
        if responses.ndim != 3:
            raise ConfigError(f"MEGDecoder: expected (B, sensors, times) responses, got {tuple(responses.shape)}")
        missing = self.module.n_sensors - responses.shape[1]
        if missing < 0:
            raise ConfigError(f"MEGDecoder: {responses.shape[1]} sensors, the model has {self.module.n_sensors}")
        x = F.pad(responses, (0, 0, 0, missing)) if missing else responses
        idx = self.module.subject_layers.subject_index(subjects, x.device)
        features = self.module.backbone(x, subjects, self.sensor_positions[idx], self.sensor_valid[idx])
        pooled = self.module.aggregation(features)
        out = {n: head(pooled).reshape(len(x), *self.target_shapes[n]) for n, head in self.heads.items()}
        for n, head in self.regression_heads.items():
            out[REGRESSION_PREFIX + n] = head(pooled).reshape(len(x), *self.target_shapes[n])
        return out


def build_meg_decoder(n_features: Mapping[str, int], target_shapes: Mapping[str, Sequence[int]], *,
                      n_times: int = 181, regression_heads: bool = True, **module_kwargs) -> MEGDecoder:
    """Hydra entry point (``model=meg_brainmodule``): sizes from the data, the rest from config
    (``module_kwargs`` are :class:`MEGBrainModule` arguments; its own heads are not used)."""
    module = MEGBrainModule(list(n_features), n_sensors=max(n_features.values()), n_times=n_times,
                            heads=(), out_dim=1, **module_kwargs)
    return MEGDecoder(module, target_shapes, n_features, regression_heads=regression_heads)
