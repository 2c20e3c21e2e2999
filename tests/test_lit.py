"""DecoderModule: learning on the tiny world, bitwise resume, NaN guard."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from braindecode_fw.data.datamodule import BrainDataModule
from braindecode_fw.lit import DecoderModule, NonFiniteLossError
from braindecode_fw.losses import InfoNCELoss
from braindecode_fw.models.adapters import SubjectLinearAdapter
from braindecode_fw.models.decoder import build_decoder
from braindecode_fw.models.encoders import ResidualMLP
from braindecode_fw.models.heads import ProjectionHead
from braindecode_fw.targets.encoders import OpenClipImageEncoder, Preprocess
from tests.targets.test_encoders import TINY


@pytest.fixture(scope="module")
def encoder():
    return OpenClipImageEncoder("ViT-B-32", None, feature_name="clip_image_tokens", output="tokens",
                                model_overrides=TINY, preprocess=Preprocess(image_size=32))


def _module(dm, seed=0):
    torch.manual_seed(seed)
    dec = build_decoder(dm.n_features, dm.target_shapes, adapter=SubjectLinearAdapter,
                        encoder=functools.partial(ResidualMLP, n_blocks=1, dropout=0.2),
                        head=ProjectionHead, hidden=16)
    return DecoderModule(dec, InfoNCELoss(0.1), "clip_image_tokens",
                         optimizer=functools.partial(torch.optim.AdamW, lr=3e-3), val_subset_size=20)


def _fit(dm, tmp_path, max_epochs, ckpt_path=None, module=None):
    module = module or _module(dm)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                        num_sanity_val_steps=0, deterministic=True,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def test_learns_and_resumes_bitwise(tiny_store, tmp_path, encoder):
    dm = BrainDataModule(tiny_store, encoder, batch_size=16, eval_batch_size=64, cache_dir=tmp_path / "cache")
    dm.setup()
    L.seed_everything(0)
    full, trainer = _fit(dm, tmp_path / "full", 4)
    # fits: InfoNCE over 16 items starts at ~log(16) = 2.77
    assert trainer.callback_metrics["train/loss"] < 2.4
    assert {"val/brain_to_image_top1/subj01", "val/image_to_brain_top1"} <= set(trainer.callback_metrics)
    L.seed_everything(0)
    _fit(dm, tmp_path / "half", 2)
    L.seed_everything(123)  # a different global seed must not matter after resume
    resumed, _ = _fit(dm, tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "half" / "last.ckpt"),
                      module=_module(dm, seed=5))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_nan_loss_fails_loudly(tiny_store, tmp_path, encoder):
    dm = BrainDataModule(tiny_store, encoder, batch_size=16, cache_dir=tmp_path / "cache")
    dm.setup()
    module = _module(dm)
    batch = next(iter(dm.train_dataloader()))
    batch.responses[batch.subject.index("subj02")] = float("nan")  # one bad trial of one subject
    images = ", ".join(str(i) for i in batch.image_index.tolist()[:8])
    with pytest.raises(NonFiniteLossError) as err:
        module.training_step(batch, 3)
    message = str(err.value)
    assert message.startswith("train loss is nan at epoch 0, step 0 (batch 3: subjects subj01×8, subj02×8; "
                              f"images {images}, ...; non-finite inputs from ['subj02'])")
    assert "debug=anomaly" in message


def test_bf16_and_workers(tiny_store, tmp_path, encoder):
    dm = BrainDataModule(tiny_store, encoder, batch_size=16, num_workers=1, cache_dir=tmp_path / "cache")
    dm.setup()
    serial = BrainDataModule(tiny_store, encoder, batch_size=16, num_workers=0, cache_dir=tmp_path / "cache")
    serial.setup()
    a, b = next(iter(dm.train_dataloader())), next(iter(serial.train_dataloader()))
    assert a.subject == b.subject
    torch.testing.assert_close(a.responses, b.responses)  # a worker process reads the same batch
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    module = _module(dm)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=dm)
    assert any(not torch.equal(p0, p) for p0, p in zip(before, module.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: fp32 master weights


def test_predict_derived_outputs_and_item_selection():
    """``derived`` outputs are computed per batch from the decoder outputs and stored instead of them
    (Brain-IT's low-level image from its 7,190 × 512 predicted tokens); ``items`` runs only those."""
    import numpy as np

    from braindecode_fw.data.datamodule import Batch
    from braindecode_fw.lit import predict

    torch.manual_seed(0)
    dec = build_decoder({"a": 5, "b": 7}, {"emb": (3,), "big": (6, 4)}, adapter=SubjectLinearAdapter,
                        encoder=functools.partial(ResidualMLP, n_blocks=1, dropout=0.2), head=ProjectionHead,
                        hidden=8).eval()
    subjects = ["a", "b", "a", "b", "b", "a", "a"]
    responses = torch.randn(7, 7)
    responses[[0, 2, 5, 6], 5:] = 0  # subject a has 5 voxels: zero-padded
    image_index = torch.tensor([4, 1, 9, 3, 8, 2, 6])
    emb = torch.randn(7, 3)
    batches = [Batch(subjects[lo:hi], responses[lo:hi], image_index[lo:hi], {"emb": emb[lo:hi]})
               for lo, hi in ((0, 4), (4, 7))]
    calls = []

    def small(out, batch):  # (B, 6, 4) -> (B, 4), per item, reading the batch too
        calls.append(len(batch))
        return out["big"].mean(1) + batch.image_index[:, None].float()

    preds = predict(dec, batches, "emb", derived={"small": small})
    with torch.no_grad():
        full = dec(responses, subjects)
    want = small(full, Batch(subjects, responses, image_index, {"emb": emb}))
    for s in ("a", "b"):
        rows = [i for i, x in enumerate(subjects) if x == s]
        p = preds[s]
        assert list(p["outputs"]) == ["small"] and p["outputs"]["small"].shape == (len(rows), 4)  # no "big"
        np.testing.assert_allclose(p["outputs"]["small"], want[rows].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(p["image_index"], image_index[rows].numpy())
    # items: only those rows reach the decoder (and the derived function), the rest are skipped
    calls.clear()
    some = predict(dec, batches, "emb", outputs=["big"], derived={"small": small}, items=[("b", 8), ("a", 9)])
    assert calls == [1, 1] and sorted(some) == ["a", "b"]
    np.testing.assert_array_equal(some["a"]["image_index"], [9])
    np.testing.assert_allclose(some["b"]["outputs"]["small"], want[[4]].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(some["a"]["outputs"]["big"], full["big"][[2]].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(some["a"]["target"], emb[[2]].numpy())
    with pytest.raises(ValueError, match=r"derived output 'bad' has 1 rows for a batch of 4"):
        predict(dec, batches, "emb", derived={"bad": lambda out, batch: out["emb"][:1]})


def test_weight_decay_groups_follow_each_released_rule():
    from braindecode_fw.lit import weight_decay_groups
    from braindecode_fw.models.prior import GainLayerNorm

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter = torch.nn.Linear(3, 4)  # a subject adapter (MindEye2's ridge), bias included
            self.trunk = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4), GainLayerNorm(4))
            self.pos = torch.nn.Parameter(torch.zeros(2, 4))

    m = Tiny()
    names = {id(p): n for n, p in m.named_parameters()}

    def decayed(rule):
        groups = weight_decay_groups(m, rule)
        assert groups[1]["weight_decay"] == 0.0
        assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(m.parameters()))
        return sorted(names[id(p)] for p in groups[0]["params"])

    assert decayed("adapters_and_matrices") == ["adapter.bias", "adapter.weight", "pos", "trunk.1.weight"]
    # MindEye2: the ridge entirely, elsewhere every non-bias (LayerNorm weights and dalle2 gains too)
    assert decayed("mindeye2") == ["adapter.bias", "adapter.weight", "pos", "trunk.0.weight", "trunk.1.weight",
                                   "trunk.2.gain"]
    # MindBridge: no bias anywhere, adapters' included
    assert decayed("mindbridge") == ["adapter.weight", "pos", "trunk.0.weight", "trunk.1.weight", "trunk.2.gain"]
    # Brain-IT: one group, every parameter
    assert decayed("all") == sorted(n for n, _ in m.named_parameters())
    with pytest.raises(ValueError, match="optim.weight_decay_groups: one of"):
        weight_decay_groups(m, "biases")


@pytest.mark.parametrize("scale", [False, True])
def test_scale_lr_by_devices_multiplies_lr_and_onecycle_max_lr(scale):
    # MindBridge's main.py scales max_lr by the number of processes; optim.scale_lr_by_devices does it
    class FakeTrainer:
        world_size = 4
        estimated_stepping_batches = 10

    dec = torch.nn.Linear(2, 2)
    module = DecoderModule(dec, InfoNCELoss(0.1), "t", optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                           scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3,
                                                       div_factor=25),
                           scale_lr_by_devices=scale)
    module._trainer = FakeTrainer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecoderModule, "trainer", property(lambda self: self._trainer))
        out = module.configure_optimizers()
    factor = 4 if scale else 1
    group = out["optimizer"].param_groups[0]
    assert group["max_lr"] == pytest.approx(1e-3 * factor)
    assert group["lr"] == pytest.approx(1e-3 * factor / 25)
