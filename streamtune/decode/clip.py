"""CLIP through open_clip: batched image embeddings, the text tower, and zero-shot tags.

`model_name` is any open_clip config name or a path to a config .json. `pretrained` is an open_clip
tag (`laion2b_s34b_b79k`, needs network), a local checkpoint (`.safetensors`, `.pt`, `.bin`), or None
for a random init (seeded, so reruns agree).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from PIL import Image

PROMPT = "a photo of a {}."
LABEL_BATCH = 4


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


def bound_heap(mmap_bytes: int = 1 << 20, arenas: int = 2) -> None:
    """Keep freed large buffers out of the heap (glibc only; a no-op elsewhere): blocks of `mmap_bytes` or
    more (decoded frames, PCM windows, tensors) get their own mappings, returned to the OS when freed, instead
    of glibc's default threshold, which rises to 32 MB after the first such free and then leaves them
    fragmenting the heap; and at most `arenas` malloc arenas for all threads (FFmpeg's and torch's)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(mmap_bytes))
        libc.mallopt(M_TRIM_THRESHOLD, int(mmap_bytes))
        libc.mallopt(M_ARENA_MAX, int(arenas))
    except (OSError, AttributeError):
        pass


def import_open_clip():
    """`open_clip` without the package `__init__`s of torchvision, `torchvision.ops`, `torchvision.models`
    and timm (see `whisper_import`): building and running an open_clip model needs a few of their submodules,
    while those `__init__`s import every model, dataset and op, and with them `torch._dynamo` and sympy
    (import open_clip 260 -> 95 MB resident). Anything else of theirs still loads on first use."""
    if "open_clip" not in sys.modules:
        from streamtune.decode.whisper_import import skip_package_init

        skip_package_init("torchvision")
        skip_package_init("torchvision.ops")
        skip_package_init("torchvision.models")
        skip_package_init("timm")
    import open_clip

    return open_clip


def resolve_model_name(model_name: str) -> str:
    """An open_clip config name, or a path to a config .json (registered under its file stem)."""
    open_clip = import_open_clip()

    if model_name.endswith(".json") and os.path.isfile(model_name):
        open_clip.add_model_config(model_name)
        model_name = os.path.splitext(os.path.basename(model_name))[0]
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    return model_name


def _seeded_model(model_name: str, seed: int):
    import torch

    open_clip = import_open_clip()

    model_name = resolve_model_name(model_name)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        torch.random.set_rng_state(state)


def save_random_checkpoint(model_name: str, path: str, seed: int = 0) -> str:
    """Save a random-init open_clip model's state dict (`.safetensors`, else torch `.pt`); returns path."""
    import torch

    model = _seeded_model(model_name, seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def embed_dim(model_name: str) -> int:
    """Embedding width of an open_clip config, without building the model."""
    open_clip = import_open_clip()

    return int(open_clip.get_model_config(resolve_model_name(model_name))["embed_dim"])


class ClipEmbedder:
    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        labels: list[str] | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        seed: int = 0,
    ):
        import torch

        open_clip = import_open_clip()
        model_name = resolve_model_name(model_name)
        if pretrained and os.path.sep in pretrained and not os.path.exists(pretrained):
            raise FileNotFoundError(f"CLIP checkpoint {pretrained} does not exist")
        if pretrained:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        else:
            model = _seeded_model(model_name, seed).to(device)
        self.model = model.eval()
        self.preprocess = open_clip.image_transform(
            self.model.visual.image_size,
            is_train=False,
            mean=getattr(self.model.visual, "image_mean", None),
            std=getattr(self.model.visual, "image_std", None),
        )
        size = self.model.visual.image_size
        self.image_size = int(max(size) if isinstance(size, tuple | list) else size)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.torch = torch
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.labels = list(labels or [])
        self._label_embeddings: np.ndarray | None = None
        self.text_released = False
        self.dim = embed_dim(model_name)
        self.stats = {"images": 0, "texts": 0, "batches": 0, "model_seconds": 0.0}

    def prepare(self, image: Image.Image):
        """The model input for one image (a small tensor), so callers need not keep full-size images."""
        return self.preprocess(image.convert("RGB"))

    def embed_prepared(self, tensors: list) -> np.ndarray:
        """(N, D) float32, L2-normalised, from `prepare` outputs, `batch_size` at a time."""
        out = [np.zeros((0, self.dim), np.float32)]
        for b in range(0, len(tensors), self.batch_size):
            batch = self.torch.stack(tensors[b : b + self.batch_size])
            out.append(self._run(self.model.encode_image, batch))
            self.stats["images"] += len(batch)
        return np.concatenate(out)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        return self.embed_prepared([self.prepare(img) for img in images])

    def embed_text(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(N, D) float32, L2-normalised: the text tower, for search and zero-shot labels."""
        if self.text_released:
            raise RuntimeError("this ClipEmbedder released its text tower (release_text)")
        out = [np.zeros((0, self.dim), np.float32)]
        step = batch_size or self.batch_size
        for b in range(0, len(texts), step):
            tokens = self.tokenizer(list(texts[b : b + step]))
            out.append(self._run(self.model.encode_text, tokens))
            self.stats["texts"] += len(tokens)
        return np.concatenate(out)

    def _run(self, encode, batch) -> np.ndarray:
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            feats = encode(batch.to(self.device)).float()
            feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.stats["batches"] += 1
        self.stats["model_seconds"] += time.perf_counter() - t0
        return feats.cpu().numpy().astype(np.float32)

    def label_embeddings(self) -> np.ndarray:
        if self._label_embeddings is None:
            # a few prompts at a time: 32 x 77 tokens of activations cost ~40 MB more peak RSS than 4
            prompts = [PROMPT.format(label) for label in self.labels]
            self._label_embeddings = self.embed_text(prompts, min(self.batch_size, LABEL_BATCH))
        return self._label_embeddings

    def release_text(self) -> None:
        """Embed the labels, then free the text tower (ViT-B-32: 63 of 151 M parameters, 252 MB in f32).
        For callers that only embed images and tag them; `embed_text` raises afterwards."""
        self.label_embeddings()
        if self.text_released:
            return
        model = self.model
        for name in ("text", "transformer", "token_embedding", "positional_embedding", "ln_final",
                     "text_projection", "attn_mask"):  # fmt: skip
            if hasattr(model, name):
                delattr(model, name)
        self.text_released = True
        import gc

        gc.collect()
        trim_heap()

    def tag(self, embeddings: np.ndarray, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Zero-shot labels per embedding: the top_k (label, probability) pairs over `labels`."""
        if not self.labels or len(embeddings) == 0:
            return [[] for _ in range(len(embeddings))]
        scale = float(self.model.logit_scale.exp().item()) if hasattr(self.model, "logit_scale") else 100.0
        logits = scale * np.asarray(embeddings, np.float32) @ self.label_embeddings().T
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, len(self.labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for row, p in zip(order, probs, strict=True)]
