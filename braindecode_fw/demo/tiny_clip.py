"""The synthetic world's tiny CLIP (issue 10): an open_clip ViT/text-transformer pair of the real
``open_clip.CLIP`` class, trained contrastively (Radford et al. 2021, symmetric InfoNCE with a
learned temperature) on rendered synthetic scenes and their captions.

Architecture (``TINY_CLIP_OVERRIDES`` on open_clip's ``RN50`` config): CLIP's modified ResNet
(3-convolution stem, one bottleneck block per stage, base width 16, attention pooling; 64-px
input), a 3-layer width-128 text transformer over CLIP's BPE vocabulary (49,408 ids, 40-token
context), 128-d joint embedding. A ResNet rather than a ViT: at 64 px and a CPU budget, a
4-layer ViT with 8-px patches learned colour, size and place but not shape (zero-shot category
0.12 after 800 steps, chance 0.10), while the ResNet reached 0.36 after 250 steps (issue 10 notes,
docs/demo_models.md). The shipped weights (``open_clip_model.safetensors``, float16) zero the
embedding rows of BPE ids that no synthetic caption uses, so the file compresses to a fraction of
its size; the model loads with ``open_clip.create_model(TINY_CLIP_MODEL, pretrained=<file>,
**TINY_CLIP_OVERRIDES)``, the call the target encoders make.

Training batches mix random scenes with *category groups* (Radford et al.'s contrastive loss is
unchanged; the batch composition is the hard-negative trick): a one-object scene rendered once per
category with everything else equal, whose captions then differ only in the category word, so
shape, the cue that colour, size, place and background otherwise shadow, carries the loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braindecode_fw.data.synthetic import scenes as sc
from braindecode_fw.demo.corpus import (
    HELDOUT_STREAM,
    SCENE_DEFAULTS,
    TRAIN_STREAM,
    SceneCorpus,
    build_corpus,
    caption_variant,
)
from braindecode_fw.demo.publish import publish_folder
from braindecode_fw.errors import ConfigError, MissingFileError
from braindecode_fw.schema import FROM_YAML, check_keys, config_dataclass, setting
from braindecode_fw.targets.encoders import Preprocess

log = logging.getLogger(__name__)

TINY_CLIP_MODEL = "RN50"
TINY_CLIP_OVERRIDES: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
WEIGHTS_FILE = "open_clip_model.safetensors"
PROMPT_CATEGORY = "a {category}"




@config_dataclass("demo_models/retrain.yaml", "clip", key="demo_models.clip", also=SCENE_DEFAULTS)
class TinyClipConfig:
    """How the tiny CLIP is trained: ``clip`` of braindecode_fw/conf/demo_models/retrain.yaml holds every
    default and describes every key; ``image_size`` and ``max_objects`` are the synthetic world's
    (``world`` of braindecode_fw/conf/dataset/synthetic.yaml), as ``bdf-prepare demo_models=retrain`` passes them."""

    seed: int = setting(min=0)
    image_size: int = setting(min=1)
    max_objects: int = setting(min=1)
    n_train_scenes: int = setting(min=1)
    n_heldout_scenes: int = setting(min=1)
    steps: int = setting(min=1)
    batch_size: int = setting(min=1)
    lr: float = setting(gt=0)
    weight_decay: float = setting(min=0)
    warmup_steps: int = setting(min=0)
    full_caption_probability: float = setting(min=0, max=1)
    category_groups: int = setting(min=0)  # per batch: groups of len(CATEGORIES) scenes differing only in shape
    log_every: int = setting(min=1)
    overrides: dict[str, Any] | None = FROM_YAML  # null (the YAML's): a copy of TINY_CLIP_OVERRIDES

    def __post_init__(self) -> None:
        if self.overrides is None:
            self.overrides = json.loads(json.dumps(TINY_CLIP_OVERRIDES))

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TinyClipConfig:
        check_keys(cls, values, "demo_models.clip: unknown key(s)")
        return cls(**values)


def preprocess(image_size: int = 64) -> Preprocess:
    """The tiny CLIP's input transform: CLIP's mean/std at ``image_size`` (the target encoders'
    ``preprocess`` in braindecode_fw/conf/target/openclip_tiny.yaml)."""
    return Preprocess(image_size=image_size)


def build_model(overrides: dict[str, Any] | None = None, pretrained: str | None = None):
    """``open_clip.CLIP`` with the tiny architecture, random (seeded by the caller) or from a file."""
    import open_clip

    return open_clip.create_model(TINY_CLIP_MODEL, pretrained=pretrained, **(overrides or TINY_CLIP_OVERRIDES))


def input_size(model) -> int:
    """The vision tower's input side (ViT: a pair, ResNet: an int)."""
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def tokenizer(model):
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` -> L2-normalised image embeddings ``(n, embed_dim)``."""
    model.eval()
    pre = preprocess(input_size(model))
    return torch.cat([model.encode_image(pre(images[i:i + batch_size]), normalize=True)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 500) -> torch.Tensor:
    """Captions -> L2-normalised text embeddings ``(n, embed_dim)``."""
    model.eval()
    tok = tokenizer(model)
    return torch.cat([model.encode_text(tok(texts[i:i + batch_size]), normalize=True)
                      for i in range(0, len(texts), batch_size)])


def category_prompts() -> list[str]:
    return [PROMPT_CATEGORY.format(category=c) for c in sc.CATEGORIES]


def colour_class_embeddings(model) -> torch.Tensor:
    """One embedding per colour: the normalised mean of ``"a <colour> <category>"`` over the
    categories (CLIP's prompt ensembling). ``(n_colours, embed_dim)``."""
    texts = [f"a {colour} {category}" for colour in sc.COLOURS for category in sc.CATEGORIES]
    emb = encode_texts(model, texts).reshape(len(sc.COLOURS), len(sc.CATEGORIES), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot (category, colour) predictions for uint8 images ``(n, h, w, 3)``: the nearest
    category prompt and colour class embedding. ``(n,)`` int64 each."""
    img = encode_images(model, images)
    cat = img @ encode_texts(model, category_prompts()).T
    col = img @ colour_class_embeddings(model).T
    return cat.argmax(1).numpy(), col.argmax(1).numpy()


def evaluate(model, heldout: SceneCorpus, subset_size: int = 100) -> dict[str, float]:
    """The model card's numbers on held-out scenes: zero-shot category and colour accuracy on the
    single-object scenes (chance 1/10, 1/8), caption→image and image→caption top-1 over all
    held-out scenes and averaged over consecutive subsets of ``subset_size`` (chance 1/n)."""
    single = heldout.single_object()
    cat_true, col_true = heldout.first_object_labels()
    cat_pred, col_pred = zero_shot(model, heldout.images[single])
    img = encode_images(model, heldout.images)
    txt = encode_texts(model, heldout.captions)
    sim = txt @ img.T  # (captions, images)
    n = len(heldout)
    target = torch.arange(n)
    subsets = [slice(s, s + subset_size) for s in range(0, n - subset_size + 1, subset_size)]
    sub_c2i = [float((sim[s, s].argmax(1) == torch.arange(subset_size)).float().mean()) for s in subsets]
    sub_i2c = [float((sim[s, s].argmax(0) == torch.arange(subset_size)).float().mean()) for s in subsets]
    return {
        "n_heldout": n,
        "n_single_object": int(len(single)),
        "zero_shot_category_top1": float((cat_pred == cat_true[single]).mean()),
        "zero_shot_category_chance": 1 / len(sc.CATEGORIES),
        "zero_shot_colour_top1": float((col_pred == col_true[single]).mean()),
        "zero_shot_colour_chance": 1 / len(sc.COLOURS),
        "caption_to_image_top1": float((sim.argmax(1) == target).float().mean()),
        "image_to_caption_top1": float((sim.argmax(0) == target).float().mean()),
        "chance_top1": 1 / n,
        f"caption_to_image_top1_of_{subset_size}": float(np.mean(sub_c2i)),
        f"image_to_caption_top1_of_{subset_size}": float(np.mean(sub_i2c)),
        f"chance_top1_of_{subset_size}": 1 / subset_size,
    }


def _lr_at(step: int, cfg: TinyClipConfig) -> float:
    """Linear warm-up then cosine decay to zero (open_clip's default schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' positions and the temperature (open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln" in name or "bn" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TinyClipConfig, *, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train the tiny CLIP from scratch. Returns (model, record) where the record holds the
    config, corpus sizes, loss curve, seconds and held-out metrics."""
    import open_clip

    if cfg.category_groups * len(sc.CATEGORIES) >= cfg.batch_size:
        raise ConfigError(f"demo_models.clip.category_groups: {cfg.category_groups} groups of {len(sc.CATEGORIES)} "
                         f"scenes leave no room for random scenes in a batch of {cfg.batch_size}")
    start = time.perf_counter()
    train_set = build_corpus(cfg.n_train_scenes, seed=cfg.seed, stream=TRAIN_STREAM, image_size=cfg.image_size,
                             max_objects=cfg.max_objects)
    heldout = build_corpus(cfg.n_heldout_scenes, seed=cfg.seed, stream=HELDOUT_STREAM, image_size=cfg.image_size,
                           max_objects=cfg.max_objects)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.overrides)
    if input_size(model) != cfg.image_size:
        raise ConfigError(f"demo_models.clip.overrides.vision_cfg.image_size ({input_size(model)}) must "
                         f"equal the world's image_size ({cfg.image_size})")
    tok = tokenizer(model)
    pre = preprocess(cfg.image_size)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([cfg.seed, 7])
    curve = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tiny CLIP", total=cfg.steps)
        for step in range(cfg.steps):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            groups = category_groups(cfg.category_groups, rng, cfg.image_size)
            idx = rng.choice(len(train_set), size=cfg.batch_size - len(groups), replace=False)
            scenes = [s for s, _ in groups] + [train_set.scenes[i] for i in idx]
            images = np.concatenate([np.stack([im for _, im in groups]), train_set.images[idx]]) if groups \
                else train_set.images[idx]
            texts = [caption_variant(s, rng, cfg.full_caption_probability) for s in scenes]
            image_features, text_features, scale = model(pre(images), tok(texts))[:3]
            loss = loss_fn(image_features, text_features, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # CLIP clamps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                curve.append({"step": step, "loss": loss.item()})
                log.info("tiny CLIP step %d/%d loss %.3f", step, cfg.steps, curve[-1]["loss"])
            bar.advance(task)
    seconds = time.perf_counter() - start
    used = used_token_ids(tok, heldout.captions + train_set.captions)
    record = {"config": asdict(cfg), "model_name": TINY_CLIP_MODEL, "train_seconds": round(seconds, 1),
              "n_train_scenes": len(train_set), "n_heldout_scenes": len(heldout), "loss_curve": curve,
              "torch_threads": torch.get_num_threads(), "n_parameters": sum(p.numel() for p in model.parameters())}
    zero_unused_token_rows(model, used)
    model = _float16_roundtrip(model)
    record["metrics"] = evaluate(model, heldout)
    return model, record


def category_groups(n_groups: int, rng: np.random.Generator, image_size: int) -> list[tuple[sc.Scene, np.ndarray]]:
    """``n_groups`` one-object scenes, each rendered once per category with colour, size, place,
    background and texture unchanged: (scene, uint8 image) pairs, ``n_groups·len(CATEGORIES)``."""
    import dataclasses

    out = []
    for base in sc.sample_scenes(n_groups, rng, max_objects=1):
        for category in range(len(sc.CATEGORIES)):
            scene = dataclasses.replace(base, objects=(dataclasses.replace(base.objects[0], category=category),))
            out.append((scene, sc.render_scene(scene, image_size)))
    return out


def used_token_ids(tok, captions: list[str]) -> torch.Tensor:
    """Every BPE id that a caption (in any variant) can produce: the ids of all caption words,
    the start/end markers, padding (id 0)."""
    words = set(" ".join(captions).replace(",", " ,").split()) | set(sc.CATEGORIES) | set(sc.COLOURS) | \
        set(sc.SIZES) | {"a", "and", "on", "at", "the", "in", "centre", "middle", "top", "bottom", "left", "right",
                         "background", ","}
    ids = tok(sorted(words)).unique()
    return ids


def zero_unused_token_rows(model, used: torch.Tensor) -> None:
    """Zero the token-embedding rows of BPE ids no synthetic caption uses (compressible weights)."""
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.num_embeddings, dtype=torch.bool)
        keep[used] = True
        model.token_embedding.weight[~keep] = 0


def _float16_roundtrip(model):
    """The weights as shipped (float16), back in float32: the card's metrics are the file's."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # buffers: the ResNet's batch-norm statistics
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model.eval()


def save(model, record: dict[str, Any], folder: str | Path) -> Path:
    """Write ``open_clip_model.safetensors`` (float16), ``config.json`` (architecture +
    preprocessing), ``training.json`` (the record) and ``MODEL_CARD.md`` into ``folder``, atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "model_name": TINY_CLIP_MODEL})
        pre = preprocess(record["config"]["image_size"])
        (tmp / "config.json").write_text(json.dumps({
            "model_name": TINY_CLIP_MODEL, "model_overrides": record["config"]["overrides"],
            "preprocess": {"image_size": pre.image_size, "mean": pre.mean, "std": pre.std,
                           "interpolation": pre.interpolation, "antialias": pre.antialias}}, indent=2))
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        (tmp / "MODEL_CARD.md").write_text(model_card(record))

    return publish_folder(folder, write)


def load(folder: str | Path):
    """The shipped (or a retrained) tiny CLIP from its folder, in eval mode."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"tiny CLIP folder {folder}: no config.json (write it with `bdf-prepare "
                                f"demo_models=retrain`)")
    config = json.loads(config_file.read_text())
    return build_model(config["model_overrides"], pretrained=str(folder / WEIGHTS_FILE)).eval()


