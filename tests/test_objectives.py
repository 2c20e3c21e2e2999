"""Training objectives: the MindEye2 schedule (BiMixCo phase, then SoftCLIP with a cosine
temperature), regression-target mixing and its original-behaviour flag, auxiliary terms, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from braindecode_fw.data.datamodule import Batch
from braindecode_fw.losses import InfoNCELoss, bimixco_loss, mixco_soft_labels, soft_clip_loss
from braindecode_fw.objectives import PairObjective, TermsObjective


class Recorder(nn.Module):
    """A decoder stand-in: outputs are fixed functions of the (possibly mixed) responses, and it
    keeps what it was given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, responses, subjects, repeat_mask=None, targets=None):
        self.seen = responses.clone()
        out = {"emb": responses @ self.w, "low": (responses @ self.w)[:, :2]}
        if targets is not None:
            out["loss/cycle"] = responses.square().mean()
        return out


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return Batch(subject=["a"] * (n // 2) + ["b"] * (n // 2), responses=torch.randn(n, 6, generator=g),
                 image_index=torch.arange(n),
                 targets={"emb": torch.randn(n, 4, generator=g), "low": torch.randn(n, 2, generator=g)})


ME2 = dict(terms={"clip": {"kind": "contrastive", "output": "emb", "target": "emb"},
                  "blur": {"kind": "l1", "output": "low", "target": "low", "weight": 0.5},
                  "cycle": {"kind": "aux", "weight": 2.0}},
           softclip={"start": 0.004, "end": 0.0075}, mixco={"until": 0.33, "temperature": 0.006})


def test_mixco_phase_uses_bimixco_on_mixed_inputs_and_mixes_regression_targets():
    obj, dec, batch = TermsObjective(**ME2, seed=3), Recorder(), _batch()
    loss, parts, _ = obj(dec, batch, progress=0.1)
    # replay the objective's draws to rebuild the mixing it applied
    replay = TermsObjective(**ME2, seed=3)
    from braindecode_fw.losses import mixco_inputs, mixco_permutation

    partner, label = mixco_permutation(batch.subject, generator=replay.generator)
    mixed, beta = mixco_inputs(batch.responses, partner, generator=replay.generator)
    assert torch.equal(dec.seen, mixed) and not torch.equal(mixed, batch.responses)
    assert all(batch.subject[i] == batch.subject[j] for i, j in enumerate(partner.tolist()))
    out = dec(mixed, batch.subject, targets={})
    soft = mixco_soft_labels(beta, label)
    clip = bimixco_loss(out["emb"], batch.targets["emb"], soft, 0.006)
    low_t = batch.targets["low"]
    mixed_low = beta[:, None] * low_t + (1 - beta[:, None]) * low_t[partner]
    blur = torch.nn.functional.l1_loss(out["low"], mixed_low)
    torch.testing.assert_close(parts["clip"], clip.detach())
    torch.testing.assert_close(parts["blur"], blur.detach())
    torch.testing.assert_close(loss, clip + 0.5 * blur + 2.0 * out["loss/cycle"])
    assert float(parts["temperature"]) == pytest.approx(0.006)


def test_original_behaviour_leaves_regression_targets_unmixed():
    cfg = {**ME2, "mixco": {"until": 0.33, "mix_regression_targets": False}}
    obj, dec, batch = TermsObjective(**cfg, seed=3), Recorder(), _batch()
    _, parts, _ = obj(dec, batch, progress=0.0)
    out = dec(dec.seen, batch.subject, targets={})
    torch.testing.assert_close(parts["blur"], torch.nn.functional.l1_loss(out["low"], batch.targets["low"]).detach())


def test_softclip_phase_with_cosine_temperature():
    obj, dec, batch = TermsObjective(**ME2), Recorder(), _batch()
    progress = 0.33 + 0.5 * 0.67  # half-way through the SoftCLIP phase
    _, parts, _ = obj(dec, batch, progress=progress)
    assert torch.equal(dec.seen, batch.responses)  # no mixing after the BiMixCo phase
    tau = 0.0075 + (0.004 - 0.0075) / 2 * (1 + torch.cos(torch.tensor(torch.pi * 0.5))).item()
    assert float(parts["temperature"]) == pytest.approx(tau)
    out = dec(batch.responses, batch.subject, targets={})
    torch.testing.assert_close(parts["clip"], soft_clip_loss(out["emb"], batch.targets["emb"], tau).detach())
    obj.eval()  # evaluation never mixes, whatever the progress
    obj(dec, batch, progress=0.0)
    assert torch.equal(dec.seen, batch.responses)


def test_pair_objective_and_errors():
    dec, batch = Recorder(), _batch()
    loss, _, out = PairObjective(InfoNCELoss(0.1), "emb")(dec, batch, 0.5)
    assert set(out) == {"emb", "low"}
    torch.testing.assert_close(loss, InfoNCELoss(0.1)(dec(batch.responses, batch.subject)["emb"], batch.targets["emb"]))
    with pytest.raises(ValueError, match=r"loss.terms.x.kind: one of .*, got 'hinge'"):
        TermsObjective({"x": {"kind": "hinge", "output": "emb", "target": "emb"}})
    with pytest.raises(ValueError, match="loss.terms.x: a contrastive term needs `output` and `target`"):
        TermsObjective({"x": {"kind": "contrastive"}})
    with pytest.raises(ValueError, match="loss.terms: no terms configured"):
        TermsObjective({"x": None})
    obj = TermsObjective({"prior": {"kind": "aux"}})
    with pytest.raises(KeyError, match=r"loss.terms.prior: the decoder has no auxiliary output 'loss/prior'; "
                                        r"it provides \['loss/cycle'\]"):
        obj(dec, batch, 0.5)


def test_validation_on_repeated_responses_skips_auxiliary_terms():
    """Without a val split, validation runs on test repetitions (B, R, F) averaged in output space:
    the decoder then reports no auxiliary losses and evaluation leaves those terms out."""
    import functools

    from braindecode_fw.models.adapters import PooledSubjectEmbedder, SubjectBuilder
    from braindecode_fw.models.decoder import build_bridge_decoder
    from braindecode_fw.models.encoders import PostNormResidualMLP
    from braindecode_fw.models.heads import ProjectionHead

    dec = build_bridge_decoder({"a": 6, "b": 6}, {"emb": (4,)}, hidden=8, head=ProjectionHead,
                               adapter=functools.partial(PooledSubjectEmbedder, pool_size=4, bottleneck=2),
                               encoder=PostNormResidualMLP, builder=functools.partial(SubjectBuilder, bottleneck=2))
    obj = TermsObjective({"clip": {"kind": "contrastive", "output": "emb", "target": "emb"},
                          "cycle": {"kind": "aux"}})
    batch = Batch(subject=["a", "b", "a"], responses=torch.randn(3, 3, 6), image_index=torch.arange(3),
                  targets={"emb": torch.randn(3, 4)}, repeat_mask=torch.ones(3, 3, dtype=torch.bool))
    obj.eval()
    loss, parts, out = obj(dec.eval(), batch, 1.0)
    assert "cycle" not in parts and out["emb"].shape == (3, 4)
    torch.testing.assert_close(loss, soft_clip_loss(out["emb"], batch.targets["emb"], 0.005))
    obj.train()
    with pytest.raises(KeyError, match="no auxiliary output 'loss/cycle'"):
        obj(dec, batch, 1.0)  # in training a missing auxiliary loss is a configuration error


class TokenRecorder(nn.Module):
    """Token outputs ``(B, 3, 4)`` for STTM-style terms."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, responses, subjects, repeat_mask=None, targets=None):
        self.seen = responses.clone()
        out = {"tok": (responses @ self.w).view(len(responses), 3, 4)}
        if targets is not None:
            out["loss/prior"] = responses.abs().mean()
        return out


STTM = dict(terms={"tokens": {"kind": "contrastive", "output": "tok", "target": "tok"},
                   "global_image": {"kind": "contrastive", "output": "tok", "output_index": 0, "target": "tok",
                                    "target_index": 0, "weight": 0.2, "mixco_weight": 0.5},
                   "global_text": {"kind": "contrastive", "output": "tok", "output_index": 0, "target": "txt",
                                   "weight": 0.2, "mixco_weight": 0.5},
                   "prior": {"kind": "aux", "weight": 30.0}},
            softclip={"start": 0.004, "end": 0.006}, mixco={"until": 0.35, "temperature": 0.006},
            random_weighting=[["tokens", "global_image", "global_text"], ["prior"]], input_noise=0.01)


def _token_batch(n=8):
    g = torch.Generator().manual_seed(2)
    return Batch(subject=["a"] * (n // 2) + ["b"] * (n // 2), responses=torch.randn(n, 6, generator=g),
                 image_index=torch.arange(n),
                 targets={"tok": torch.randn(n, 3, 4, generator=g), "txt": torch.randn(n, 4, generator=g)})


def test_sttm_terms_token_selection_phase_weights_random_weighting_and_noise():
    """STTM (docs/methods/sttm.md §4): global terms on token 0, weights 0.5 in the BiMixCo phase and 0.2
    after, L = w0·L_c + w1·30·L_prior with (w0, w1) = softmax(randn(2)) per step, σ-noise on inputs."""
    obj, dec, batch = TermsObjective(**STTM, seed=7), TokenRecorder(), _token_batch()
    loss, parts, _ = obj(dec, batch, progress=0.5)  # SoftCLIP phase
    replay = torch.Generator().manual_seed(7)  # the objective's draws, in order: noise, then weights
    noised = batch.responses + 0.01 * torch.randn(batch.responses.shape, generator=replay)
    w0, w1 = torch.softmax(torch.randn(2, generator=replay), 0).tolist()
    assert torch.equal(dec.seen, noised)
    out = dec(noised, batch.subject)
    tau = obj.softclip_temperature(0.5)
    tok, txt = out["tok"], batch.targets["txt"]
    contrast = (soft_clip_loss(tok, batch.targets["tok"], tau) + 0.2 * soft_clip_loss(tok[:, 0], batch.targets["tok"][:, 0], tau)
                + 0.2 * soft_clip_loss(tok[:, 0], txt, tau))
    expected = w0 * contrast + w1 * 30.0 * noised.abs().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(parts["group_weight/tokens"]) == pytest.approx(w0)
    assert float(parts["group_weight/prior"]) == pytest.approx(w1)
    # BiMixCo phase: the global terms weigh 0.5
    term = obj.terms["global_text"]
    assert term.weight_at(True) == 0.5 and term.weight_at(False) == 0.2
    obj.eval()  # evaluation: no noise, no random weights
    loss_eval, parts_eval, _ = obj(dec, batch, progress=0.5)
    assert torch.equal(dec.seen, batch.responses) and "group_weight/tokens" not in parts_eval


def test_random_weighting_names_are_checked():
    with pytest.raises(ValueError, match=r"loss.random_weighting: every name once and among the terms"):
        TermsObjective(**{**STTM, "random_weighting": [["tokens"], ["tokens", "nope"]]})
    # terms set to null leave their groups (and empty groups go)
    obj = TermsObjective(**{**STTM, "terms": {**STTM["terms"], "global_text": None, "prior": None}})
    assert obj.groups == [["tokens", "global_image"]]


def test_missing_outputs_and_targets_name_the_term():
    obj = TermsObjective(terms={"blur_cont": {"kind": "token_contrast", "output": "aux", "target": "emb"}})
    with pytest.raises(KeyError, match=r"loss.terms.blur_cont: the decoder has no output 'aux'; it provides "
                                       r"\['emb', 'low'\]"):
        obj(Recorder(), _batch(), progress=0.5)
    obj = TermsObjective(terms={"t": {"kind": "mse", "output": "emb", "target": "teacher"}})
    with pytest.raises(KeyError, match=r"loss.terms.t: no target 'teacher' in the batch; the run trains \['emb', 'low'\]"):
        obj(Recorder(), _batch(), progress=0.5)


def test_a_target_read_by_two_regression_terms_is_mixed_once():
    terms = {"clip": {"kind": "contrastive", "output": "emb", "target": "emb"},
             "l1": {"kind": "l1", "output": "low", "target": "low"},
             "mse": {"kind": "mse", "output": "low", "target": "low"}}
    obj, dec, batch = TermsObjective(terms=terms, mixco={"until": 1.0, "temperature": 0.006}, seed=4), Recorder(), _batch()
    _, parts, _ = obj(dec, batch, progress=0.0)
    from braindecode_fw.losses import mixco_inputs, mixco_permutation

    replay = TermsObjective(terms=terms, mixco={"until": 1.0, "temperature": 0.006}, seed=4)
    partner, _ = mixco_permutation(batch.subject, generator=replay.generator)
    mixed, beta = mixco_inputs(batch.responses, partner, generator=replay.generator)
    low = batch.targets["low"]
    once = beta[:, None] * low + (1 - beta[:, None]) * low[partner]
    out = dec(mixed, batch.subject)
    torch.testing.assert_close(parts["mse"], torch.nn.functional.mse_loss(out["low"], once))


def test_mix_regression_targets_by_name():
    # only the named target is mixed (MindEye2's [vae_latent]); a second regression target read by
    # another term stays unmixed; unknown names are refused at construction
    terms = {**ME2["terms"], "low2": {"kind": "mse", "output": "low", "target": "low_copy", "weight": 1.0}}
    cfg = {**ME2, "terms": terms, "mixco": {"until": 0.33, "mix_regression_targets": ["low"]}}
    obj, dec, batch = TermsObjective(**cfg, seed=3), Recorder(), _batch()
    batch.targets["low_copy"] = batch.targets["low"].clone()
    assert obj.mixed_targets() == ["low"]
    _, parts, _ = obj(dec, batch, progress=0.0)
    out = dec(dec.seen, batch.subject, targets={})
    torch.testing.assert_close(parts["low2"], torch.nn.functional.mse_loss(out["low"], batch.targets["low_copy"]).detach())
    assert not torch.allclose(parts["blur"], torch.nn.functional.l1_loss(out["low"], batch.targets["low"]).detach())
    assert TermsObjective(**{**cfg, "mixco": {"until": 0.33, "mix_regression_targets": True}}).mixed_targets() == ["low", "low_copy"]
    # a target no term reads (its term switched off) is skipped; a malformed value is refused
    assert TermsObjective(**{**cfg, "mixco": {"until": 0.33, "mix_regression_targets": ["gone", "low"]}}).mixed_targets() == ["low"]
    with pytest.raises(ValueError, match=r"loss.mixco.mix_regression_targets: true, false or a list"):
        TermsObjective(**{**cfg, "mixco": {"until": 0.33, "mix_regression_targets": [1]}})


def test_a_lab_registers_its_own_term_kind():
    """Term kinds are objects behind one interface: a new kind is a class and one registration, and
    it takes part in weighting and MixCo target mixing like the shipped ones."""
    from braindecode_fw.objectives import TERM_KINDS, PairTermKind, register_term_kind

    class Cosine(PairTermKind):
        name = "test_cosine"

        def loss(self, pred, y, name, term, ctx):
            return (1 - torch.nn.functional.cosine_similarity(pred, y, dim=-1)).mean()

    register_term_kind(Cosine())
    try:
        terms = {"cos": {"kind": "test_cosine", "output": "emb", "target": "emb", "weight": 3.0}}
        obj, dec, batch = TermsObjective(terms=terms), Recorder(), _batch()
        obj.eval()
        loss, parts, out = obj(dec, batch, progress=0.5)
        expected = (1 - torch.nn.functional.cosine_similarity(out["emb"], batch.targets["emb"], dim=-1)).mean()
        torch.testing.assert_close(parts["cos"], expected)
        torch.testing.assert_close(loss, 3.0 * expected)
        assert TermsObjective(terms=terms, mixco={"until": 0.3}).mixed_targets() == ["emb"]
        with pytest.raises(ValueError, match="'test_cosine' is already registered"):
            register_term_kind(Cosine())
        with pytest.raises(ValueError, match=r"loss.terms.x.kind: one of \(.*'test_cosine'.*got 'cosin'"):
            TermsObjective(terms={"x": {"kind": "cosin", "output": "emb", "target": "emb"}})
    finally:
        TERM_KINDS.pop("test_cosine", None)
