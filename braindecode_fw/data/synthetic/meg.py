"""Simulated MEG with a known generative model (docs/architecture.md §5, "an MEG variant").

The sources are the fMRI world's populations (:func:`fmri.build_subject`): a retinotopic early
population and a semantically tuned higher population, each source with an image-dependent
amplitude ``f[i, v]`` (:func:`fmri.noise_free_responses`, unit variance over images). Here they get
time courses and are mixed into the 272 THINGS-MEG sensors (docs/datasets/things_meg.md, docs/methods/meg_brainmodule.md §1)::

    y[t] (C, T) = s[i] + e,      s[i][c, t] = gain * sum_v L[c, v] * (evoked + f[i, v]) * K[v, t]
    e ~ N(0, Sigma),             Sigma = (1 - w) * Sigma_space ⊗ Sigma_1/f  +  w * I ⊗ I

- ``K[v]`` (:func:`temporal_kernels`): a difference of gamma functions peaking at the source's
  latency: early sources ~80-130 ms with a short kernel, higher sources ~200-400 ms with a longer one
  (visual evoked fields: M100 then the later category-selective components). Latencies are drawn
  from a smooth random field over the volume, so neighbouring sources have similar latencies.
- ``L`` (:func:`lead_field`): each source is placed on the 2-D sensor plane (its volume position
  through a subject-specific rotation/offset, posterior sources over the occipital sensors) and
  contributes the directional derivative of a Gaussian of the sensor-source distance along its
  orientation: a smooth +/- dipolar topography whose width grows with source depth. Columns have unit
  norm; ``gain`` is set so that the image-specific signal has RMS ``snr`` over sensors and
  post-stimulus samples while the noise has unit variance per sensor and sample.
- Noise: a 1/f^alpha component, spatially correlated through the same kind of lead field ("brain
  noise" from random sources) plus independent sensor noise, and a white floor. Its temporal
  covariance is *circulant* over the epoch (drawn as independent coefficients of the real Fourier
  basis, i.e. the rFFT domain, scaled by sqrt(PSD)), so the noise is exactly diagonal in the basis (eigenvectors ``U`` of ``Sigma_space``) x (real Fourier basis over the T
  samples) with variances ``D[j, k] = (1 - w) lambda_j p(f_k) + w`` (:class:`NoiseModel`). That makes
  the whitening, and hence the oracle, exact. The price: the noise wraps around the epoch edges.

Baseline correction (subtracting a per-channel constant) only touches the DC Fourier coefficient,
which is an eigenvector of the circulant covariance; the exact likelihood of baseline-corrected
data is therefore the whitened distance with the DC coefficient left out
(:func:`oracle_log_likelihood`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft

from braindecode_fw.data.synthetic.fmri import SubjectSimulation, _smooth_field
from braindecode_fw.schema import FROM_YAML, config_dataclass, setting


@dataclass
class KernelConfig:
    """Temporal response of one population: difference of gamma functions (seconds). No defaults of its
    own: ``world.early_kernel`` and ``world.higher_kernel`` of braindecode_fw/conf/dataset/synthetic_meg.yaml
    hold them (two populations, two settings)."""

    latency: list[float] = field(metadata={"gt": 0})  # peak latency range, drawn smoothly
    shape: float = field(metadata={"gt": 0})  # gamma shape: peak width ~ latency / sqrt(shape)
    rebound: float = field(metadata={"min": 0})  # amplitude of the opposite-sign later lobe (at twice the latency)


@config_dataclass("dataset/synthetic_meg.yaml", "world.lead_field", key="dataset.world.lead_field")
class LeadFieldConfig:
    """Smooth source -> sensor mixing on the 2-D CTF-275 sensor plane (positions in [0, 1]²); defaults:
    ``world.lead_field`` of braindecode_fw/conf/dataset/synthetic_meg.yaml."""

    width: list[float] = setting(gt=0)  # Gaussian sd, superficial -> deep source
    plane_scale: float = setting(gt=0)  # extent of the source volume on the sensor plane
    plane_centre: list[float] = FROM_YAML  # posterior: visual cortex
    subject_rotation_deg: float = setting(min=0)  # sd of the subject-specific rotation of the source map
    subject_offset: float = setting(min=0)  # sd of the subject-specific shift of the source map
    orientation_smoothness: float = setting(min=0)  # spatial smoothness (voxels) of source orientations


@config_dataclass("dataset/synthetic_meg.yaml", "world.noise", key="dataset.world.noise")
class MEGNoiseConfig:
    """Noise per trial, unit variance per sensor and sample on average; defaults: ``world.noise`` of
    braindecode_fw/conf/dataset/synthetic_meg.yaml."""

    alpha: float = FROM_YAML  # PSD ∝ 1/f^alpha for the coloured part
    white_floor: float = FROM_YAML  # share of the variance that is white in time and space
    spatial_correlation: float = FROM_YAML  # share of the coloured part that is "brain noise" through a lead field
    n_brain_sources: int = setting(min=1)  # random noise sources behind the spatially correlated part


def real_fourier_basis(n_times: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal real Fourier basis over ``n_times`` samples: ``(T, T)`` rows [DC, cos_1..cos_K,
    sin_1..sin_K, (Nyquist for even T)], and ``(T,)`` the rFFT bin of each row. A circulant
    covariance is diagonal in this basis, with the PSD of each row's bin on the diagonal."""
    t = np.arange(n_times)
    n_pairs = (n_times - 1) // 2
    k = np.arange(1, n_pairs + 1)
    rows = [np.full((1, n_times), 1.0 / np.sqrt(n_times)),
            np.sqrt(2.0 / n_times) * np.cos(2 * np.pi * k[:, None] * t[None] / n_times),
            np.sqrt(2.0 / n_times) * np.sin(2 * np.pi * k[:, None] * t[None] / n_times)]
    bins = [np.zeros(1, dtype=np.int64), k, k]
    if n_times % 2 == 0:
        rows.append((-1.0) ** t[None] / np.sqrt(n_times))
        bins.append(np.array([n_times // 2]))
    return np.concatenate(rows), np.concatenate(bins)


def _time_transform(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(n, C, T) @ (T, T')`` as one flat matrix product (a stacked ``matmul`` does not use BLAS
    well for many small matrices)."""
    return (x.reshape(-1, x.shape[-1]) @ matrix).reshape(*x.shape[:-1], matrix.shape[1])


def _spatial_transform(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``M @ x[n]`` for every epoch: ``(C', C)``, ``(n, C, T)`` -> ``(n, C', T)`` (one tensordot)."""
    return np.einsum("cd,ndt->nct", matrix, x, optimize=True)


@dataclass
class NoiseModel:
    """The exact noise covariance, diagonal in (spatial eigenvectors ``U``) x (real Fourier basis).

    ``eigvecs``: ``(C, C)`` columns = eigenvectors of the spatial covariance of the coloured part;
    ``variance``: ``(C, F)`` noise variance of each (eigenvector, rFFT bin) pair, F = T//2 + 1;
    ``psd``: ``(F,)`` normalised 1/f^alpha spectrum of the coloured part at ``freqs`` (Hz);
    ``spatial_cov``: ``(C, C)``; ``n_times``: T. The full covariance of a vectorised epoch is
    ``(U ⊗ Phi^T) diag(variance[:, bin]) (U ⊗ Phi^T)^T`` with ``Phi`` from :func:`real_fourier_basis`.
    """

    eigvecs: np.ndarray
    variance: np.ndarray
    psd: np.ndarray
    freqs: np.ndarray
    spatial_cov: np.ndarray
    n_times: int

    @classmethod
    def from_arrays(cls, arrays: Any) -> NoiseModel:
        """Rebuild from a subject's ``simulator.npz`` (keys ``noise_*`` and ``times``)."""
        return cls(eigvecs=np.asarray(arrays["noise_eigvecs"]), variance=np.asarray(arrays["noise_variance"]),
                   psd=np.asarray(arrays["noise_psd"]), freqs=np.asarray(arrays["noise_freqs"]),
                   spatial_cov=np.asarray(arrays["noise_spatial_cov"]), n_times=int(len(arrays["times"])))

    def _coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Fourier basis ``(T, T)`` and noise sd per (eigenvector, basis row) ``(C, T)``."""
        basis, bins = real_fourier_basis(self.n_times)
        return basis, np.sqrt(self.variance[:, bins])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent noise epochs, float32 ``(n, C, T)``: iid N(0, 1) coordinates scaled by
        their sd, mapped back through the Fourier basis and the spatial eigenvectors (two small matrix
        products; faster than an FFT over the prime length 181)."""
        basis, sd = self._coordinates()
        c, t = sd.shape
        # drawn as (C, n, T) so both products are single flat GEMMs without intermediate transposes
        z = rng.standard_normal((c, n, t), dtype=np.float32)
        z *= sd[:, None, :].astype(np.float32)
        x = z.reshape(c * n, t) @ basis.astype(np.float32)  # time domain, still in the eigenbasis
        e = self.eigvecs.astype(np.float32) @ x.reshape(c, n * t)
        return np.ascontiguousarray(e.reshape(c, n, t).transpose(1, 0, 2))

    def whiten(self, x: np.ndarray, drop_dc: bool = False) -> np.ndarray:
        """``(n, C, T)`` -> ``(n, C * T')`` float64 coordinates in which the noise is exactly N(0, I),
        so Euclidean distances here are Mahalanobis distances. ``drop_dc`` leaves out the DC
        coefficient of every spatial component (T' = T - 1): what survives baseline correction."""
        basis, sd = self._coordinates()
        w = _time_transform(_spatial_transform(self.eigvecs.T, np.asarray(x, dtype=np.float64)), basis.T) / sd
        if drop_dc:
            w = w[..., 1:]
        return w.reshape(len(w), -1)


def time_axis(sfreq: float, tmin: float, tmax: float) -> np.ndarray:
    """Sample times in seconds: ``tmin + arange(T) / sfreq`` up to ``tmax`` inclusive, ``(T,)``
    (181 samples for 120 Hz over -0.5...1.0 s, docs/methods/meg_brainmodule.md §1)."""
    n = int(round((tmax - tmin) * sfreq)) + 1
    return tmin + np.arange(n) / sfreq


def _gamma_bump(t: np.ndarray, peak: np.ndarray, shape: float) -> np.ndarray:
    """Gamma-function bump ``(t / peak)^a exp(a (1 - t / peak))`` (1 at ``t = peak``, 0 for t <= 0).
    ``t``: ``(T,)``, ``peak``: ``(V,)`` -> ``(V, T)``."""
    r = np.clip(t[None, :], 0.0, None) / peak[:, None]
    with np.errstate(divide="ignore"):
        out = np.exp(shape * (np.log(r, where=r > 0, out=np.full_like(r, -np.inf)) + 1.0 - r))
    return np.where(r > 0, out, 0.0)


def source_latencies(sim: SubjectSimulation, volume_shape: tuple[int, int, int], early: KernelConfig,
                     higher: KernelConfig, smoothness: float, rng: np.random.Generator) -> np.ndarray:
    """Peak latency per source (s), ``(V,)``: each population's range filled through the ranks of a
    smooth random field over the volume, so latency varies smoothly across cortex."""
    field_ = _smooth_field(volume_shape, smoothness, rng)[0][tuple(sim.voxel_ijk.T)]
    lat = np.empty(len(sim.population))
    for pop, kc in ((0, early), (1, higher)):
        idx = np.flatnonzero(sim.population == pop)
        if len(idx):
            q = (np.argsort(np.argsort(field_[idx])) + 0.5) / len(idx)
            lat[idx] = kc.latency[0] + (kc.latency[1] - kc.latency[0]) * q
    return lat


def temporal_kernels(times: np.ndarray, latency: np.ndarray, population: np.ndarray,
                     early: KernelConfig, higher: KernelConfig) -> np.ndarray:
    """Difference-of-gammas kernel per source, ``(V, T)`` float64, zero for ``t <= 0`` and peaking
    (value ~1) near the source's latency; the later opposite-sign lobe mimics the biphasic shape of
    evoked fields."""
    k = np.zeros((len(latency), len(times)))
    for pop, kc in ((0, early), (1, higher)):
        idx = np.flatnonzero(population == pop)
        if len(idx):
            lat = latency[idx]
            k[idx] = _gamma_bump(times, lat, kc.shape) - kc.rebound * _gamma_bump(times, 2.0 * lat, kc.shape)
    return k


def dipolar_patterns(sensor_xy: np.ndarray, source_xy: np.ndarray, orientation: np.ndarray,
                     width: np.ndarray) -> np.ndarray:
    """Directional derivative of a Gaussian: ``(C, 2)`` sensors, ``(V, 2)`` source locations,
    ``(V,)`` orientation angles (rad), ``(V,)`` widths -> ``(C, V)`` unit-norm columns, a positive
    and a negative lobe on either side of the source along its orientation."""
    d = sensor_xy[:, None, :] - source_xy[None, :, :]  # (C, V, 2)
    direction = np.stack([np.cos(orientation), np.sin(orientation)], -1)  # (V, 2)
    proj = (d * direction[None]).sum(-1) / width[None]
    g = proj * np.exp(-(d**2).sum(-1) / (2 * width[None] ** 2))
    return g / (np.linalg.norm(g, axis=0, keepdims=True) + 1e-12)


def source_plane_positions(voxel_ijk: np.ndarray, volume_shape: tuple[int, int, int], cfg: LeadFieldConfig,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Map volume positions to the sensor plane: left-right -> x, posterior-anterior -> y (CTF-275:
    small y = occipital), through a subject-specific rotation and offset. Returns ``(V, 2)``
    positions and ``(V,)`` depth in [0, 1] (1 - superior position: inferior sources are deeper)."""
    pos = voxel_ijk / (np.asarray(volume_shape, dtype=np.float64) - 1)
    angle = np.deg2rad(cfg.subject_rotation_deg) * rng.standard_normal()
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    offset = cfg.subject_offset * rng.standard_normal(2)
    xy = np.asarray(cfg.plane_centre) + offset + cfg.plane_scale * (pos[:, :2] - 0.5) @ rot.T
    return xy, 1.0 - pos[:, 2]


def lead_field(sensor_xy: np.ndarray, voxel_ijk: np.ndarray, volume_shape: tuple[int, int, int],
               cfg: LeadFieldConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A subject's smooth lead field ``(C, V)`` (unit-norm columns) with what defines it:
    ``{"lead_field", "source_xy" (V, 2), "source_depth" (V,), "orientation" (V,), "width" (V,)}``.
    Orientations come from a smooth field over the volume, so neighbouring sources (a cortical
    patch) point alike and their fields add up rather than cancel."""
    xy, depth = source_plane_positions(voxel_ijk, volume_shape, cfg, rng)
    ori_field = _smooth_field(volume_shape, cfg.orientation_smoothness, rng)[0][tuple(voxel_ijk.T)]
    orientation = np.pi * ori_field  # standardised field -> angles spread over about +/- 2 pi
    width = cfg.width[0] + (cfg.width[1] - cfg.width[0]) * depth
    return {"lead_field": dipolar_patterns(sensor_xy, xy, orientation, width), "source_xy": xy,
            "source_depth": depth, "orientation": orientation, "width": width}


def noise_model(sensor_xy: np.ndarray, times: np.ndarray, sfreq: float, cfg: MEGNoiseConfig,
                lead: LeadFieldConfig, rng: np.random.Generator) -> NoiseModel:
    """Build the exact noise covariance of :class:`NoiseModel`.

    Spatial covariance of the coloured part: ``(1 - rho) I + rho Lb Lb^T`` (trace-normalised), Lb the
    patterns of ``n_brain_sources`` random dipoles over the sensor plane; temporal PSD of the coloured
    part ``1 / max(f, f_1)^alpha`` over the rFFT bins (f_1 = sfreq / T, so the DC bin is finite),
    normalised to unit mean variance; plus a white floor. Mean variance per sensor and sample = 1.
    """
    c, t = len(sensor_xy), len(times)
    src = rng.uniform(0.0, 1.0, size=(cfg.n_brain_sources, 2))
    ori = rng.uniform(0.0, 2 * np.pi, size=cfg.n_brain_sources)
    width = rng.uniform(lead.width[0], lead.width[1], size=cfg.n_brain_sources)
    lb = dipolar_patterns(sensor_xy, src, ori, width)
    brain = lb @ lb.T
    brain *= c / np.trace(brain)
    spatial = (1 - cfg.spatial_correlation) * np.eye(c) + cfg.spatial_correlation * brain
    lam, u = np.linalg.eigh(spatial)
    lam = np.clip(lam, 0.0, None)
    freqs = scipy.fft.rfftfreq(t, 1.0 / sfreq)
    psd = 1.0 / np.maximum(freqs, sfreq / t) ** cfg.alpha
    # mean over the full two-sided spectrum = variance per sample of a circulant process
    weights = np.full(len(freqs), 2.0)
    weights[0] = 1.0
    if t % 2 == 0:
        weights[-1] = 1.0
    psd /= (weights * psd).sum() / t
    variance = (1 - cfg.white_floor) * lam[:, None] * psd[None, :] + cfg.white_floor
    return NoiseModel(eigvecs=u, variance=variance, psd=psd, freqs=freqs, spatial_cov=spatial, n_times=t)


def signal_gain(lead: np.ndarray, kernels: np.ndarray, amplitudes: np.ndarray, times: np.ndarray,
                snr: float) -> float:
    """Global gain so the image-specific sensor signal has RMS ``snr`` over images, sensors and
    post-stimulus samples (noise: unit variance). Exact: ``E||L diag(a) K||² = sum_vw
    C_a[v, w] (L^T L)[v, w] (K K^T)[v, w]`` with ``C_a`` the amplitudes' covariance over images.

    lead ``(C, V)``, kernels ``(V, T)``, amplitudes ``(N, V)`` image-specific parts (zero mean)."""
    post = times > 0
    a = amplitudes - amplitudes.mean(0)
    cov_a = a.T.astype(np.float64) @ a / len(a)
    kp = kernels[:, post]
    power = float((cov_a * (lead.T @ lead) * (kp @ kp.T)).sum()) / (lead.shape[0] * post.sum())
    return snr / np.sqrt(power + 1e-30)


def mixing_matrix(lead: np.ndarray, kernels: np.ndarray, gain: float) -> np.ndarray:
    """``gain * L[c, v] * K[v, t]`` as one float32 ``(V, C*T)`` matrix, so that sensor signals of a
    batch of images are a single matrix product (:func:`sensor_signals`)."""
    c, t = lead.shape[0], kernels.shape[1]
    return (gain * lead.T[:, :, None] * kernels[:, None, :]).reshape(len(kernels), c * t).astype(np.float32)


def sensor_signals(amplitudes: np.ndarray, mix: np.ndarray, n_sensors: int, chunk: int = 256) -> np.ndarray:
    """Noise-free sensor time courses: ``(N, V)`` source amplitudes, ``(V, C*T)`` mixing matrix ->
    float32 ``(N, C, T)`` = ``gain * sum_v L[c, v] a[n, v] K[v, t]``, computed in chunks of images."""
    out = np.empty((len(amplitudes), mix.shape[1]), dtype=np.float32)
    for s in range(0, len(amplitudes), chunk):
        out[s : s + chunk] = amplitudes[s : s + chunk].astype(np.float32) @ mix
    return out.reshape(len(amplitudes), n_sensors, -1)


def oracle_log_likelihood(query_means: np.ndarray, n_repeats: np.ndarray, candidates: np.ndarray,
                          noise: NoiseModel) -> np.ndarray:
    """Gaussian log-likelihood of every test query under every candidate image (exact).

    query_means: ``(Q, C, T)`` mean of a query's ``n_repeats[q]`` baseline-corrected trials (the
    mean is a sufficient statistic: every trial has the same noise covariance); candidates:
    ``(M, C, T)`` noise-free sensor responses. The mean's noise is ``N(0, Sigma / R)``; in the whitened
    coordinates without the DC coefficient (which baseline correction discards, see the module doc)
    ``log p = -R/2 ||w(ybar) - w(s)||² + const``. Returns ``(Q, M)`` float64, up to a constant per query.
    """
    wq = noise.whiten(query_means, drop_dc=True)
    wc = noise.whiten(candidates, drop_dc=True)
    d2 = (wq**2).sum(1)[:, None] - 2 * wq @ wc.T + (wc**2).sum(1)[None, :]
    return -0.5 * np.asarray(n_repeats, dtype=np.float64)[:, None] * d2
