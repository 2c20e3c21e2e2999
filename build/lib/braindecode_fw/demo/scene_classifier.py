"""An independent judge of generated scenes (issue 10's generator acceptance): a small CNN that
reads which categories and colours a synthetic scene holds (multi-label presence, 10 + 8 outputs),
trained on rendered scenes of its own stream. It shares nothing with the tiny CLIP, so "the sample
shows a red star" is measured by a second, unrelated model."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from braindecode_fw.data.synthetic import scenes as sc
from braindecode_fw.demo.corpus import SceneCorpus

log = logging.getLogger(__name__)


class SceneClassifier(nn.Module):
    """``(n, 3, 64, 64)`` in [0, 1] -> logits ``(n, n_categories + n_colours)``."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, len(sc.CATEGORIES) + len(sc.COLOURS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The most likely category and colour of each image: ``(n,)`` int64 each."""
        self.eval()
        logits = torch.cat([self(images[i:i + 256].float()) for i in range(0, len(images), 256)])
        n_cat = len(sc.CATEGORIES)
        return logits[:, :n_cat].argmax(1).numpy(), logits[:, n_cat:].argmax(1).numpy()


def presence_labels(corpus: SceneCorpus) -> torch.Tensor:
    """Multi-hot ``(n, n_categories + n_colours)``: which categories and colours each scene holds."""
    n_cat = len(sc.CATEGORIES)
    y = torch.zeros(len(corpus), n_cat + len(sc.COLOURS))
    for i, s in enumerate(corpus.scenes):
        for o in s.objects:
            y[i, o.category] = 1
            y[i, n_cat + o.colour] = 1
    return y


def as_unit_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def train_classifier(corpus: SceneCorpus, *, steps: int = 600, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0) -> SceneClassifier:
    """Binary cross-entropy on presence labels, Adam with cosine decay."""
    torch.manual_seed(seed)
    model = SceneClassifier()
    x, y = as_unit_images(corpus.images), presence_labels(corpus)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("scene classifier step %d/%d loss %.4f", step, steps, loss.item())
    return model.eval()
