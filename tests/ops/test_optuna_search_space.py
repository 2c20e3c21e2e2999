"""bdf_optuna sweeper: Hydra override grammar -> Optuna distributions, and the job overrides back."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.bdf_optuna_sweeper._impl import (
    SweepConfigError,
    TrialTask,
    build_search_space,
    direction_name,
    make_sampler,
)


def _dist(value: str):
    return build_search_space({"a.b": value}, []).distributions["a.b"]


@pytest.mark.parametrize("value, expected", [
    ("interval(0.1, 0.9)", FloatDistribution(0.1, 0.9)),
    ("interval(1, 2.5)", FloatDistribution(1.0, 2.5)),
    ("int(interval(2, 64))", IntDistribution(2, 64)),
    ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
    ("tag(log, int(interval(8, 1024)))", IntDistribution(8, 1024, log=True)),
    ("range(1, 5)", IntDistribution(1, 4)),  # Hydra's range excludes stop; Optuna's high is inclusive
    ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
    ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("choice(256, 512, 1024)", CategoricalDistribution([256, 512, 1024])),
    ("choice(adamw, sgd)", CategoricalDistribution(["adamw", "sgd"])),
    ("1,2,3", CategoricalDistribution([1, 2, 3])),
    ("choice(true, false)", CategoricalDistribution([True, False])),
])
def test_grammar_to_distribution(value, expected):
    dist = _dist(value)
    assert type(dist) is type(expected)
    assert dist == expected or (isinstance(dist, FloatDistribution) and dist.low == pytest.approx(expected.low)
                                and dist.high == pytest.approx(expected.high) and dist.step == pytest.approx(expected.step))
    if isinstance(expected, FloatDistribution | IntDistribution):
        assert dist.log == expected.log


@pytest.mark.parametrize("value, needle", [
    ("interval(2, 1)", "a.b=interval(2, 1)"),
    ("tag(log, interval(0, 1))", "a.b="),
    ("tag(log, range(0, 10, 2))", "step 1"),
    ("range(5, 5)", "empty"),
])
def test_bad_search_space_names_the_key(value, needle):
    with pytest.raises(SweepConfigError, match="search space") as e:
        _dist(value)
    assert needle in str(e.value)


def test_fixed_values_pass_through_and_the_command_line_wins():
    params = {"optim.optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "model.hidden": "choice(32, 64)",
              "trainer.max_epochs": 3, "data.subjects": ["subj01", "subj02"]}
    space = build_search_space(params, ["optim.optimizer.lr=interval(0.001, 0.002)", "model.hidden=48",
                                        "loss.temperature=range(1, 3)", "+extra=x y"])
    assert set(space.distributions) == {"optim.optimizer.lr", "loss.temperature"}
    assert space.distributions["optim.optimizer.lr"] == FloatDistribution(0.001, 0.002)  # CLI replaced config
    assert space.fixed == ["trainer.max_epochs=3", "data.subjects=[subj01,subj02]", "model.hidden=48", "+extra=x y"]
    overrides = space.overrides({"optim.optimizer.lr": 0.0015, "loss.temperature": 2})
    assert overrides[-2:] == ["optim.optimizer.lr=0.0015", "loss.temperature=2"]


def test_non_scalar_and_quoted_choices_round_trip():
    space = build_search_space({"data.subjects": "choice([subj01],[subj01,subj02])", "name": "choice('a b', c)"}, [])
    dist = space.distributions["data.subjects"]
    assert dist.choices == ("[subj01]", "[subj01,subj02]")  # Optuna stores non-scalars as override strings
    assert space.distributions["name"].choices == ("a b", "c")
    assert space.overrides({"data.subjects": "[subj01,subj02]", "name": "a b"}) == [
        "data.subjects=[subj01,subj02]", "name=a\\ b"]


def test_direction_and_sampler_validation():
    assert direction_name("maximize") == "maximize"
    with pytest.raises(SweepConfigError, match="minimize or maximize"):
        direction_name("max")
    sampler = make_sampler({"_target_": "optuna.samplers.RandomSampler", "seed": 3})
    assert type(sampler).__name__ == "RandomSampler"
    with pytest.raises(SweepConfigError, match="_target_"):
        make_sampler("tpe")


def test_trial_task_turns_exit_codes_into_failures():
    def exits(code):
        def task(cfg):
            raise SystemExit(code)
        return task

    with pytest.raises(RuntimeError, match="exited with status 2"):
        TrialTask(exits(2))(None)
    with pytest.raises(SystemExit):
        TrialTask(exits(0))(None)  # a clean exit is not a failure
    assert TrialTask(lambda cfg: 0.5)(None) == 0.5
