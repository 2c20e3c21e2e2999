"""Procedural scenes: 1-3 coloured objects from a fixed set of categories on varied backgrounds.

Each scene has a symbolic description (category, colour, size, position of every object and the
background style) from which both the RGB image and an English caption are derived, and from which
the fMRI simulator reads its semantic features (docs/architecture.md §5).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from braindecode_fw.errors import DataError

CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "crescent", "hexagon", "heart",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES: dict[str, float] = {"small": 0.13, "medium": 0.2, "large": 0.28}  # radius / image side
_COLOUR_VALUES = np.asarray(list(COLOURS.values()), dtype=np.float32)
_SIZE_VALUES = np.asarray(list(SIZES.values()), dtype=np.float32)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "noise")
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "sand": (194, 178, 128),
    "sky": (135, 190, 230),
    "grass": (110, 160, 90),
    "night": (40, 45, 70),
}

_TINT_VALUES = np.asarray(list(BACKGROUND_TINTS.values()), dtype=np.float32)


@dataclass(frozen=True)
class SceneObject:
    category: int  # index into CATEGORIES
    colour: int  # index into COLOURS
    size: int  # index into SIZES
    x: float  # centre, fraction of width (0 = left)
    y: float  # centre, fraction of height (0 = top)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int  # index into BACKGROUNDS
    tint: int  # index into BACKGROUND_TINTS
    texture_seed: int


def sample_scenes(n: int, rng: np.random.Generator, max_objects: int = 3) -> list[Scene]:
    """Draw ``n`` independent scenes (1..max_objects objects each)."""
    colour_names = list(COLOURS)
    scenes = []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        objs = []
        for _ in range(k):
            objs.append(
                SceneObject(
                    category=int(rng.integers(len(CATEGORIES))),
                    colour=int(rng.integers(len(colour_names))),
                    size=int(rng.integers(len(SIZES))),
                    x=float(rng.uniform(0.2, 0.8)),
                    y=float(rng.uniform(0.2, 0.8)),
                )
            )
        scenes.append(
            Scene(
                objects=tuple(objs),
                background=int(rng.integers(len(BACKGROUNDS))),
                tint=int(rng.integers(len(BACKGROUND_TINTS))),
                texture_seed=int(rng.integers(2**31 - 1)),
            )
        )
    return scenes


def _shape_mask(category: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed-distance-like membership for a shape centred at 0 with radius ``r``.

    ``u``, ``v``: pixel offsets from the centre in image-side units. Returns a float mask in [0, 1]
    with a one-pixel soft edge (anti-aliasing) provided by the caller's scaling.
    """
    ang = np.arctan2(v, u)
    rad = np.hypot(u, v)
    if category == "circle":
        d = rad - r
    elif category == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    elif category == "diamond":
        d = (np.abs(u) + np.abs(v)) - r
    elif category == "triangle":
        # equilateral, pointing up: max of three half-plane distances
        k = np.sqrt(3.0)
        d = np.maximum.reduce([(k * u - v) / 2, (-k * u - v) / 2, v]) - 0.5 * r
    elif category == "cross":
        arm = 0.33 * r
        d = np.minimum(
            np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r)
        )
    elif category == "ring":
        d = np.abs(rad - 0.75 * r) - 0.25 * r
    elif category == "star":
        d = rad - r * (0.6 + 0.4 * np.cos(5 * ang))
    elif category == "crescent":
        d = np.maximum(rad - r, -(np.hypot(u - 0.45 * r, v + 0.1 * r) - 0.8 * r))
    elif category == "hexagon":
        q = np.abs(u), np.abs(v)
        d = np.maximum(q[0] * 0.866 + q[1] * 0.5, q[1]) - 0.85 * r
    elif category == "heart":
        # two lobes above a downward triangle
        lobes = np.minimum(np.hypot(u - 0.4 * r, v + 0.25 * r), np.hypot(u + 0.4 * r, v + 0.25 * r)) - 0.45 * r
        tri = np.maximum(np.abs(u) * 1.0 + (v + 0.05 * r) * 0.9, -(v + 0.3 * r)) - 0.75 * r
        d = np.minimum(lobes, tri)
    else:  # pragma: no cover - guarded by CATEGORIES
        raise DataError(category)
    return d


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: ``coords (size,)``, ``yy``, ``xx`` ``(size, size)``."""
    coords = ((np.arange(size) + 0.5) / size).astype(np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return coords, yy, xx


def render_scene(scene: Scene, size: int = 64) -> np.ndarray:
    """Render one scene. Returns uint8 ``(size, size, 3)``."""
    coords, yy, xx = _pixel_grid(size)
    tint = _TINT_VALUES[scene.tint]
    style = BACKGROUNDS[scene.background]
    rng = np.random.default_rng(scene.texture_seed)
    if style == "plain":
        shade = np.ones_like(xx)
    elif style == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        shade = 0.75 + 0.5 * (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5))
    elif style == "stripes":
        theta, freq = rng.uniform(0, np.pi), rng.uniform(4, 9)
        shade = 1.0 + 0.2 * np.sign(np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)))
    elif style == "checker":
        n = int(rng.integers(3, 7))
        shade = 1.0 + 0.18 * ((np.floor(xx * n) + np.floor(yy * n)) % 2 * 2 - 1)
    else:  # noise: smooth random texture
        low = rng.normal(size=(8, 8))
        idx = np.minimum((coords * 8).astype(int), 7)
        shade = 1.0 + 0.12 * low[idx][:, idx]
    img = np.clip(tint * shade[..., None].astype(np.float32), 0, 255)
    for obj in scene.objects:
        r = _SIZE_VALUES[obj.size]
        # only the object's bounding box can change (all shapes lie within radius r)
        y0, y1 = max(int((obj.y - r) * size) - 2, 0), min(int((obj.y + r) * size) + 3, size)
        x0, x1 = max(int((obj.x - r) * size) - 2, 0), min(int((obj.x + r) * size) + 3, size)
        d = _shape_mask(CATEGORIES[obj.category], xx[y0:y1, x0:x1] - obj.x, yy[y0:y1, x0:x1] - obj.y, r)
        alpha = np.clip(0.5 - d * size, 0.0, 1.0)[..., None]  # ~1 pixel soft edge
        box = img[y0:y1, x0:x1]
        box += alpha * (_COLOUR_VALUES[obj.colour] - box)
    return np.round(img).astype(np.uint8)


def describe_place(x: float, y: float) -> str:
    """Where an object centred at ``(x, y)`` (image fractions) is, in words: 'at the top left', ..."""
    vert = "top" if y < 0.4 else ("bottom" if y > 0.6 else "middle")
    horiz = "left" if x < 0.4 else ("right" if x > 0.6 else "centre")
    if vert == "middle" and horiz == "centre":
        return "in the centre"
    if vert == "middle":
        return f"on the {horiz}"
    if horiz == "centre":
        return f"at the {vert}"
    return f"at the {vert} {horiz}"


def caption_scene(scene: Scene) -> str:
    """A deterministic English caption, e.g. 'a large red star at the top left and ...'."""
    colour_names = list(COLOURS)
    size_names = list(SIZES)
    parts = [
        f"a {size_names[o.size]} {colour_names[o.colour]} {CATEGORIES[o.category]} {describe_place(o.x, o.y)}"
        for o in scene.objects
    ]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objects} on {describe_background(scene)}"


def describe_background(scene: Scene) -> str:
    """The background in words: 'a sand background', 'a stripes sky background'."""
    bg = BACKGROUNDS[scene.background]
    tint = list(BACKGROUND_TINTS)[scene.tint]
    return f"a {tint} background" if bg == "plain" else f"a {bg} {tint} background"


def semantic_features(scenes: list[Scene]) -> np.ndarray:
    """Symbolic content per scene: category counts, colour counts, object-count one-hot, size mean.

    Returns float32 ``(n_scenes, n_categories + n_colours + 3 + 1)``; what the higher-level
    population of the simulator is tuned to.
    """
    n_cat, n_col = len(CATEGORIES), len(COLOURS)
    feats = np.zeros((len(scenes), n_cat + n_col + 4), dtype=np.float32)
    size_vals = np.asarray(list(SIZES.values()))
    for i, s in enumerate(scenes):
        for o in s.objects:
            feats[i, o.category] += 1
            feats[i, n_cat + o.colour] += 1
        feats[i, n_cat + n_col + len(s.objects) - 1] = 1
        feats[i, -1] = size_vals[[o.size for o in s.objects]].mean() / size_vals.max()
    return feats
