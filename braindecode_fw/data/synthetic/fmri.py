"""Simulated multi-subject fMRI with a known generative model (docs/architecture.md §5).

Generative model for subject ``s``, voxel ``v``, trial ``t`` showing image ``i`` in session ``e``::

    y[t, v] = gain[e, v] * f[i, v] + offset[e, v] + baseline[v] + noise_sd[v] * eps,  eps ~ N(0, 1)

- ``f`` is the noise-free response, standardised to unit variance over images per voxel:
  * early visual voxels (posterior part of the mask): a Gaussian receptive field on the image,
    centres tiled smoothly over the visual field by the voxel's position (retinotopy), size
    growing with eccentricity, pooling four channels (luminance, red-green, blue-yellow, edge
    energy) with spatially smooth channel preferences;
  * higher voxels: a linear read-out of the scene's symbolic content (category / colour counts,
    object count, size) with weights drawn from smooth random fields over the volume, so
    functional clusters exist;
  * both through a softplus output nonlinearity.
- ``noise_sd = 1 / ncsnr_true`` with ncsnr drawn from a log-normal whose median and spread are
  set in config (NSD nsdgeneral-like), clipped to ``[min, max]``, assigned smoothly over space.
- ``gain``/``offset`` are per-session multiplicative / additive drifts.

Since everything above is known, :func:`oracle_log_likelihood` gives the Bayes-optimal
(maximum-likelihood) retrieval scores for the test set, the ceiling no decoder can beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

from braindecode_fw.errors import DataError
from braindecode_fw.schema import config_dataclass, setting


@config_dataclass("dataset/synthetic.yaml", "world.ncsnr", key="dataset.world.ncsnr")
class NoiseCeilingConfig:
    """Per-voxel noise-ceiling SNR, log-normal (NSD nsdgeneral b3 ncsnr: median ~0.3-0.4, long right
    tail); defaults: ``world.ncsnr`` of braindecode_fw/conf/dataset/synthetic.yaml."""

    median: float = setting(gt=0)
    log_sigma: float = setting(min=0)
    min: float = setting(gt=0)
    max: float = setting(gt=0)


@config_dataclass("dataset/synthetic.yaml", "world.drift", key="dataset.world.drift")
class DriftConfig:
    """Per-session drift; defaults: ``world.drift`` of braindecode_fw/conf/dataset/synthetic.yaml."""

    gain_sd: float = setting(min=0)  # multiplicative session drift, log-normal sd
    offset_sd: float = setting(min=0)  # additive session drift, in signal-sd units
    baseline_sd: float = setting(min=0)  # per-voxel constant offset


@dataclass
class SubjectSimulation:
    """Everything the simulator knows about one subject (kept with the dataset as ground truth)."""

    voxel_ijk: np.ndarray  # (V, 3) int
    population: np.ndarray  # (V,) int8: 0 early visual, 1 higher (semantic)
    rf_center: np.ndarray  # (V, 2) float, (x, y) in image fraction; NaN for higher voxels
    rf_sigma: np.ndarray  # (V,) float; NaN for higher voxels
    channel_weights: np.ndarray  # (V, 4): luminance, red-green, blue-yellow, edge; 0 for higher
    semantic_tuning: np.ndarray  # (V, F); 0 for early voxels
    ncsnr_true: np.ndarray  # (V,)
    noise_sd: np.ndarray  # (V,)
    baseline: np.ndarray  # (V,)
    drive_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (V,) standardisation
    drive_std: np.ndarray = field(default_factory=lambda: np.ones(0))
    response_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    response_std: np.ndarray = field(default_factory=lambda: np.ones(0))

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.__dict__.items()}


def _smooth_field(shape: tuple[int, ...], sigma: float, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """``n`` smooth Gaussian random fields over ``shape``, each standardised: ``(n, *shape)``."""
    out = np.empty((n, *shape), dtype=np.float64)
    for i in range(n):
        f = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
        out[i] = (f - f.mean()) / (f.std() + 1e-12)
    return out


def sample_voxel_mask(volume_shape: tuple[int, int, int], n_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """Subject-specific mask: the ``n_voxels`` highest points of an ellipsoid prior plus a smooth
    random field. Returns ``(n_voxels, 3)`` int voxel indices (i: left-right, j: posterior-anterior,
    k: inferior-superior)."""
    if n_voxels > int(np.prod(volume_shape)) // 2:
        raise DataError(f"n_voxels={n_voxels} too large for volume {volume_shape}")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in volume_shape], indexing="ij"), -1)
    centre = rng.uniform(-0.1, 0.1, size=3)
    radii = np.array([0.8, 0.9, 0.7]) * rng.uniform(0.9, 1.1, size=3)
    prior = -np.sum(((grid - centre) / radii) ** 2, axis=-1)
    score = prior + 0.35 * _smooth_field(volume_shape, 2.0, rng)[0]
    flat = np.argsort(score.ravel())[::-1][:n_voxels]
    return np.stack(np.unravel_index(np.sort(flat), volume_shape), axis=-1).astype(np.int32)


def image_channels(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 4, resolution**2)`` channel maps pooled to a
    ``resolution``×``resolution`` grid: luminance, red-green, blue-yellow, edge energy."""
    x = images.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    lum = (r + g + b) / 3 - 0.5
    rg = r - g
    by = b - (r + g) / 2
    gy, gx = np.gradient(lum, axis=(1, 2))
    edge = np.sqrt(gx**2 + gy**2) * 4
    chans = np.stack([lum, rg, by, edge], axis=1)  # (N, 4, H, W)
    n, c, h, w = chans.shape
    if h % resolution or w % resolution:
        raise DataError(f"image size {h}x{w} must be a multiple of the feature resolution {resolution}")
    pooled = chans.reshape(n, c, resolution, h // resolution, resolution, w // resolution).mean(axis=(3, 5))
    return pooled.reshape(n, c, resolution * resolution)


def build_subject(
    n_voxels: int,
    volume_shape: tuple[int, int, int],
    n_semantic: int,
    rng: np.random.Generator,
    *,
    early_fraction: float,
    ncsnr: NoiseCeilingConfig,
    drift: DriftConfig,
    rf_size: tuple[float, float],
    tuning_smoothness: float,
) -> SubjectSimulation:
    """Place voxels, assign populations, receptive fields, tuning and noise levels."""
    ijk = sample_voxel_mask(volume_shape, n_voxels, rng)
    vol = np.asarray(volume_shape, dtype=np.float64)
    pos = ijk / (vol - 1)  # in [0, 1]
    # posterior voxels (small j) form the early visual population
    order = np.argsort(pos[:, 1] + 0.02 * rng.standard_normal(n_voxels))
    population = np.ones(n_voxels, dtype=np.int8)
    n_early = int(round(early_fraction * n_voxels))
    early = order[:n_early]
    population[early] = 0
    higher = np.flatnonzero(population == 1)

    # retinotopy: rank-normalised left-right / inferior-superior position -> visual-field (x, y),
    # with a smooth warp so that maps differ between subjects
    def ranks(a: np.ndarray) -> np.ndarray:
        return (np.argsort(np.argsort(a)) + 0.5) / len(a)

    warp = _smooth_field(volume_shape, 3.0, rng, n=2)
    wx = warp[0][tuple(ijk[early].T)]
    wy = warp[1][tuple(ijk[early].T)]
    rf_center = np.full((n_voxels, 2), np.nan)
    rf_center[early, 0] = np.clip(ranks(pos[early, 0]) + 0.04 * wx, 0.02, 0.98)
    rf_center[early, 1] = np.clip(1 - ranks(pos[early, 2]) + 0.04 * wy, 0.02, 0.98)
    ecc = np.hypot(rf_center[early, 0] - 0.5, rf_center[early, 1] - 0.5)
    rf_sigma = np.full(n_voxels, np.nan)
    rf_sigma[early] = rf_size[0] + rf_size[1] * ecc

    chan_fields = _smooth_field(volume_shape, tuning_smoothness, rng, n=4)
    channel_weights = np.zeros((n_voxels, 4))
    cw = np.stack([chan_fields[c][tuple(ijk[early].T)] for c in range(4)], axis=1)
    cw[:, 0] += 1.0  # luminance-dominated, as in V1
    channel_weights[early] = cw

    sem_fields = _smooth_field(volume_shape, tuning_smoothness, rng, n=n_semantic)
    semantic_tuning = np.zeros((n_voxels, n_semantic))
    st = np.stack([sem_fields[f][tuple(ijk[higher].T)] for f in range(n_semantic)], axis=1)
    semantic_tuning[higher] = np.sign(st) * np.abs(st) ** 1.5  # sharper, cluster-like selectivity

    # ncsnr: log-normal marginal assigned through the ranks of a smooth field (spatially smooth)
    z = _smooth_field(volume_shape, 2.0, rng)[0][tuple(ijk.T)]
    quantiles = (np.argsort(np.argsort(z)) + 0.5) / n_voxels
    ncsnr_true = np.clip(
        ncsnr.median * np.exp(ncsnr.log_sigma * norm.ppf(quantiles)), ncsnr.min, ncsnr.max
    )
    return SubjectSimulation(
        voxel_ijk=ijk,
        population=population,
        rf_center=rf_center,
        rf_sigma=rf_sigma,
        channel_weights=channel_weights,
        semantic_tuning=semantic_tuning,
        ncsnr_true=ncsnr_true,
        noise_sd=1.0 / ncsnr_true,
        baseline=drift.baseline_sd * rng.standard_normal(n_voxels),
    )


def neural_drive(sim: SubjectSimulation, channels: np.ndarray, semantic: np.ndarray, resolution: int) -> np.ndarray:
    """Linear drive before the nonlinearity: ``(N, V)`` float32.

    channels: ``(N, 4, resolution**2)`` from :func:`image_channels`; semantic: ``(N, F)``.
    """
    n = channels.shape[0]
    drive = np.zeros((n, len(sim.population)), dtype=np.float32)
    early = np.flatnonzero(sim.population == 0)
    if len(early):
        coords = (np.arange(resolution) + 0.5) / resolution
        gy, gx = np.meshgrid(coords, coords, indexing="ij")
        grid = np.stack([gx.ravel(), gy.ravel()], -1)  # (P, 2) as (x, y)
        d2 = ((grid[None] - sim.rf_center[early, None, :]) ** 2).sum(-1)  # (Ve, P)
        rf = np.exp(-d2 / (2 * sim.rf_sigma[early, None] ** 2))
        rf /= rf.sum(1, keepdims=True)
        # (N, 4, P) x (Ve, P) -> (N, 4, Ve), then weight channels per voxel
        pooled = np.einsum("ncp,vp->ncv", channels, rf.astype(np.float32), optimize=True)
        drive[:, early] = np.einsum("ncv,vc->nv", pooled, sim.channel_weights[early].astype(np.float32))
    higher = np.flatnonzero(sim.population == 1)
    if len(higher):
        drive[:, higher] = semantic @ sim.semantic_tuning[higher].T.astype(np.float32)
    return drive


def noise_free_responses(
    sim: SubjectSimulation, drive: np.ndarray, *, nonlinearity_gain: float = 1.5, fit: bool = False
) -> np.ndarray:
    """Standardised drive -> softplus -> unit signal variance per voxel. ``(N, V)`` float32.

    With ``fit=True`` the standardisation constants are estimated from ``drive`` and stored on
    ``sim`` (done once, on all images the subject sees) so later calls are consistent.
    """
    if fit:
        sim.drive_mean = drive.mean(0)
        sim.drive_std = drive.std(0) + 1e-8
    z = (drive - sim.drive_mean) / sim.drive_std
    r = np.logaddexp(0.0, nonlinearity_gain * z + 0.5)  # softplus: rectifying, smooth
    if fit:
        sim.response_mean = r.mean(0)
        sim.response_std = r.std(0) + 1e-8
    return ((r - sim.response_mean) / sim.response_std).astype(np.float32)


def oracle_log_likelihood(
    responses: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    noise_sd: np.ndarray,
    group: np.ndarray,
    candidates: np.ndarray,
) -> np.ndarray:
    """Gaussian log-likelihood of every test brain response under every candidate image.

    responses: ``(T, V)`` raw test trials (before any normalisation); gain/offset: ``(T, V)`` the
    drift of each trial's session (baseline folded into offset); noise_sd: ``(V,)``;
    group: ``(T,)`` which brain query (0..Q-1) each trial belongs to (repetitions of one image);
    candidates: ``(C, V)`` noise-free responses of the candidate images.

    Each trial is un-drifted, x = (y - offset) / gain ~ N(f, (noise_sd / gain)^2); the
    repetitions of a query are combined by their precision-weighted mean (a sufficient statistic).
    Returns ``(Q, C)`` float64 log-likelihoods, up to a constant shared by all entries.
    """
    x = (responses - offset) / gain
    w = gain**2 / noise_sd[None, :] ** 2  # precision per trial and voxel
    n_q = int(group.max()) + 1
    w_sum = np.zeros((n_q, x.shape[1]))
    wx_sum = np.zeros((n_q, x.shape[1]))
    np.add.at(w_sum, group, w)
    np.add.at(wx_sum, group, w * x)
    xbar = wx_sum / w_sum
    f = candidates.astype(np.float64)
    # -1/2 sum_v W_qv (xbar_qv - f_cv)^2 + 1/2 sum_v log W_qv
    quad = (w_sum * xbar**2).sum(1)[:, None] - 2 * (w_sum * xbar) @ f.T + w_sum @ (f**2).T
    return -0.5 * quad + 0.5 * np.log(w_sum).sum(1)[:, None]
