"""Caption targets: frozen CLIP text towers over each stimulus's caption (docs/methods/mindbridge.md §1, docs/methods/sttm.md §7).

- :class:`HFClipTextEncoder`: transformers ``CLIPTextModelWithProjection`` + its tokenizer from a
  hub id or local folder (``openai/clip-vit-large-patch14``). ``output="tokens_vd"``: Versatile
  Diffusion's text context, ``text_projection(last_hidden_state)`` divided by the norm of the
  pooled ``text_embeds``, ``(77, 768)`` (MindBridge's text target); ``"pooled"``: ``text_embeds``.
- :class:`OpenClipTextEncoder`: an open_clip text tower (tag, local file, or seeded random init with
  ``model_overrides``: the synthetic world), with the same two outputs and ``"tokens"``: the
  final-layer token outputs after ``ln_final``, unprojected, ``(context, width)`` (77 × 1024 for
  ViT-H/14: NeuroPictor's semantic target, docs/methods/neuropictor.md §3).

Captions come from the store's ``images/metadata.json``; an image with several captions uses
``caption_index`` (MindBridge cycles captions per iteration; a cached target fixes one).
"""

from __future__ import annotations

from typing import Any

import torch

from braindecode_fw.errors import ConfigError
from braindecode_fw.targets.encoders import TargetEncoder, _plain, _weights_fingerprint

TEXT_OUTPUTS = ("tokens_vd", "pooled", "tokens")


def store_captions(store, start: int, stop: int, caption_index: int = 0) -> list[str]:
    """Captions ``start:stop`` of a store (one per image; lists pick ``caption_index``)."""
    captions = store.image_metadata.get("captions")
    if captions is None:
        raise ConfigError(f"target: {store.root}/images/metadata.json has no captions; a text target needs them")
    out = []
    for i in range(start, stop):
        c = captions[i]
        if isinstance(c, list | tuple):
            c = c[caption_index % len(c)] if c else ""
        out.append(str(c))
    return out


class _TextEncoder(TargetEncoder):
    def __init__(self, feature_name: str, output: str, batch_size: int, device: str, caption_index: int):
        super().__init__()
        if output not in TEXT_OUTPUTS:
            raise ConfigError(f"target.output must be one of {TEXT_OUTPUTS}, got {output!r}")
        self.feature_name, self.output = feature_name, output
        self.batch_size, self.device_name, self.caption_index = batch_size, device, caption_index

    def id_blob(self) -> dict[str, Any]:
        return {**super().id_blob(), "source": "captions", "caption_index": self.caption_index}

    def n_items(self, store) -> int:
        return int(store.images.shape[0])

    def encode_store(self, store, start: int, stop: int) -> torch.Tensor:
        return self.encode_texts(store_captions(store, start, stop, self.caption_index))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """``n`` captions -> float32 ``(n, *output_shape)`` on CPU, in batches."""
        self.eval()
        return torch.cat([self.forward_texts(texts[i : i + self.batch_size]).float().cpu()
                          for i in range(0, len(texts), self.batch_size)])

    def forward_texts(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.encode_texts(["a probe"]).shape[1:])


def _vd_normalise(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    return tokens / pooled.norm(dim=-1, keepdim=True)[:, None, :]


class HFClipTextEncoder(_TextEncoder):
    """transformers CLIP text tower (``CLIPTextModelWithProjection`` + ``CLIPTokenizer``)."""

    def __init__(self, model_id: str, *, feature_name: str = "clip_text_tokens", output: str = "tokens_vd",
                 revision: str | None = None, local_files_only: bool = False, max_length: int = 77,
                 caption_index: int = 0, batch_size: int = 128, device: str = "cpu"):
        if output == "tokens":
            raise ConfigError("target.output: 'tokens' (ln_final tokens) is an open_clip text output; the transformers "
                             "tower gives 'tokens_vd' or 'pooled'")
        super().__init__(feature_name, output, batch_size, device, caption_index)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.model_id, self.revision, self.max_length = model_id, revision, max_length
        self.tokenizer = CLIPTokenizer.from_pretrained(model_id, revision=revision, local_files_only=local_files_only)
        self.model = CLIPTextModelWithProjection.from_pretrained(
            model_id, revision=revision, local_files_only=local_files_only).to(device).eval().requires_grad_(False)

    def identity(self) -> dict[str, Any]:
        return {"backend": "transformers-text", "model": _weights_fingerprint(self.model_id),
                "revision": self.revision, "max_length": self.max_length}

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device_name)
        out = self.model(input_ids=ids)
        if self.output == "pooled":
            return out.text_embeds
        return _vd_normalise(self.model.text_projection(out.last_hidden_state), out.text_embeds)


class OpenClipTextEncoder(_TextEncoder):
    """open_clip text tower; ``model_overrides`` shrink it (random, seeded: the synthetic world)."""

    def __init__(self, model_name: str, pretrained: str | None = None, *, feature_name: str = "clip_text_tokens",
                 output: str = "tokens_vd", seed: int = 0, model_overrides: dict[str, Any] | None = None,
                 caption_index: int = 0, batch_size: int = 256, device: str = "cpu", cache_dir: str | None = None):
        super().__init__(feature_name, output, batch_size, device, caption_index)
        import open_clip

        if model_name not in open_clip.list_models():
            raise ConfigError(f"target.model_name: unknown open_clip model {model_name!r}")
        self.model_name, self.pretrained, self.seed = model_name, pretrained, seed
        self.model_overrides = _plain(model_overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                           **self.model_overrides)
        if not hasattr(model, "token_embedding"):
            raise ConfigError(f"target.model_name: {model_name} has a custom text tower; use an open_clip CLIP "
                             f"with a built-in text transformer")
        model.visual = None  # only the text tower is kept
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)

    def identity(self) -> dict[str, Any]:
        return {"backend": "open_clip-text", "model": self.model_name,
                "weights": _weights_fingerprint(self.pretrained),
                "seed": self.seed if self.pretrained is None else None, "overrides": self.model_overrides}

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        m = self.model
        ids = self.tokenizer(texts).to(self.device_name)
        if int(ids.max()) >= m.token_embedding.num_embeddings:
            raise ConfigError(f"target.model_overrides.text_cfg.vocab_size: {m.token_embedding.num_embeddings} is "
                             f"smaller than the tokenizer's vocabulary (ids up to {int(ids.max())})")
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (n, context, width)
        if self.output == "tokens":
            return x
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id (CLIP's pooling)
        pooled = x[torch.arange(len(x)), eot] @ m.text_projection
        if self.output == "pooled":
            return pooled
        return _vd_normalise(x @ m.text_projection, pooled)
