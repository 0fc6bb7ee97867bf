"""Generation (and evaluation) with a multimodal adapter folder: the base LM with its adapter, the
projectors, and the frozen encoders named in `multimodal.json`.

    from streamtune.train.mm_generate import load_multimodal
    mm = load_multimodal("offline:smollm2", "adapters/")
    mm.generate("What does this picture show?", image="shape.png")
    mm.generate("What is said?", audio="clip.wav")

A prompt without a placeholder for a given medium gets one in front (`<image>\\n`), the layout the
default training template uses.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from streamtune.train.multimodal import (
    PLACEHOLDER,
    PROJECTOR_FILE,
    attach_from_meta,
    prompt_with_media,
    read_meta,
    sample_embeddings,
)

MediaInput = str | os.PathLike | bytes | np.ndarray | None


class MultimodalModel:
    """An LM with adapters and projectors, plus the encoders that turn media into its soft tokens."""

    def __init__(self, net: nn.Module, tokenizer, meta: dict):
        self.net, self.tokenizer, self.meta = net, tokenizer, meta
        self.spec = meta["media"]
        self._encoders = None
        self._cache: dict = {}  # (kind, digest of the bytes) -> tokens: evaluation asks for a medium twice

    def encoders(self) -> dict:
        if self._encoders is None:
            from streamtune.decode.tokens import build_encoders, config_from_spec

            self._encoders = build_encoders(config_from_spec(self.spec), self.spec)
        return self._encoders

    def encode(self, kind: str, value) -> np.ndarray:
        """(tokens, dim) float16 for one medium: a file path, encoded bytes, a PIL image or 16 kHz PCM."""
        if kind not in self.spec:
            raise ValueError(f"this adapter has no {kind} projector (it knows {sorted(self.spec)})")
        if isinstance(value, str | os.PathLike):
            with open(value, "rb") as f:
                value = f.read()
        if isinstance(value, bytes | bytearray | memoryview):
            import hashlib

            key = (kind, hashlib.sha1(value).hexdigest())
            if key not in self._cache:
                self._cache[key] = self._encode(kind, bytes(value))
            return self._cache[key]
        return self._encode(kind, value)

    def _encode(self, kind: str, value) -> np.ndarray:
        from PIL import Image

        from streamtune.decode.media import decode_audio, decode_image

        enc = self.encoders()
        if kind == "image":
            tokens = enc["image"]
            image = (
                value if isinstance(value, Image.Image) else decode_image(bytes(value), enc["cfg"].max_pixels)
            )
            return tokens.encode_tokens([tokens.clip.prepare(image)])[0]  # the tower stops after its block
        audio = value if isinstance(value, np.ndarray) else decode_audio(bytes(value), 16000)
        return enc["audio"].encode(audio)

    def media_of(self, row: dict) -> dict[str, list[np.ndarray]]:
        """Media of a feature row (cached `*_tokens`) or a raw row (`image` / `audio` bytes)."""
        out = {}
        for kind in self.spec:
            cached = row.get(f"{kind}_tokens")
            value = cached if cached is not None else row.get(kind)
            items = value if isinstance(value, list) else [] if value is None else [value]
            out[kind] = [
                np.asarray(v, np.float16) if cached is not None else self.encode(kind, v) for v in items
            ]
        return out

    def generate(
        self,
        prompt: str,
        image: MediaInput = None,
        audio: MediaInput = None,
        max_tokens: int = 64,
        system: str | None = None,
    ) -> str:
        """Greedy completion of `prompt` with the given media as soft tokens (and the training template's
        system message unless `system` is given)."""
        from mlx_lm.generate import generate as mlx_generate

        ids, embeddings = self._prompt(prompt, {"image": image, "audio": audio}, system)
        text = mlx_generate(
            self.net, self.tokenizer, ids, max_tokens=max_tokens, input_embeddings=embeddings[0]
        )
        return text.strip()

    def _prompt(self, prompt: str, inputs: dict, system: str | None) -> tuple[list[int], mx.array]:
        """Prompt ids and (1, L, H) input embeddings with the given media as soft tokens (and the
        training template's system message unless `system` is given)."""
        if system is None:
            system = (self.meta.get("template") or {}).get("system")
        media = {}
        for kind in ("image", "audio"):
            if inputs.get(kind) is None:
                continue
            media[kind] = [self.encode(kind, inputs[kind])]
            if PLACEHOLDER[kind] not in prompt:
                prompt = f"{PLACEHOLDER[kind]}\n{prompt}"
        ids, placed = prompt_with_media(self.tokenizer, prompt, media, system)
        return ids, sample_embeddings(self.net, ids, placed)

    def generate_batch(
        self, requests: list[dict], max_tokens: int = 64, system: str | None = None
    ) -> list[str]:
        """Greedy completions of several requests (`{"prompt": ..., "image": ..., "audio": ...}`), the
        prompts of one length decoded together: one pass over the weights per token for the whole
        group instead of one per request (what evaluation costs on a CPU). Same answers as `generate`
        up to float summation order."""
        from mlx_lm.models.cache import make_prompt_cache

        prepared = [self._prompt(r["prompt"], r, system) for r in requests]
        stops = set(self.tokenizer.eos_token_ids)
        answers: list[str] = [""] * len(requests)
        by_length: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(prepared):
            by_length.setdefault(len(ids), []).append(i)
        for group in by_length.values():
            ids = mx.array([prepared[i][0] for i in group])
            embeddings = mx.concatenate([prepared[i][1] for i in group])
            cache = make_prompt_cache(self.net)
            logits = self.net(ids, cache=cache, input_embeddings=embeddings)[:, -1]
            out: list[list[int]] = [[] for _ in group]
            done = [False] * len(group)
            for _ in range(max_tokens):
                token = mx.argmax(logits, axis=-1)
                for j, t in enumerate(token.tolist()):
                    done[j] = done[j] or t in stops
                    if not done[j]:
                        out[j].append(t)
                if all(done):
                    break
                logits = self.net(token[:, None], cache=cache)[:, -1]
            for i, tokens in zip(group, out, strict=True):
                answers[i] = self.tokenizer.decode(tokens).strip()
        return answers

    def counterfactual(self, rows: list[dict], template=None, **kw) -> dict:
        """Held-out loss with own vs another sample's media (`counterfactual.counterfactual`)."""
        from streamtune.train.counterfactual import counterfactual
        from streamtune.train.data import Template

        template = template or Template(**self.meta["template"])
        return counterfactual(self.net, self.tokenizer, rows, template, self.media_of, **kw)


def load_multimodal(model: str, adapter_path: str, dtype: str | None = None) -> MultimodalModel:
    """The base `model` with the adapter, projectors and encoder spec of a multimodal output folder."""
    from streamtune.train.adapters import latest
    from streamtune.train.generate import load_with_adapter

    adapter_path = latest(adapter_path) or adapter_path  # a pipeline's adapters/ root: its newest version
    meta = read_meta(adapter_path)
    if meta is None:
        raise FileNotFoundError(f"no multimodal.json in {adapter_path}: not a multimodal adapter folder")
    net, tokenizer, _ = load_with_adapter(model, adapter_path, dtype=dtype)
    attach_from_meta(net, meta)
    net.projectors.load_weights(os.path.join(adapter_path, PROJECTOR_FILE), strict=True)
    net.eval()
    mx.eval(net.parameters())
    return MultimodalModel(net, tokenizer, meta)