def _describe_vision(vis: dict[str, Any]) -> str:
    if isinstance(vis["layers"], list | tuple):
        return (f"CLIP's modified ResNet, {vis['image_size']}-px input, blocks per stage {list(vis['layers'])}, "
                f"base width {vis['width']}, attention pooling")
    return f"ViT, {vis['image_size']}-px input, {vis['patch_size']}-px patches, width {vis['width']}, {vis['layers']} layers"


def model_card(record: dict[str, Any]) -> str:
    cfg, m = record["config"], record["metrics"]
    sub = [k for k in m if k.startswith("caption_to_image_top1_of_")][0].rsplit("_", 1)[1]
    vis, txt = cfg["overrides"]["vision_cfg"], cfg["overrides"]["text_cfg"]
    return f"""# Tiny CLIP for the synthetic world

An `open_clip.CLIP` ({record['model_name']} config with overrides) trained contrastively on
procedural synthetic-world scenes and their captions by `bdf-prepare demo_models=retrain`
(`braindecode_fw/demo/tiny_clip.py`). It is the synthetic world's "CLIP": the target encoder of the
default `bdf-train`, the conditioning space of the tiny generator and the CLIP of the image metrics.
Synthetic-world model: it knows 10 shapes, 8 colours, 3 sizes, 9 places and 5×5 backgrounds, and
nothing else.

## Architecture
- vision: {_describe_vision(vis)}
- text: CLIP BPE (vocabulary {txt['vocab_size']}), context {txt['context_length']}, width {txt['width']},
  {txt['layers']} layers, {txt['heads']} heads
- joint embedding {cfg['overrides']['embed_dim']}-d; {record['n_parameters'] / 1e6:.2f} M parameters
- weights: float16 safetensors; token-embedding rows of BPE ids no caption uses are zero

## Training
- data: {record['n_train_scenes']:,} rendered scenes (seed {cfg['seed']}, stream of their own, 1–{cfg['max_objects']}
  objects, {cfg['image_size']} px); captions varied per step (full caption with p
  {cfg['full_caption_probability']}, else objects with random attribute subsets)
- {cfg['steps']} steps of batch {cfg['batch_size']} ({cfg['category_groups']} category groups of 10 in each), AdamW (lr {cfg['lr']}, weight decay
  {cfg['weight_decay']}, {cfg['warmup_steps']} warm-up steps, cosine), symmetric InfoNCE with a learned temperature
- {record['train_seconds']:.0f} s on {record['torch_threads']} CPU threads; final loss
  {record['loss_curve'][-1]['loss']:.3f}

## Held-out evaluation ({m['n_heldout']} unseen scenes)
| measure | value | chance |
|---|---|---|
| zero-shot category top-1 ("{PROMPT_CATEGORY}", {m['n_single_object']} one-object scenes) | {m['zero_shot_category_top1']:.3f} | {m['zero_shot_category_chance']:.3f} |
| zero-shot colour top-1 (prompt ensemble over shapes) | {m['zero_shot_colour_top1']:.3f} | {m['zero_shot_colour_chance']:.3f} |
| caption→image top-1 of {sub} | {m[f'caption_to_image_top1_of_{sub}']:.3f} | {m[f'chance_top1_of_{sub}']:.3f} |
| image→caption top-1 of {sub} | {m[f'image_to_caption_top1_of_{sub}']:.3f} | {m[f'chance_top1_of_{sub}']:.3f} |
| caption→image top-1 of {m['n_heldout']} | {m['caption_to_image_top1']:.3f} | {m['chance_top1']:.4f} |
| image→caption top-1 of {m['n_heldout']} | {m['image_to_caption_top1']:.3f} | {m['chance_top1']:.4f} |
"""
