"""Retrieval metric against a brute-force reference, and its direction semantics."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.metrics.retrieval import (
    retrieval_accuracy,
    retrieval_from_scores,
    retrieval_subsets,
)


def _brute_force(brain, image, subsets, k=1):
    b2i, i2b = [], []
    for idx in subsets:
        bn = brain[idx] / np.linalg.norm(brain[idx], axis=1, keepdims=True)
        im = image[idx] / np.linalg.norm(image[idx], axis=1, keepdims=True)
        hits_b, hits_i = 0, 0
        for q in range(len(idx)):
            sims = [float(bn[q] @ im[c]) for c in range(len(idx))]
            hits_b += sum(s > sims[q] for s in sims) < k
            sims = [float(im[q] @ bn[c]) for c in range(len(idx))]
            hits_i += sum(s > sims[q] for s in sims) < k
        b2i.append(hits_b / len(idx))
        i2b.append(hits_i / len(idx))
    return np.mean(b2i), np.mean(i2b)


@pytest.mark.parametrize("k", [1, 5])
def test_matches_brute_force_with_subsets(k):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((50, 4, 3))
    brain = image + 1.5 * rng.standard_normal(image.shape)
    res = retrieval_accuracy(brain, image, subset_size=20, n_subsets=7, seed=42, ks=(1, 5))
    subsets = [s for s in retrieval_subsets(50, 20, 7, 42)]
    assert len(subsets) == 7 and all(len(s) == 20 and len(set(s)) == 20 for s in subsets)
    ref_b2i, ref_i2b = _brute_force(brain.reshape(50, -1), image.reshape(50, -1), subsets, k)
    assert res.mean("brain_to_image", k) == pytest.approx(ref_b2i)
    assert res.mean("image_to_brain", k) == pytest.approx(ref_i2b)
    assert 0 < res.mean("brain_to_image", 1) < 1


def test_subsets_follow_numpy_legacy_rng():
    # MindEye2 draws subsets with np.random.choice after seeding the legacy RNG with 42
    rs = np.random.RandomState(42)
    expected = [rs.choice(1000, 300, replace=False) for _ in range(30)]
    got = retrieval_subsets(1000, 300, 30, 42)
    assert all((a == b).all() for a, b in zip(got, expected, strict=True))
    assert len(retrieval_subsets(300, 300, 30, 42)) == 1


def test_directions_are_distinct():
    # brain 0 is closest to image 1, but image 0's closest brain is still brain 0
    scores = np.array([[0.5, 0.9, 0.0], [0.4, 1.0, 0.0], [0.0, 0.0, 1.0]])
    res = retrieval_from_scores(scores)
    assert res.mean("brain_to_image") == pytest.approx(2 / 3)
    assert res.mean("image_to_brain") == pytest.approx(1.0)


def test_ci_and_summary():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 8))
    res = retrieval_accuracy(x + rng.standard_normal(x.shape), x, subset_size=300, n_subsets=30)
    s = res.summary()
    v = res.values["brain_to_image"][1]
    assert s["brain_to_image_top1_ci95"] == pytest.approx(1.959963984540054 * v.std(ddof=0) / np.sqrt(30))
    with pytest.raises(ValueError, match="square"):
        retrieval_from_scores(np.zeros((3, 4)))


def test_posterior_scores_for_image_queries():
    # brain 1 has large likelihoods under every image, brain 0 small ones: raw likelihoods make
    # image 0 pick brain 1, the posterior picks brain 0, whose own best match is image 0
    loglik = np.array([[-1.0, -1.2], [-0.5, 5.0]])
    raw = retrieval_from_scores(loglik)
    post = retrieval_from_scores(loglik, posterior=True)
    assert raw.mean("image_to_brain") == pytest.approx(0.5)
    assert post.mean("image_to_brain") == pytest.approx(1.0)
    assert raw.mean("brain_to_image") == post.mean("brain_to_image") == pytest.approx(1.0)


def test_ci95_default_is_mindeye2_norm_interval():
    """MindEye2 final_evaluations: stats.norm.interval(0.95, loc=mean, scale=np.std(v)/sqrt(n))."""
    from scipy import stats

    from braindecode_fw.metrics.retrieval import ci95_half_width, retrieval_from_scores

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 60)) + 3 * np.eye(60)
    res = retrieval_from_scores(scores, subset_size=20, n_subsets=30, seed=1)
    for d in ("brain_to_image", "image_to_brain"):
        v = res.values[d][1]
        lo, hi = stats.norm.interval(0.95, loc=np.mean(v), scale=np.std(v) / np.sqrt(len(v)))
        assert abs(res.ci95(d) - (hi - lo) / 2) < 1e-12
        assert abs(res.ci95(d, method="sample_sd_1.96") - 1.96 * np.std(v, ddof=1) / np.sqrt(len(v))) < 1e-12
    with pytest.raises(ValueError, match="metrics.retrieval.ci_method"):
        ci95_half_width(np.ones(3), "t")


def test_report_states_the_candidate_count_actually_used_and_writes_strict_json(tmp_path):
    """A test set smaller than ``subset_size`` is scored as one subset of all its images: the table
    says 150-way, not the configured 300; NaN (a subject without an oracle) is written as null."""
    import json

    from braindecode_fw.metrics.report import format_table, retrieval_report, write_report

    rng = np.random.default_rng(0)
    small = {"s1": {"pred": rng.standard_normal((150, 8)), "target": rng.standard_normal((150, 8))}}
    report = retrieval_report(small, subset_size=300, n_subsets=30)
    title = format_table(report).splitlines()[0]
    assert "150-way (all test images where fewer than subset_size=300)" in title and "one subset" in title
    assert report["rows"][0]["chance_top1"] == 1 / 150
    large = {"s1": {"pred": rng.standard_normal((400, 8)), "target": rng.standard_normal((400, 8))}}
    assert "(300-way, cosine similarity, 30 random subsets)" in format_table(retrieval_report(large, subset_size=300))
    json_path = write_report(report, tmp_path)[0]
    text = json_path.read_text()
    assert "NaN" not in text
    row = json.loads(text)["rows"][0]  # strict parsers accept it
    assert row["oracle_brain_to_image_top1"] is None
