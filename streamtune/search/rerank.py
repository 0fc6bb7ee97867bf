"""Re-scoring the top hits with a fine-tuned multimodal adapter: P(yes) for "Does this clip match: QUERY?"

The model sees the segment's thumbnail frame as image tokens (when the adapter has an image projector) and
its transcript as text, and answers; the score is P(yes) / (P(yes) + P(no)) from the next-token
distribution. The final score mixes it with the fused rank score (both scaled to 0..1 over the
candidates): `(1 - weight) * fused / max(fused) + weight * p_yes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUESTION = "Does this clip match: {query}? Answer yes or no."
YES, NO = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")


def _first_tokens(tokenizer, words: tuple[str, ...]) -> list[int]:
    ids = {
        tokenizer.encode(w, add_special_tokens=False)[0]
        for w in words
        if tokenizer.encode(w, add_special_tokens=False)
    }
    return sorted(ids)


class Reranker:
    def __init__(self, model: str, adapter_path: str, weight: float = 0.5, candidates: int = 20):
        from streamtune.train.mm_generate import load_multimodal

        self.mm = load_multimodal(model, adapter_path)
        self.weight, self.candidates = float(weight), int(candidates)
        tok = self.mm.tokenizer
        self.yes, self.no = _first_tokens(tok, YES), _first_tokens(tok, NO)

    def p_yes(self, query: str, frame: bytes | None, transcript: str = "") -> float:
        """P(yes) for one segment: its frame (JPEG/PNG bytes, or None) and transcript."""
        import mlx.core as mx

        from streamtune.train.multimodal import PLACEHOLDER, prompt_with_media, sample_embeddings

        media, prompt = {}, QUESTION.format(query=query)
        if transcript:
            prompt = f"Said: {transcript}\n{prompt}"
        if frame is not None and "image" in self.mm.spec:
            media["image"] = [self.mm.encode("image", frame)]
            prompt = f"{PLACEHOLDER['image']}\n{prompt}"
        system = (self.mm.meta.get("template") or {}).get("system")
        ids, placed = prompt_with_media(self.mm.tokenizer, prompt, media, system)
        logits = self.mm.net(
            mx.array(ids)[None], input_embeddings=sample_embeddings(self.mm.net, ids, placed)
        )
        last = np.asarray(logits[0, -1].astype(mx.float32), np.float64)
        logp = last - np.logaddexp.reduce(last)
        yes, no = np.logaddexp.reduce(logp[self.yes]), np.logaddexp.reduce(logp[self.no])
        return float(1.0 / (1.0 + np.exp(no - yes)))

    def rerank(self, index: Any, query: str, hits: list) -> list:
        """Hits re-ordered by the mixed score; each re-scored hit gains a `rerank` signal."""
        head, tail = hits[: self.candidates], hits[self.candidates :]
        if not head:
            return hits
        top = max(h.score for h in head) or 1.0
        probs = []
        for h in head:
            frame = index.thumbnail(h) if h.thumbnail else None
            probs.append(self.p_yes(query, frame, h.snippet))
        order = np.argsort(-np.asarray(probs), kind="stable")
        ranks = {int(i): r for r, i in enumerate(order, 1)}
        for i, (h, p) in enumerate(zip(head, probs, strict=True)):
            h.signals["rerank"] = {"rank": ranks[i], "score": round(p, 4)}
            if p > 0.5 and "rerank" not in h.matched:
                h.matched.append("rerank")
            h.score = round((1 - self.weight) * h.score / top + self.weight * p, 6)
        head.sort(key=lambda h: -h.score)
        return head + tail
