"""The demo corpus and the tiny CLIP: caption variants, a few training steps, the float16
safetensors round trip through open_clip's own loader, and the shipped model's card numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from braindecode_fw.data.synthetic import scenes as sc
from braindecode_fw.demo import retrain, tiny_clip
from braindecode_fw.demo.corpus import HELDOUT_STREAM, TRAIN_STREAM, build_corpus, caption_variant

SHIPPED_CLIP = retrain.package_weights_dir() / retrain.CLIP_FOLDER


def _tiny_clip_config(**kw) -> tiny_clip.TinyClipConfig:
    settings = dict(image_size=32, n_train_scenes=256, n_heldout_scenes=100, steps=30, batch_size=32, warmup_steps=5,
                    lr=2e-3, log_every=10, category_groups=1)
    cfg = tiny_clip.TinyClipConfig(**{**settings, **kw})
    cfg.overrides = {"embed_dim": 32,  # the shipped architecture (a modified ResNet), narrower
                     "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
                     "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    return cfg


def test_corpus_is_seeded_and_streams_differ():
    a = build_corpus(20, seed=0, stream=TRAIN_STREAM, image_size=32)
    b = build_corpus(20, seed=0, stream=TRAIN_STREAM, image_size=32)
    c = build_corpus(20, seed=0, stream=HELDOUT_STREAM, image_size=32)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.captions != c.captions
    assert a.images.shape == (20, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.captions[0] == sc.caption_scene(a.scenes[0])


def test_object_boxes_cover_every_object_pixel_and_little_else():
    """With the training's margin of one cell, every pixel an object changes (the scene rendered
    with and without its objects) lies in a cell the boxes mark; a small object's box is its
    bounding square, not the image."""
    import dataclasses

    corpus = build_corpus(40, seed=2, stream=TRAIN_STREAM, image_size=64)
    boxes = corpus.object_boxes(16, margin=1 / 16)
    for scene, image, box in zip(corpus.scenes, corpus.images, boxes, strict=True):
        background = sc.render_scene(dataclasses.replace(scene, objects=()), 64)
        changed = np.abs(image.astype(int) - background.astype(int)).max(-1) > 0
        cells = changed.reshape(16, 4, 16, 4).any(axis=(1, 3))
        assert not (cells & (box == 0)).any()
    one = sc.Scene(objects=(sc.SceneObject(category=0, colour=0, size=0, x=0.5, y=0.25),), background=0, tint=0,
                   texture_seed=0)
    single = dataclasses.replace(corpus, scenes=[one]).object_boxes(16, margin=1 / 16)[0]
    reach = sc.SIZES["small"] + 1 / 16  # cell centres within 0.1925 of (0.5, 0.25)
    centres = (np.arange(16) + 0.5) / 16
    expected = np.outer(np.abs(centres - 0.25) <= reach, np.abs(centres - 0.5) <= reach)
    np.testing.assert_array_equal(single, expected.astype(np.float32))
    assert single.sum() == 6 * 6


def test_caption_variants_name_every_object_category():
    corpus = build_corpus(200, seed=1, stream=TRAIN_STREAM, image_size=16)
    rng = np.random.default_rng(0)
    short = 0
    for scene, full in zip(corpus.scenes, corpus.captions, strict=True):
        text = caption_variant(scene, rng)
        for o in scene.objects:
            assert sc.CATEGORIES[o.category] in text
        short += text != full
    assert 60 < short < 140  # about half are partial descriptions
    assert caption_variant(corpus.scenes[0], rng, full_probability=1.0) == corpus.captions[0]


def test_unknown_training_key_and_oversized_groups_are_named():
    with pytest.raises(ValueError, match=r"demo_models.clip: unknown key\(s\) \['step'\]"):
        tiny_clip.TinyClipConfig.from_mapping({"step": 3})
    with pytest.raises(ValueError, match=r"demo_models.clip.category_groups: 4 groups of 10 scenes leave no room"):
        tiny_clip.train(_tiny_clip_config(category_groups=4), progress=False)


def test_category_groups_differ_only_in_shape():
    groups = tiny_clip.category_groups(2, np.random.default_rng(0), 32)
    assert len(groups) == 2 * len(sc.CATEGORIES)
    first = [s for s, _ in groups[: len(sc.CATEGORIES)]]
    assert [s.objects[0].category for s in first] == list(range(len(sc.CATEGORIES)))
    assert len({(s.objects[0].colour, s.objects[0].x, s.background, s.texture_seed) for s in first}) == 1
    np.testing.assert_array_equal(groups[3][1], sc.render_scene(groups[3][0], 32))


def test_tiny_clip_trains_saves_and_loads_through_open_clip(tmp_path):
    torch.set_num_threads(2)
    model, record = tiny_clip.train(_tiny_clip_config(), progress=False)
    losses = [p["loss"] for p in record["loss_curve"]]
    assert losses[-1] < losses[0] - 0.3  # it learns (ln 32 = 3.47 at chance)
    m = record["metrics"]
    assert m["n_heldout"] == 100 and m["chance_top1_of_100"] == pytest.approx(0.01)
    folder = tiny_clip.save(model, record, tmp_path / "clip")
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "config.json", tiny_clip.WEIGHTS_FILE,
                                                        "training.json"]
    assert not list(tmp_path.glob(".clip.partial-*"))
    loaded = tiny_clip.load(folder)  # open_clip.create_model(pretrained=<safetensors>)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)  # the trained model was already float16-rounded
    # token rows of ids no caption uses are zero; the caption words' rows are not
    tok = tiny_clip.tokenizer(loaded)
    used = tok(["a large red star at the top left on a stripes sky background"])[0]
    rows = loaded.token_embedding.weight
    assert rows[used[used > 0]].abs().sum(1).gt(0).all()
    assert (rows.abs().sum(1) > 0).sum() < 200
    heldout = build_corpus(100, seed=0, stream=HELDOUT_STREAM, image_size=32)
    assert tiny_clip.evaluate(loaded, heldout) == pytest.approx(m)
    assert "zero-shot category top-1" in (folder / "MODEL_CARD.md").read_text()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tiny_clip.load(tmp_path)


def test_shipped_tiny_clip_matches_its_card_and_the_target_config():
    from braindecode_fw.targets.encoders import OpenClipImageEncoder
    from tests.conftest import compose_config

    config = json.loads((SHIPPED_CLIP / "config.json").read_text())
    assert config["model_overrides"] == tiny_clip.TINY_CLIP_OVERRIDES
    record = json.loads((SHIPPED_CLIP / "training.json").read_text())
    card = record["metrics"]
    assert card["zero_shot_category_top1"] > 5 * card["zero_shot_category_chance"]
    assert card["caption_to_image_top1_of_100"] > 20 * card["chance_top1_of_100"]
    # the card's numbers are the shipped file's: re-measured on the same held-out scenes
    model = tiny_clip.load(SHIPPED_CLIP)
    heldout = build_corpus(card["n_heldout"], seed=record["config"]["seed"], stream=HELDOUT_STREAM, image_size=64)
    assert tiny_clip.evaluate(model, heldout) == pytest.approx(card, abs=1e-6)

    # braindecode_fw/conf/target/tiny_clip.yaml (the default target) is the same network: its targets are the model's encode_image
    cfg = compose_config("train", [])
    t = cfg.target
    assert t.pretrained == str(SHIPPED_CLIP / tiny_clip.WEIGHTS_FILE)
    enc = OpenClipImageEncoder(t.model_name, t.pretrained, output="pooled", model_overrides=t.model_overrides,
                               preprocess=t.preprocess)
    images = heldout.images[:8]
    with torch.no_grad():
        expected = model.encode_image(tiny_clip.preprocess(64)(images))
    torch.testing.assert_close(enc.encode(images), expected)
    text = compose_config("train", ["target=tiny_clip_text"]).target
    assert text.pretrained == t.pretrained and text.model_overrides == t.model_overrides
    # the image metrics' CLIP (bdf-reconstruct's metrics=synthetic, bdf-train's preview metrics) too
    for node in (compose_config("reconstruct", []).metrics, cfg.reconstruction.metrics):
        assert node.extractors.clip.weights == t.pretrained
        assert node.extractors.clip.arch_kwargs == t.model_overrides
