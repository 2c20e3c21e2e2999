"""Scene corpora for training the embedded demo models (issue 10): rendered synthetic-world scenes
with their captions, drawn from the synthetic world's scene distribution (``max_objects``,
``image_size`` of ``dataset.world``) but from seeds of their own, so the demo models never see the
world's stimuli.

Training captions are varied (:func:`caption_variant`): the full caption, or the objects with a
random subset of their attributes (always the category), so that the text tower learns what each
word means on its own and short prompts ("a red star") work zero-shot, as CLIP's web captions make
short prompts work for the real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braindecode_fw.data.synthetic import scenes as sc

#: The synthetic world's scene settings the demo models' training configs take their defaults from
#: (``bdf-prepare demo_models=retrain`` passes the world's values), for ``config_dataclass(also=...)``.
SCENE_DEFAULTS = (("dataset/synthetic.yaml", "world", ("image_size", "max_objects")),)

# independent streams: the world draws its stimuli from its own `world.seed`; these offsets keep the
# demo models' training and held-out scenes apart from each other (and from the world's)
TRAIN_STREAM, HELDOUT_STREAM = 1_000_003, 2_000_003


@dataclass
class SceneCorpus:
    """``images``: uint8 ``(n, size, size, 3)``; ``scenes``/``captions``: ``n`` each."""

    images: np.ndarray
    scenes: list[sc.Scene]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.scenes)

    def single_object(self) -> np.ndarray:
        """Indices of the scenes holding exactly one object (zero-shot classification items)."""
        return np.flatnonzero([len(s.objects) == 1 for s in self.scenes])

    def object_boxes(self, side: int, margin: float = 0.0) -> np.ndarray:
        """Where the objects are: float32 ``(n, side, side)``, 1 on the cells of a ``side``×``side``
        grid over the image whose centre lies in an object's bounding square (its centre ± its
        radius + ``margin``, image fractions), else 0. The tiny generator weights its loss by them."""
        centres = (np.arange(side, dtype=np.float32) + 0.5) / side
        radii = list(sc.SIZES.values())
        boxes = np.zeros((len(self.scenes), side, side), dtype=np.float32)
        for i, scene in enumerate(self.scenes):
            for obj in scene.objects:
                reach = radii[obj.size] + margin
                rows = np.abs(centres - obj.y) <= reach
                cols = np.abs(centres - obj.x) <= reach
                boxes[i][np.ix_(rows, cols)] = 1.0
        return boxes

    def first_object_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(category, colour) index of each scene's first object: ``(n,)`` int64 each."""
        return (np.asarray([s.objects[0].category for s in self.scenes], dtype=np.int64),
                np.asarray([s.objects[0].colour for s in self.scenes], dtype=np.int64))


def build_corpus(n: int, *, seed: int, stream: int, image_size: int = 64, max_objects: int = 3) -> SceneCorpus:
    """``n`` scenes from ``np.random.default_rng([seed, stream])``, rendered at ``image_size``."""
    rng = np.random.default_rng([seed, stream])
    scenes = sc.sample_scenes(n, rng, max_objects=max_objects)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = sc.render_scene(scene, image_size)
    return SceneCorpus(images=images, scenes=scenes, captions=[sc.caption_scene(s) for s in scenes])


def caption_variant(scene: sc.Scene, rng: np.random.Generator, full_probability: float = 0.5) -> str:
    """The full caption with probability ``full_probability``; otherwise the objects (in random
    order) each with its category, its colour (p 0.7), size (p 0.3) and place (p 0.3), and the
    background with p 0.3. E.g. ``"a red star and a circle"``."""
    if rng.random() < full_probability:
        return sc.caption_scene(scene)
    colours, sizes = list(sc.COLOURS), list(sc.SIZES)
    parts = []
    for k in rng.permutation(len(scene.objects)):
        o = scene.objects[k]
        words = [sizes[o.size]] if rng.random() < 0.3 else []
        if rng.random() < 0.7:
            words.append(colours[o.colour])
        words.append(sc.CATEGORIES[o.category])
        text = "a " + " ".join(words)
        if rng.random() < 0.3:
            text += " " + sc.describe_place(o.x, o.y)
        parts.append(text)
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < 0.3:
        text += " on " + sc.describe_background(scene)
    return text
