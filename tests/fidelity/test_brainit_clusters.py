"""Brain-IT's voxel clustering (V2C, stage 0) and new-subject mapping against golden values from the
authors' released scripts ``data/scripts/get_clusters.py`` and
``data/scripts/transfer/map_clusters_transfer.py``, run unmodified at a tiny scale
(tests/fidelity/reference/make_brainit_clusters.py; tests/fidelity/golden/brainit_clusters/provenance.json).

Covered: the L2 normalisation of the encoder's voxel embeddings (bit for bit), the GaussianMixture
labels (exact) and means, the ``(K, max size)`` V2C mapping padded with -1 (exact); the transfer's
nearest reference voxel per new voxel (``nn_vox``, a flat index into the reference subjects'
concatenation), the labels it inherits and its mapping (exact), for a new subject drawn like the
references and for one of near-ties that only the release's float64 search decides (ours given the
raw reference embeddings, and the stage-0 transfer path). The released call has no
``random_state``: the fixture forced ``random_state=0`` and our fit runs with ``seed=0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fidelity.golden import assert_golden, golden_dir, load_golden

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
if not (golden_dir("brainit_clusters") / "expected.safetensors").is_file():
    pytest.skip("no Brain-IT clustering golden fixture", allow_module_level=True)

from braindecode_fw.models.voxel_clusters import (  # noqa: E402
    assign_new_subject,
    fit_voxel_clusters,
    nearest_reference,
    normalize_embeddings,
)

METHOD = "brainit_clusters"
TRANSFERS = ("transfer", "ties")
INTEGER_PARTS = ["clusters/labels", "clusters/mapping",
                 *[f"{p}/{k}" for p in TRANSFERS for k in ("labels", "mapping", "nn_vox")]]


@pytest.fixture(scope="module")
def golden():
    _, inputs, expected, prov = load_golden(METHOD)
    cfg = prov["config"]
    references = {s: inputs[f"embeddings/{s}"].numpy() for s in cfg["subjects"]}
    new = {part: next(iter(cfg[key])) for part, key in zip(TRANSFERS, ("new_subject", "tie_subject"), strict=True)}
    return references, {part: inputs[f"embeddings/{s}"].numpy() for part, s in new.items()}, expected, cfg


def _fit(references: dict, cfg: dict, **overrides):
    return fit_voxel_clusters(references, **{"n_clusters": cfg["clusters"], "seed": cfg["gmm_seed"], **overrides})


def _flat(clusters, nearest: np.ndarray) -> np.ndarray:
    """Our ``(reference subject, voxel)`` pairs -> the release's index into their concatenation."""
    starts = np.cumsum([0, *[len(clusters.embeddings[s]) for s in clusters.reference_subjects]])[:-1]
    return starts[nearest[:, 0]] + nearest[:, 1]


def _ours(references: dict, new: dict, cfg: dict) -> dict[str, torch.Tensor]:
    clusters = _fit(references, cfg)
    actual = {"clusters/normalized": np.concatenate([clusters.embeddings[s] for s in references]),
              "clusters/labels": np.concatenate([clusters.labels[s] for s in references]),
              "clusters/centers": clusters.centers, "clusters/mapping": clusters.mapping_array()}
    for part, embeddings in new.items():
        # the ordinary subject from the stored (float32-normalised) references; the near-ties need
        # the raw reference embeddings, normalised in float64 as released
        extra = {"reference_embeddings": references} if part == "ties" else {}
        labels, nearest = assign_new_subject(clusters, part, embeddings, **extra)
        actual.update({f"{part}/normalized": clusters.embeddings[part], f"{part}/labels": labels,
                       f"{part}/nn_vox": _flat(clusters, nearest), f"{part}/mapping": clusters.mapping_array(part)})
    return {k: torch.from_numpy(np.asarray(v)) for k, v in actual.items()}


def test_clustering_and_transfer_match_the_released_scripts(golden):
    references, new, expected, cfg = golden
    actual = _ours(references, new, cfg)
    for key in INTEGER_PARTS:
        assert actual[key].dtype == torch.int64, key
    assert_golden(actual, expected, METHOD, atol=0.0, keys=[*INTEGER_PARTS, "clusters/normalized"])
    assert_golden(actual, expected, METHOD, keys=["clusters/centers"])
    # the released transfer normalises in float64 (sklearn's normalize of a torch tensor); we store float32
    assert_golden(actual, expected, METHOD, atol=2e-7, keys=[f"{p}/normalized" for p in TRANSFERS])
    for p in TRANSFERS:
        assert torch.equal(torch.from_numpy(normalize_embeddings(new[p], np.float64)), expected[f"{p}/normalized"])


def test_stage0_transfer_search_is_the_released_nn_vox(golden):
    """What brainit_stage0.transfer_initialise computes: raw embeddings normalised in float64, then
    the nearest reference voxel."""
    references, new, expected, _ = golden
    reference = normalize_embeddings(np.concatenate(list(references.values())), np.float64)
    for part, embeddings in new.items():
        nearest = nearest_reference(reference, normalize_embeddings(embeddings, np.float64), max_elements=100)
        np.testing.assert_array_equal(nearest, expected[f"{part}/nn_vox"].numpy(), err_msg=part)


def test_the_fixture_is_sensitive(golden):
    """What the golden test would catch: another seed, an unnormalised fit or neighbour search,
    a float32 search, one perturbed voxel, another K."""
    references, new, expected, cfg = golden
    labels = expected["clusters/labels"].numpy()

    def pooled(c) -> np.ndarray:
        return np.concatenate([c.labels[s] for s in references])

    assert (pooled(_fit(references, cfg, seed=cfg["gmm_seed"] + 1)) != labels).sum() > 10
    from sklearn.mixture import GaussianMixture
    raw = np.concatenate(list(references.values()))
    unnormalised = GaussianMixture(cfg["clusters"], random_state=cfg["gmm_seed"]).fit(raw).predict(raw)
    assert (unnormalised != labels).sum() > 10
    assert (nearest_reference(raw, new["transfer"]) != expected["transfer/nn_vox"].numpy()).sum() > 5
    # a float32 search (or float32-normalised references) resolves the near-ties differently
    float32 = nearest_reference(normalize_embeddings(raw), normalize_embeddings(new["ties"]))
    assert (float32 != expected["ties/nn_vox"].numpy()).sum() > 3
    clusters = _fit(references, cfg)
    _, nearest = assign_new_subject(clusters, "ties", new["ties"])
    assert (_flat(clusters, nearest) != expected["ties/nn_vox"].numpy()).sum() > 3
    perturbed = {s: x.copy() for s, x in references.items()}
    first = next(iter(perturbed))
    perturbed[first][0] *= -1
    assert (pooled(_fit(perturbed, cfg)) != labels).sum() > 0
    assert _fit(references, cfg, n_clusters=cfg["clusters"] + 1).mapping_array().shape != \
        tuple(expected["clusters/mapping"].shape)
