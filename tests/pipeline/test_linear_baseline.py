"""The ridge decoder baseline: exact ridge fit per subject on (sensors × times) features, scored with the
report's protocol next to the decoder."""

from __future__ import annotations

import numpy as np
import pytest

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.data.meg_layout import sensor_positions, things_meg_channel_names
from braindecode_fw.data.store import StoreWriter, TrialTable
from braindecode_fw.metrics.report import format_table, retrieval_report
from braindecode_fw.metrics.retrieval import retrieval_accuracy
from braindecode_fw.pipeline.linear_baseline import linear_baseline_predictions

D, C, T = 6, 5, 4


@pytest.fixture
def linear_world(tmp_path):
    """Responses are a fixed linear map of a 6-d image latent plus noise; 2 subjects, 60 train images
    each and 12 test images × 2 repetitions."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((200, D)).astype(np.float32)
    names = things_meg_channel_names()[:C]
    with StoreWriter(tmp_path / "store", name="lin", modality="meg") as w:
        w.write_images(np.zeros((200, 4, 4, 3), np.uint8), ids=[str(i) for i in range(200)])
        for s in range(2):
            mixing = rng.standard_normal((D, C * T))
            images = np.concatenate([20 + 60 * s + np.arange(60), np.repeat(np.arange(12), 2)])
            n = len(images)
            x = latents[images] @ mixing + 0.3 * rng.standard_normal((n, C * T))
            trials = TrialTable(trial_id=np.arange(n), image_index=images, session=np.zeros(n, int),
                                run=np.zeros(n, int), repeat=np.r_[np.zeros(60, int), np.tile([0, 1], 12)],
                                split=np.array(["train"] * 60 + ["test"] * 24))
            w.write_subject(f"s{s}", trials, x.reshape(n, C, T).astype(np.float32), sensor_names=names,
                            sensor_positions=sensor_positions(names), sfreq=120.0, tmin=-0.5)
        w.finalize(provenance={"source": "test", "zscore_at_load": False})
    dm = BrainDataModule(tmp_path / "store", None, batch_size=4, cache_dir=tmp_path / "cache")
    dm.setup()
    dm.targets = {"z": latents}  # the latent plays the frozen encoder's part
    return dm, latents


def test_ridge_baseline_equals_the_closed_form_fit(linear_world):
    dm, latents = linear_world
    alphas = [0.01, 1.0, 100.0]
    preds = linear_baseline_predictions(dm, "z", alphas=alphas)
    assert sorted(preds) == ["s0", "s1"]
    for s, p in preds.items():
        x, y = dm.subject_arrays(s, "z", "train")
        x, y = x.flatten(1).double().numpy(), y.double().numpy()
        xm, ym = x.mean(0), y.mean(0)
        # independent reference: primal ridge with the chosen penalty, intercept unpenalised
        w = np.linalg.solve((x - xm).T @ (x - xm) + p["alpha"] * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
        test = dm.store.subjects[s]
        order = np.argsort(p["image_index"])
        averaged = np.stack([test.responses[np.flatnonzero((test.trials.image_index == i) & (test.trials.split == "test"))]
                             .mean(0).ravel() for i in p["image_index"][order]])
        np.testing.assert_allclose(p["pred"][order], (averaged - xm) @ w + ym, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(p["target"], latents[p["image_index"]])
        assert p["n_train"] == 60 and p["alpha"] in alphas
        # a linear world is decoded almost perfectly by the linear baseline
        assert retrieval_accuracy(p["pred"], p["target"], subset_size=12, n_subsets=1).mean("brain_to_image") > 0.8


def test_report_puts_baseline_and_top5_next_to_the_decoder(linear_world):
    dm, latents = linear_world
    baseline = linear_baseline_predictions(dm, "z", alphas=[1.0])
    rng = np.random.default_rng(1)
    decoder = {s: {**p, "pred": p["target"] + rng.standard_normal(p["target"].shape)} for s, p in baseline.items()}
    oracle = {"subjects": {s: {"brain_to_image_top1": 0.9, "brain_to_image_top5": 1.0} for s in baseline}}
    report = retrieval_report(decoder, oracle=oracle, subset_size=12, n_subsets=1, ks=(1, 5), table_topk=(1, 5),
                              baseline=baseline)
    row = report["rows"][0]
    ref = retrieval_accuracy(baseline["s0"]["pred"], baseline["s0"]["target"], subset_size=12, n_subsets=1, ks=(1, 5))
    assert row["linear_brain_to_image_top5"] == pytest.approx(ref.mean("brain_to_image", 5))
    assert row["linear_brain_to_image_top1"] == pytest.approx(ref.mean("brain_to_image", 1))
    assert row["oracle_brain_to_image_top5"] == 1.0 and np.isnan(row["oracle_image_to_brain_top5"])
    assert row["chance_top5"] == pytest.approx(5 / 12)
    mean = report["rows"][-1]
    assert mean["linear_brain_to_image_top5"] == pytest.approx(np.mean([r["linear_brain_to_image_top5"]
                                                                        for r in report["rows"][:-1]]))
    table = format_table(report)
    assert "brain→image top-5" in table and "linear b→i top-5" in table and "oracle b→i top-5" in table
    # without table_topk / baseline the rows keep the top-1 columns only (stable CSV for fMRI runs)
    plain = retrieval_report(decoder, subset_size=12, n_subsets=1, ks=(1, 5, 10))["rows"][0]
    assert not any(k.startswith("linear_") or "top5" in k for k in plain)
