"""Two-way identification, correlation distance and the chunked similarity matrix against
independent numpy/scipy computations written the way MindEye2's notebook does them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import correlation as scipy_correlation

from braindecode_fw.metrics.correlation import similarity_matrix
from braindecode_fw.metrics.identification import correlation_distance, two_way_identification


def _reference_two_way(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """MindEye2 final_evaluations: corrcoef of stacked features, strict <, per-recon counts."""
    n = len(gt)
    r = np.corrcoef(np.concatenate([gt, rec]).astype(np.float32))[:n, n:]
    congruent = np.diag(r)
    success = r < congruent  # broadcast over rows i: R[i, j] < R[j, j]
    return success.sum(axis=0) / (n - 1)


def _features(n=12, d=500, noise=12.0, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.normal(size=(n, d)).astype(np.float32)
    return gt, (gt + noise * rng.normal(size=(n, d))).astype(np.float32)


def test_two_way_matches_reference():
    gt, rec = _features()
    ours = two_way_identification(torch.from_numpy(gt), torch.from_numpy(rec))
    ref = _reference_two_way(gt, rec)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    assert 0.5 < ours.mean() < 1.0  # informative but imperfect at this noise level


def test_two_way_chunking_is_exact():
    gt, rec = _features(n=10, d=3001)
    whole = two_way_identification(gt, rec, chunk_mb=1024)
    tiny = two_way_identification(gt, rec, chunk_mb=0.001)  # one feature column per chunk
    assert torch.equal(whole, tiny)
    a = similarity_matrix(gt, rec, center=True, chunk_mb=0.001)
    np.testing.assert_allclose(a.numpy(), np.corrcoef(np.concatenate([gt, rec]).astype(np.float64))[:10, 10:],
                               atol=1e-12)


def test_two_way_edge_cases():
    gt, rec = _features(n=2)
    np.testing.assert_array_equal(two_way_identification(gt, rec).numpy(), _reference_two_way(gt, rec))
    assert torch.equal(two_way_identification(gt, gt), torch.ones(2, dtype=torch.float64))  # identical -> 1
    with pytest.raises(ValueError, match="at least 2 images"):
        two_way_identification(gt[:1], rec[:1])
    with pytest.raises(ValueError, match="2 ground-truth and 3 reconstruction"):
        two_way_identification(gt, np.concatenate([rec, rec[:1]]))


def test_two_way_constant_features_fail_without_nan():
    gt, rec = _features(n=6)
    rec[2] = 1.0  # a blank reconstruction: its correlations are undefined
    gt[4] = 0.0  # a blank ground truth
    ours = two_way_identification(gt, rec).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = _reference_two_way(gt, rec)  # NaN comparisons are False in numpy too
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours[2] == 0.0 and np.isfinite(ours).all()


def test_correlation_distance_matches_scipy():
    gt, rec = _features(n=5, d=1280)
    ours = correlation_distance(gt, rec).numpy()
    ref = [scipy_correlation(gt[i].astype(np.float64), rec[i].astype(np.float64)) for i in range(5)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_allclose(correlation_distance(gt, gt).numpy(), 0.0, atol=1e-12)
    rec[0] = 3.0
    assert correlation_distance(gt, rec)[0] == 1.0  # constant features: r = 0, distance 1, no NaN


@pytest.mark.slow
def test_two_way_at_nsd_scale_within_memory():
    """1,000 × 184,512-d (AlexNet features.4 at 256): the full float64 copy would be 2.9 GB; the
    chunked computation adds ~0.3 GB and agrees with a float64 reference on a column subset."""
    import resource

    n, d = 1000, 184_512
    gen = torch.Generator().manual_seed(0)
    gt = torch.randn(n, d, generator=gen)
    rec = gt + 3.0 * torch.randn(n, d, generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = two_way_identification(gt, rec)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert scores.shape == (n,) and 0.9 < float(scores.mean()) <= 1.0
    assert grown_mb < 1500, grown_mb
    sub = np.r_[0:5, 500:505]  # the same chunked path on a block small enough for np.corrcoef
    ref = np.corrcoef(np.concatenate([gt[sub].double().numpy(), rec[sub].double().numpy()]))[:10, 10:]
    np.testing.assert_allclose(similarity_matrix(gt[sub], rec[sub], center=True).numpy(), ref, atol=1e-10)
