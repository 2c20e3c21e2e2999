"""One source per default: the config dataclasses take every default from their packaged YAML file
(braindecode_fw/schema.py), and check types and ranges naming the full config key."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from braindecode_fw import schema
from braindecode_fw.data.convert.mindeye import MindEye1AvgConvertConfig, MindEye2ConvertConfig
from braindecode_fw.data.convert.nsd import NSDConvertConfig
from braindecode_fw.data.convert.things_meg import ThingsMEGConvertConfig
from braindecode_fw.data.synthetic import fmri, meg
from braindecode_fw.data.synthetic.meg_world import SyntheticMEGWorldConfig
from braindecode_fw.data.synthetic.world import SyntheticWorldConfig
from braindecode_fw.demo.tiny_clip import TINY_CLIP_OVERRIDES, TinyClipConfig
from braindecode_fw.demo.tiny_generator import TinyGeneratorConfig
from tests.conftest import compose_config

YAML_BACKED = [SyntheticWorldConfig, SyntheticMEGWorldConfig, NSDConvertConfig, ThingsMEGConvertConfig,
               TinyClipConfig, TinyGeneratorConfig, fmri.NoiseCeilingConfig, fmri.DriftConfig,
               meg.LeadFieldConfig, meg.MEGNoiseConfig, MindEye2ConvertConfig, MindEye1AvgConvertConfig]


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _plain(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _composed(overrides: list[str], section: str) -> dict:
    cfg = compose_config("prepare", overrides)
    return OmegaConf.to_container(OmegaConf.select(cfg, section), resolve=True)


@pytest.mark.parametrize("cls", YAML_BACKED, ids=lambda c: c.__name__)
def test_no_default_is_hard_coded(cls):
    for f in dataclasses.fields(cls):
        assert f.default is schema.FROM_YAML, f"{cls.__name__}.{f.name}: default {f.default!r} not from the YAML"
        assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}: default_factory"


def test_kernel_config_has_no_defaults_of_its_own():
    # two populations, two settings: both live in synthetic_meg.yaml (world.early_kernel / world.higher_kernel)
    for f in dataclasses.fields(meg.KernelConfig):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@pytest.mark.parametrize(("cls", "dataset"), [(SyntheticWorldConfig, "synthetic"),
                                              (SyntheticMEGWorldConfig, "synthetic_meg")])
def test_world_defaults_equal_the_composed_config(cls, dataset):
    composed = _composed([f"dataset={dataset}"], "dataset.world")
    assert _plain(cls()) == composed
    assert _plain(cls.from_mapping({})) == composed
    assert cls().fingerprint() == cls.from_mapping(composed).fingerprint()


@pytest.mark.parametrize(("cls", "dataset"), [(NSDConvertConfig, "nsd"), (ThingsMEGConvertConfig, "things_meg")])
def test_converter_defaults_equal_the_composed_config(cls, dataset):
    composed = _composed([f"dataset={dataset}"], "dataset")
    assert set(composed) == {f.name for f in dataclasses.fields(cls)}
    default = _plain(cls())
    assert default.pop("store") is None  # ${paths.data_dir}/... needs Hydra: None in Python
    composed.pop("store")
    assert default == composed
    assert cls.from_mapping({}).fingerprint() == cls.from_mapping(_composed([f"dataset={dataset}"], "dataset")).fingerprint()


def test_demo_model_defaults_equal_the_composed_config():
    demo = _composed(["demo_models=retrain"], "demo_models")
    world = _composed([], "dataset.world")
    scene = {"image_size": world["image_size"], "max_objects": world["max_objects"]}
    clip = {**demo["clip"], **scene}
    assert clip.pop("overrides") is None
    default = _plain(TinyClipConfig())
    assert default.pop("overrides") == TINY_CLIP_OVERRIDES
    assert default == clip
    assert _plain(TinyGeneratorConfig()) == {**demo["generator"], **scene}
    assert set(demo["clip"]) == {f.name for f in dataclasses.fields(TinyClipConfig)} - set(scene)
    assert set(demo["generator"]) == {f.name for f in dataclasses.fields(TinyGeneratorConfig)} - set(scene)


def test_mindeye_converters_read_their_defaults_from_the_yaml():
    for yaml, keys in (("dataset/mindeye2.yaml", ("subjects", "test_convention", "validate", "image_size",
                                                  "chunk_rows", "val_fraction", "val_seed", "force", "name")),
                       ("dataset/mindeye1_avg.yaml", ("subjects", "layout", "validate", "image_size",
                                                      "zscore_at_load", "force", "name"))):
        assert set(keys) <= set(schema.yaml_section(yaml)), yaml


def test_partial_mappings_keep_the_other_defaults():
    cfg = SyntheticMEGWorldConfig.from_mapping({"seed": 3, "higher_kernel": {"shape": 5.0}, "noise": {"alpha": 2.0}})
    assert cfg.seed == 3 and cfg.higher_kernel.shape == 5.0 and cfg.higher_kernel.latency == [0.2, 0.4]
    assert cfg.early_kernel.shape == 8.0 and cfg.noise.alpha == 2.0 and cfg.noise.n_brain_sources == 300
    assert SyntheticWorldConfig(seed=1).ncsnr == fmri.NoiseCeilingConfig()


@pytest.mark.parametrize(("build", "message"), [
    (lambda: SyntheticWorldConfig.from_mapping({"seed": "abc"}), "dataset.world.seed: expected an integer, got 'abc'"),
    (lambda: SyntheticWorldConfig.from_mapping({"seed": True}), "dataset.world.seed: expected an integer, got True"),
    (lambda: SyntheticWorldConfig.from_mapping({"image_size": 0}),
     "dataset.world.image_size: expected an integer >= 1, got 0"),
    (lambda: SyntheticWorldConfig.from_mapping({"voxels_per_subject": [10, -1]}),
     "dataset.world.voxels_per_subject: expected every item >= 1, got [10, -1]"),
    (lambda: SyntheticWorldConfig.from_mapping({"rf_size": "wide"}), "dataset.world.rf_size: expected a list"),
    (lambda: SyntheticWorldConfig.from_mapping({"ncsnr": {"median": "x"}}),
     "dataset.world.ncsnr.median: expected a number, got 'x'"),
    (lambda: SyntheticWorldConfig.from_mapping({"val_fraction": 1.0}),
     "dataset.world.val_fraction: expected a number >= 0 and < 1, got 1.0"),
    (lambda: SyntheticMEGWorldConfig.from_mapping({"clamp": 0}), "dataset.world.clamp: expected a number > 0, got 0"),
    (lambda: SyntheticMEGWorldConfig.from_mapping({"early_kernel": {"latency": "x"}}),
     "dataset.world.early_kernel.latency: expected a list"),
    (lambda: NSDConvertConfig.from_mapping({"chunk_trials": "abc"}),
     "dataset.chunk_trials: expected an integer, got 'abc'"),
    (lambda: NSDConvertConfig.from_mapping({"chunk_trials": -5}),
     "dataset.chunk_trials: expected an integer >= 1, got -5"),
    (lambda: NSDConvertConfig.from_mapping({"force": "yes"}), "dataset.force: expected a boolean"),
    (lambda: ThingsMEGConvertConfig.from_mapping({"image_chunk": 0}),
     "dataset.image_chunk: expected an integer >= 1, got 0"),
    (lambda: TinyClipConfig.from_mapping({"batch_size": "big"}),
     "demo_models.clip.batch_size: expected an integer, got 'big'"),
    (lambda: TinyGeneratorConfig.from_mapping({"unet_channels": [64, 0]}),
     "demo_models.generator.unet_channels: expected every item >= 1, got (64, 0)"),
])
def test_wrong_types_and_ranges_name_the_key(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_ints_stay_ints_where_floats_are_allowed():
    # no conversion: the fingerprints of existing stores (YAML `sfreq: 120`) stay what they were
    assert NSDConvertConfig.from_mapping({"val_fraction": 0}).val_fraction == 0
    assert isinstance(SyntheticWorldConfig.from_mapping({"tuning_smoothness": 3}).tuning_smoothness, int)
