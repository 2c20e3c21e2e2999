"""V2C clustering (docs/methods/brainit.md §2) and nearest-neighbour mapping of new subjects (§7)."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.models.voxel_clusters import (
    VoxelClusters,
    assign_new_subject,
    cluster_agreement,
    fit_voxel_clusters,
    functional_labels,
    nearest_reference,
    normalize_embeddings,
)


def _blobs(seed: int = 0, k: int = 5, e: int = 6, sizes=(80, 120)) -> tuple[dict, dict, np.ndarray]:
    """Voxel embeddings around ``k`` shared directions (random norms, so only the direction
    identifies the group): (embeddings, true groups, directions)."""
    rng = np.random.default_rng(seed)
    dirs = normalize_embeddings(rng.standard_normal((k, e)))
    emb, groups = {}, {}
    for i, n in enumerate(sizes):
        g = rng.integers(0, k, n)
        emb[f"s{i}"] = (dirs[g] + 0.05 * rng.standard_normal((n, e))) * rng.uniform(0.5, 3.0, (n, 1))
        groups[f"s{i}"] = g
    return emb, groups, dirs


def _clusters() -> VoxelClusters:
    return VoxelClusters(labels={"a": np.array([2, 0, 2, 2, 1]), "b": np.array([0, 0, 2])},
                         centers=np.eye(3, 4, dtype=np.float32),
                         embeddings={"a": normalize_embeddings(np.arange(20.0).reshape(5, 4) + 1),
                                     "b": normalize_embeddings(np.ones((3, 4)))},
                         n_clusters=4, reference_subjects=["a", "b"], info={"seed": 0, "note": "hand-made"})


def test_mapping_array_pads_with_minus_one():
    c = _clusters()
    np.testing.assert_array_equal(c.mapping_array("a"), [[1, -1, -1], [4, -1, -1], [0, 2, 3], [-1, -1, -1]])
    np.testing.assert_array_equal(c.mapping_array("b"), [[0, 1], [-1, -1], [2, -1], [-1, -1]])
    # joint array: indices into the concatenation a (0..4) + b (5..7)
    np.testing.assert_array_equal(c.mapping_array(), [[1, 5, 6, -1], [4, -1, -1, -1], [0, 2, 3, 7], [-1] * 4])
    assert c.mapping_array("a").dtype == np.int64
    np.testing.assert_array_equal(c.cluster_sizes(), [3, 1, 4, 0])
    with pytest.raises(KeyError, match="'zz'"):
        c.mapping_array("zz")


def test_save_load_round_trip_is_atomic(tmp_path):
    c = _clusters()
    c.nearest["b"] = np.array([[0, 1], [0, 4], [0, 0]])
    path = c.save(tmp_path / "v2c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2c.npz"]  # no temporary file left behind
    back = VoxelClusters.load(path)
    assert back.subjects == ["a", "b"] and back.reference_subjects == ["a", "b"]
    assert back.n_clusters == 4 and back.info == c.info
    np.testing.assert_array_equal(back.centers, c.centers)
    for s in c.subjects:
        np.testing.assert_array_equal(back.labels[s], c.labels[s])
        np.testing.assert_array_equal(back.embeddings[s], c.embeddings[s])
        np.testing.assert_array_equal(back.mapping_array(s), c.mapping_array(s))
    np.testing.assert_array_equal(back.nearest["b"], c.nearest["b"])
    assert "a" not in back.nearest


def test_load_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        VoxelClusters.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    with pytest.raises(ValueError, match="bad.npz"):
        VoxelClusters.load(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, format_version=np.array(1), subjects=np.array(["a"]), labels_0=np.zeros(3, np.int64))
    with pytest.raises(KeyError, match=r"partial.npz has no field 'centers'"):
        VoxelClusters.load(partial)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format_version=np.array(1), subjects=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz: field 'subjects'"):  # object arrays are refused, not unpickled
        VoxelClusters.load(pickled)


def test_fit_is_joint_seeded_and_checks_k():
    emb, groups, _ = _blobs()
    c = fit_voxel_clusters(emb, n_clusters=5, seed=0)
    assert c.centers.shape == (5, 6) and c.reference_subjects == ["s0", "s1"]
    assert {s: v.shape for s, v in c.labels.items()} == {"s0": (80,), "s1": (120,)}
    assert all(v.dtype == np.int64 for v in c.labels.values())
    np.testing.assert_allclose(np.linalg.norm(c.embeddings["s1"], axis=1), 1.0, rtol=1e-5)
    # one clustering for both subjects: pooled agreement with the planted groups is perfect
    assert cluster_agreement(c, groups)["ari"] == pytest.approx(1.0)
    again = fit_voxel_clusters(emb, n_clusters=5, seed=0)
    assert all(np.array_equal(c.labels[s], again.labels[s]) for s in emb)
    assert c.info["seed"] == 0 and c.info["n_voxels"] == {"s0": 80, "s1": 120}
    with pytest.raises(ValueError, match="n_clusters=201"):
        fit_voxel_clusters(emb, n_clusters=201)
    with pytest.raises(ValueError, match="widths"):
        fit_voxel_clusters({"a": np.ones((3, 4)), "b": np.ones((3, 5))}, n_clusters=2)


def test_assign_new_subject_inherits_nearest_reference_cluster():
    emb, groups, _ = _blobs(seed=1)
    c = fit_voxel_clusters(emb, n_clusters=5, seed=0)
    rng = np.random.default_rng(2)
    src_subject = rng.integers(0, 2, 50)
    src_voxel = np.array([rng.integers(0, len(groups[f"s{s}"])) for s in src_subject])
    copies = np.stack([emb[f"s{s}"][v] for s, v in zip(src_subject, src_voxel, strict=True)])
    new = copies * rng.uniform(0.5, 2.0, (50, 1)) + 1e-4 * rng.standard_normal(copies.shape)
    labels, nearest = assign_new_subject(c, "new", new, max_elements=37)  # tiny chunks
    np.testing.assert_array_equal(nearest, np.stack([src_subject, src_voxel], 1))
    np.testing.assert_array_equal(labels, [c.labels[f"s{s}"][v] for s, v in zip(src_subject, src_voxel, strict=True)])
    assert c.labels["new"] is labels and c.nearest["new"] is nearest and "new" in c.embeddings
    assert c.reference_subjects == ["s0", "s1"]  # the new subject does not become a reference
    assert c.mapping_array("new").shape[0] == 5
    with pytest.raises(ValueError, match="width"):
        assign_new_subject(c, "other", np.ones((3, 4)))
    with pytest.raises(ValueError, match="reference subject"):
        assign_new_subject(c, "s0", new)


def test_nearest_reference_matches_brute_force():
    rng = np.random.default_rng(3)
    ref, q = rng.standard_normal((300, 5)), rng.standard_normal((40, 5))
    brute = np.linalg.norm(q[:, None] - ref[None], axis=-1).argmin(1)
    np.testing.assert_array_equal(nearest_reference(ref, q, max_elements=1000), brute)
    np.testing.assert_array_equal(nearest_reference(ref, q), brute)


def test_functional_labels_on_a_hand_made_simulator():
    nan = np.nan
    sim = {
        "population": np.array([0, 0, 0, 1, 1, 1], dtype=np.int8),
        "rf_center": np.array([[0.1, 0.1], [0.9, 0.1], [0.5, 0.98], [nan, nan], [nan, nan], [nan, nan]]),
        "semantic_tuning": np.array([[0, 0, 0]] * 3 + [[0.2, -0.9, 0.1], [0.5, 0.1, 0.0], [0.0, 0.3, 0.4]]),
    }
    # cell = iy * 3 + ix: (0,0) -> 0, (x=2,y=0) -> 2, (x=1,y=2) -> 7; higher: 9 + argmax |tuning|
    np.testing.assert_array_equal(functional_labels(sim), [0, 2, 7, 10, 9, 11])
    np.testing.assert_array_equal(functional_labels(sim, rf_grid=2), [0, 1, 3, 5, 4, 6])
    np.testing.assert_array_equal(functional_labels(sim, signed=True), [0, 2, 7, 13, 9, 11])  # -0.9 -> 9 + 3 + 1
    with pytest.raises(KeyError, match="'rf_center'"):
        functional_labels({"population": sim["population"], "semantic_tuning": sim["semantic_tuning"]})


def test_cluster_agreement_baselines():
    rng = np.random.default_rng(4)
    coords = {s: rng.integers(0, 20, (n, 3)) for s, n in (("a", 150), ("b", 100))}
    truth = {s: (c[:, 0] >= 10).astype(int) * 2 + (c[:, 1] >= 10) for s, c in coords.items()}  # anatomical quadrants
    clusters = VoxelClusters(labels={s: (3 - t).astype(np.int64) for s, t in truth.items()},  # renamed, same partition
                             centers=np.zeros((4, 2)), embeddings={}, n_clusters=4)
    out = cluster_agreement(clusters, truth, coords=coords, seed=0)
    assert out["ari"] == pytest.approx(1.0) and out["ari_per_subject"] == pytest.approx({"a": 1.0, "b": 1.0})
    assert abs(out["random_ari"]) < 0.05 and set(out["random_ari_per_subject"]) == {"a", "b"}
    assert 0.3 < out["anatomical_ari"] <= 1.0  # truth is anatomical here, so KMeans on coordinates does well
    assert "anatomical_ari" not in cluster_agreement(clusters, truth)
    with pytest.raises(ValueError, match="'a'"):
        cluster_agreement(clusters, {"a": truth["a"][:-1]})
