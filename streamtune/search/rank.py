"""Querying an index: BM25 (FTS5) + transcript-embedding cosine + CLIP text-to-frame, fused by reciprocal rank.

Each signal ranks the rows that pass the filters and contributes `weight / (rrf_k + rank)` for its top
`candidates`; a lexical hit's share is scaled by the square of the fraction of the query's words it holds
(`coverage`), so a row that shares one incidental word with a reworded query ("port security check" and a
transcript saying "let me just check my notes") cannot outrank the rows the meaning points to. Tuned on
corpus seeds 1-3 of tests/test_search.py (recall@5 said / natural / paraphrased, mean of the three): plain
fusion 1.0 / 0.93 / 0.85, coverage 0.95 / 0.87, coverage squared 0.95 / 0.91 (semantic alone 0.96 /
0.92: the rest are the embedding's misses, "lido", "clinic"). More signals can be registered (`Index.add_signal`): a function from the query to one score
per row. A query never writes: the FTS5 database is opened immutable and the rest is read into memory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtune import storage
from streamtune.config import IndexConfig
from streamtune.search import ann, lexical
from streamtune.search.index import (
    ANN_COLUMNS,
    SLOT_BITS,
    SearchError,
    _read_part,
    part_vectors,
    read_manifest,
)

Signal = Callable[[str], "np.ndarray | None"]
BUILTIN_FIELDS = ("sample_id", "source", "modality", "language", "tag")
SNIPPET_CHARS = 240
LOAD_COLUMNS = ["sample_id", "segment_index", "modality", "source", "t0", "t1", "transcript", "language",
                "meta", "tags"]  # fmt: skip


@dataclass
class Hit:
    """One found moment. `marks` are (start, end) character spans of matched words in `snippet`."""

    sample_id: str
    segment_index: int
    source: str
    t0: float
    t1: float | None
    snippet: str
    marks: list[tuple[int, int]]
    score: float
    signals: dict[str, dict[str, float]]
    matched: list[str]
    modality: str
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    row: int = -1
    thumbnail: dict | None = None  # {"part": path, "row": n}: bytes through Index.thumbnail(hit)

    def marked(self, before: str = "[", after: str = "]") -> str:
        """The snippet with matched words wrapped."""
        out, pos = [], 0
        for a, b in self.marks:
            out += [self.snippet[pos:a], before, self.snippet[a:b], after]
            pos = b
        return "".join(out) + self.snippet[pos:]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["marks"] = [list(m) for m in self.marks]
        d["snippet_marked"] = self.marked()
        return d


def normalise_query(query: str, max_chars: int) -> str:
    """NFKC text without control/format characters and with single spaces; errors for empty or huge text."""
    if not isinstance(query, str):
        raise SearchError("query must be text")
    if len(query) > max_chars * 4:
        raise SearchError(f"query is {len(query)} characters; the limit is {max_chars}")
    text = unicodedata.normalize("NFKC", query)
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    text = " ".join(text.split())
    if not text:
        raise SearchError("empty query: give some words to search for")
    if len(text) > max_chars:
        raise SearchError(f"query is {len(text)} characters; the limit is {max_chars}")
    return text


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    for suffix in ("ing", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def snippet(
    text: str, query_words: list[str], width: int = SNIPPET_CHARS
) -> tuple[str, list[tuple[int, int]]]:
    """A window of `text` around its first matched word, and the spans of matched words in it."""
    text = " ".join((text or "").split())
    stems = {_stem(w) for w in query_words}
    spans = [(m.start(), m.end()) for m in lexical.WORD.finditer(text) if _stem(m.group().lower()) in stems]
    start = 0
    if len(text) > width:
        first = spans[0][0] if spans else 0
        start = max(0, min(first - width // 4, len(text) - width))
        while start > 0 and not text[start - 1].isspace():
            start -= 1
    cut = text[start : start + width]
    prefix = "… " if start else ""
    suffix = " …" if start + width < len(text) else ""
    shift = len(prefix) - start
    marks = [(a + shift, b + shift) for a, b in spans if a >= start and b <= start + width]
    return prefix + cut + suffix, marks


class Index:
    """An opened index: vectors and metadata in memory, the FTS5 file in a local folder."""

    def __init__(self, url: str, manifest: dict, cfg: IndexConfig, storage_options: dict | None = None):
        self.url, self.manifest, self.cfg = url, manifest, cfg
        self.storage_options = storage_options
        tables = [
            _read_part(storage.join(url, p["path"]), storage_options, LOAD_COLUMNS) for p in manifest["parts"]
        ]
        self.part_starts = np.cumsum([0] + [int(p["rows"]) for p in manifest["parts"]])
        table = pa.concat_tables(tables) if tables else None
        self.n = int(self.part_starts[-1])
        self.table = table
        self.has_text = np.asarray(table.column("transcript").is_valid()) if table else np.zeros(0, bool)
        ann_entry = (manifest.get("ann") or {}) if cfg.ann_min_rows > 0 else {}  # 0: exact even where built
        self.ann_kinds = set(ann_entry)
        # large indexes: an IVF over float16 vectors; small ones: one float32 matrix scored exactly
        self.text_ann = self._ivf("text", int(manifest["text_dim"])) if "text" in ann_entry else None
        self.text_vectors = None if self.text_ann else self._exact_text()
        self._meta: list[dict] | None = None
        self._frames: tuple[np.ndarray, np.ndarray] | None = None
        self._thumbs: dict[str, list] = {}
        self._query_cache: dict[str, np.ndarray] = {}
        self._fields: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
        self.signals: dict[str, tuple[Signal, float]] = {}
        self._tmp = None
        self._slot_start: dict[int, int] | None = None
        self.lexical = self._open_lexical() if manifest.get("lexical") else None
        clip_ref = cfg.clip_pretrained or manifest.get("clip_pretrained")
        clip_model = cfg.clip_model or manifest.get("clip_model")
        if manifest.get("clip_dim") and clip_ref and clip_model and cfg.clip_weight > 0:
            self.add_signal("clip", self._clip_signal(clip_model, clip_ref), cfg.clip_weight)

    def _lexical_rows(self, hits: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """FTS rowids (part slot << 32 | row; older indexes: the row) as index rows."""
        if self.manifest["lexical"].get("rowids") != "slot":
            return hits
        if self._slot_start is None:
            self._slot_start = {
                int(p["fts"]): int(s)
                for p, s in zip(self.manifest["parts"], self.part_starts[:-1], strict=True)
            }
        mask = (1 << SLOT_BITS) - 1
        return [(self._slot_start[r >> SLOT_BITS] + (r & mask), s) for r, s in hits]

    def _open_lexical(self) -> lexical.Lexical:
        url = storage.join(self.url, self.manifest["lexical"]["path"])
        if storage.protocol_of(url) == "file":
            return lexical.Lexical(url.split("://", 1)[-1])
        self._tmp = tempfile.mkdtemp(prefix="streamtune-search-")
        local = os.path.join(self._tmp, "lexical.sqlite")
        with open(local, "wb") as f:
            f.write(storage.read_bytes(url, self.storage_options))
        return lexical.Lexical(local)

    def close(self) -> None:
        if self.lexical:
            self.lexical.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n

    # -- signals -------------------------------------------------------------------------------------
    def add_signal(self, name: str, fn: Signal, weight: float = 1.0) -> None:
        """Fuse `fn(query) -> (N,) scores` (higher is better; None: no opinion) into the ranking."""
        self.signals[name] = (fn, float(weight))

    def _parts_vectors(self, kind: str, dim: int):
        """(part number, vectors, index rows) of every part, one part at a time."""
        for i, p in enumerate(self.manifest["parts"]):
            t = _read_part(storage.join(self.url, p["path"]), self.storage_options, ANN_COLUMNS[kind])
            vecs, owners = part_vectors(t, kind, dim)
            yield i, vecs, owners + int(self.part_starts[i])

    def _exact_text(self) -> np.ndarray:
        dim = int(self.manifest["text_dim"])
        out = np.zeros((self.n, dim), np.float32)
        for _, vecs, owners in self._parts_vectors("text", dim):
            out[owners] = vecs
        return out

    def _ivf(self, kind: str, dim: int) -> ann.IVF:
        entry = self.manifest["ann"][kind]
        cent = ann.read_centroids(
            _read_part(storage.join(self.url, entry["centroids"]), self.storage_options)
        )
        lists = []
        for p in self.manifest["parts"]:
            ref = storage.join(self.url, entry["parts"][p["path"]]["path"])
            lists.append(_read_part(ref, self.storage_options).column("list").to_numpy())
        return ann.IVF.from_parts(cent, lists, ((v, o) for _, v, o in self._parts_vectors(kind, dim)))

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(F, D) float32 frame embeddings of every row (a row without frames uses its clip_embedding) and
        the row of each frame."""
        if self._frames is None:
            dim = int(self.manifest["clip_dim"])
            vecs, owners = [], []
            for _, v, o in self._parts_vectors("frames", dim):
                vecs.append(v)
                owners.append(o)
            self._frames = (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32),
                            np.concatenate(owners).astype(np.int64) if owners else np.zeros(0, np.int64))  # fmt: skip
        return self._frames

    def _clip_signal(self, model: str, pretrained: str) -> Signal:
        state: dict[str, Any] = {}

        def score(query: str) -> np.ndarray | None:
            if "clip" not in state:
                from streamtune.decode.clip import ClipEmbedder

                state["clip"] = ClipEmbedder(model, pretrained)
            q = state["clip"].embed_text([query])[0]
            out = np.full(self.n, -np.inf, np.float32)
            if "frames" in self.ann_kinds:
                if "ivf" not in state:
                    state["ivf"] = self._ivf("frames", int(self.manifest["clip_dim"]))
                rows, scores = state["ivf"].search(q, max(self.cfg.candidates, 100), self.cfg.ann_nprobe)
                out[rows] = scores
                return out
            vecs, owners = self.frames()
            if len(vecs):
                np.maximum.at(out, owners, vecs @ q)
            return out

        return score

    # -- filters -------------------------------------------------------------------------------------
    def meta(self) -> list[dict]:
        if self._meta is None:
            self._meta = [_meta_dict(m) for m in self.column("meta")]
        return self._meta

    def _distinct(self, name: str) -> tuple[list, np.ndarray]:
        """A column's distinct values and each row's index into them (-1 for null): filters parse each
        distinct sidecar once (1M rows sharing a few hundred sidecars: ms, not seconds of JSON)."""
        if self.table is None:
            return [], np.zeros(0, np.int64)
        enc = pc.dictionary_encode(self.table.column(name).combine_chunks())
        idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return enc.dictionary.to_pylist(), idx

    def filter_mask(self, where: dict[str, str] | list[str] | None) -> np.ndarray | None:
        """Rows whose field equals the value for every FIELD=VALUE (sidecar fields, or sample_id, source,
        modality, language, tag)."""
        if not where:
            return None
        if not isinstance(where, dict):
            where = dict(parse_where(w) for w in where)
        mask = np.ones(self.n, bool)
        for name, want in where.items():
            if name == "tag":
                mask &= np.array([want in (tags or []) for tags in self.column("tags")], bool)
            else:
                codes, lookup = self.field_codes(name)
                mask &= codes == lookup.get(want, -1)
        return mask

    def field_codes(self, name: str) -> tuple[np.ndarray, dict[str, int]]:
        """A field's value per row as a code into {text: code} (-2 where a row lacks it), computed once per
        field: a filter is then one integer comparison (1M rows: ~1 ms instead of a Python pass)."""
        if name not in self._fields:
            distinct, idx = self._distinct("meta" if name not in BUILTIN_FIELDS else name)
            if name in BUILTIN_FIELDS:
                values = [None if v is None else str(v) for v in distinct]
            else:
                metas = [_meta_dict(m) for m in distinct]
                if self.n and not any(name in m for m in metas):
                    known = sorted({k for m in metas for k in m} | set(BUILTIN_FIELDS))
                    raise SearchError(f"unknown filter field {name!r}; known: {', '.join(known)}")
                values = [_text(m[name]) if name in m else None for m in metas]
            lookup: dict[str, int] = {}
            per_value = np.array(
                [-2 if v is None else lookup.setdefault(v, len(lookup)) for v in values] + [-2], np.int32
            )
            self._fields[name] = (per_value[idx], lookup)  # idx -1 (a null cell) picks the trailing -2
        return self._fields[name]

    # -- search --------------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        top: int = 20,
        where: dict[str, str] | list[str] | None = None,
        weights: dict[str, float] | None = None,
    ) -> list[Hit]:
        """The best `top` moments for `query`. `weights` overrides signal weights by name (lexical, semantic,
        clip, or added signals); a weight of 0 leaves that signal out (ablations)."""
        cfg = self.cfg
        text = normalise_query(query, cfg.max_query_chars)
        if top < 1:
            raise SearchError("top must be at least 1")
        mask = self.filter_mask(where)
        w = {"lexical": cfg.lexical_weight, "semantic": cfg.semantic_weight}
        w |= {name: weight for name, (_, weight) in self.signals.items()}
        w |= weights or {}
        k = max(cfg.candidates, top)
        ranked: dict[str, list[tuple[int, float]]] = {}
        lexical_hits = None
        if w.get("lexical", 0) > 0 and self.lexical is not None:
            # FTS5 runs on a thread while the query is embedded (both release the GIL)
            limit = k if mask is None else k * 20
            lexical_hits = _lexical_pool().submit(self.lexical.search, text, limit)
        if w.get("semantic", 0) > 0 and self.n:
            q = self.query_vectors([text])[0]
            if self.text_ann is not None:
                rows, scores = self.text_ann.search(q, k, self.cfg.ann_nprobe, mask)
                ranked["semantic"] = list(zip(rows.tolist(), scores.tolist(), strict=True))
            else:
                scores = self.text_vectors @ q
                scores[~self.has_text] = -np.inf
                ranked["semantic"] = _top(scores, k, mask)
        if lexical_hits is not None:
            hits = self._lexical_rows(lexical_hits.result())
            ranked["lexical"] = [(r, s) for r, s in hits if mask is None or mask[r]][:k]
            share = self._coverage(text, [r for r, _ in ranked["lexical"]])
        for name, (fn, _) in self.signals.items():
            if w.get(name, 0) > 0 and self.n:
                scores = fn(text)
                if scores is not None:
                    ranked[name] = _top(np.asarray(scores, np.float32), k, mask)
        fused: dict[int, float] = {}
        detail: dict[int, dict[str, dict[str, float]]] = {}
        for name, rows in ranked.items():
            for rank, (r, s) in enumerate(rows, 1):
                d = {"rank": rank, "score": round(float(s), 4)}
                weight = w[name]
                if name == "lexical":
                    d["coverage"] = round(share[r], 3)
                    weight *= share[r] ** 2
                fused[r] = fused.get(r, 0.0) + weight / (cfg.rrf_k + rank)
                detail.setdefault(r, {})[name] = d
        best = sorted(fused, key=lambda r: (-fused[r], r))[:top]
        qwords = lexical.words(text)
        return [self._hit(r, fused[r], detail[r], qwords) for r in best]

    def _coverage(self, text: str, rows: list[int]) -> dict[int, float]:
        """The fraction of the query's searched words (stemmed) each row's transcript holds; a row FTS matched
        holds at least one (FTS5's Porter stemmer matches more forms than `_stem`)."""
        terms = {_stem(t) for t in lexical.query_terms(text)}
        if not rows or not terms:
            return dict.fromkeys(rows, 1.0)
        # row by row: `take` on the 1M-row chunked column cost 88 ms a query, 100 lookups ~2 ms
        out = {}
        for r in rows:
            held = len(terms & {_stem(w) for w in set(lexical.words(self.value("transcript", r) or ""))})
            out[r] = max(held, 1) / len(terms)
        return out

    def column(self, name: str) -> list:
        """One loaded column as Python values (filters; built once per call, so kept out of the hot path)."""
        return self.table.column(name).to_pylist() if self.table is not None else []

    def value(self, name: str, row: int) -> Any:
        return self.table.column(name)[row].as_py()

    def _hit(self, r: int, score: float, signals: dict, qwords: list[str]) -> Hit:
        c = {name: {r: self.value(name, r)} for name in LOAD_COLUMNS}
        snip, marks = snippet(c["transcript"][r] or "", qwords)
        part = int(np.searchsorted(self.part_starts, r, side="right") - 1)
        matched = [n for n, s in signals.items() if n != "semantic" or s["score"] >= SEMANTIC_MATCH]
        if "lexical" in signals and not marks:
            matched.remove("lexical")
        return Hit(
            sample_id=c["sample_id"][r],
            segment_index=int(c["segment_index"][r]),
            source=c["source"][r],
            t0=float(c["t0"][r]),
            t1=c["t1"][r],
            snippet=snip,
            marks=marks,
            score=round(score, 6),
            signals=signals,
            matched=matched,
            modality=c["modality"][r],
            tags=list(c["tags"][r] or []),
            meta=self._meta[r] if self._meta is not None else _meta_dict(c["meta"][r]),
            row=r,
            thumbnail={"part": self.manifest["parts"][part]["path"], "row": r - int(self.part_starts[part])}
            if c["modality"][r] == "video"
            else None,
        )

    def query_vectors(self, queries: list[str]) -> np.ndarray:
        """Transcript-model embeddings of (normalised) queries, embedded in one batch and remembered."""
        from streamtune.search.embed import text_embedder

        todo = list(dict.fromkeys(q for q in queries if q not in self._query_cache))
        if todo:
            vecs = text_embedder(self.manifest["text_model"], self.cfg.text_batch).embed(todo)
            if len(self._query_cache) + len(todo) > 4096:
                self._query_cache.clear()
            self._query_cache.update(zip(todo, vecs, strict=True))
        return np.stack([self._query_cache[q] for q in queries])

    def prepare(self, queries: list[str]) -> None:
        """Embed many queries at once (faster than one by one) before searching them."""
        self.query_vectors([normalise_query(q, self.cfg.max_query_chars) for q in queries])

    def thumbnail(self, hit: Hit | int) -> bytes | None:
        """The JPEG thumbnail of a hit (or row), None when the index holds none."""
        r = hit.row if isinstance(hit, Hit) else int(hit)
        part = int(np.searchsorted(self.part_starts, r, side="right") - 1)
        path = self.manifest["parts"][part]["path"]
        if path not in self._thumbs:
            t = _read_part(storage.join(self.url, path), self.storage_options, ["thumbnail"])
            self._thumbs[path] = t.column("thumbnail").to_pylist()
        return self._thumbs[path][r - int(self.part_starts[part])]


SEMANTIC_MATCH = 0.3  # cosine above which MiniLM pairs are on the same topic (unrelated text: ~0.0-0.2)


def timecode(seconds: float | None) -> str:
    """`H:MM:SS.s` for a time in seconds ('' for None)."""
    if seconds is None:
        return ""
    tenths = int(round(float(seconds) * 10))
    h, rest = divmod(tenths, 36000)
    m, rest = divmod(rest, 600)
    return f"{h}:{m:02d}:{rest // 10:02d}.{rest % 10}"


def _meta_dict(raw: str | None) -> dict:
    try:
        d = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        d = {}
    return d if isinstance(d, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


_pool: ThreadPoolExecutor | None = None


def _lexical_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(2, thread_name_prefix="fts5")
    return _pool


def _top(scores: np.ndarray, k: int, mask: np.ndarray | None) -> list[tuple[int, float]]:
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    k = min(k, len(scores))
    idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return [(int(i), float(scores[i])) for i in idx if np.isfinite(scores[i])]


def parse_where(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise SearchError(f"filter {item!r} is not FIELD=VALUE")
    return name.strip(), value.strip()


def open_index(url: str, cfg: IndexConfig | None = None, storage_options: dict | None = None) -> Index:
    """Open the committed index at `url` (any fsspec URL)."""
    manifest = read_manifest(url.rstrip("/"), storage_options)
    if manifest is None:
        raise SearchError(f"no search index at {url} (missing {storage.join(url, 'index.json')})")
    return Index(url.rstrip("/"), manifest, cfg or IndexConfig(), storage_options)


def sample_queries(index: Index, n: int = 3) -> list[str]:
    """A few queries from the index's own transcripts (the longest words of evenly spaced rows)."""
    if not index.n:
        return []
    out = []
    for r in np.linspace(0, index.n - 1, num=min(n * 3, index.n)).astype(int):
        text = index.value("transcript", int(r)) or ""
        words = sorted(
            {w for w in lexical.words(text) if w not in lexical.STOPWORDS}, key=lambda w: (-len(w), w)
        )
        if len(words) >= 2:
            out.append(" ".join(words[:2]))
        if len(out) == n:
            break
    return list(dict.fromkeys(out))


def top_hits(index: Index, queries: list[str], top: int = 3) -> list[dict]:
    """[{query, hits: [{source, t0, t1, snippet_marked, score, matched}]}] for reports."""
    keep = ("source", "t0", "t1", "snippet_marked", "score", "matched")
    out = []
    for q in queries:
        try:
            hits = [{k: h.to_dict()[k] for k in keep} for h in index.search(q, top=top)]
        except SearchError as e:
            hits = [{"error": str(e)}]
        out.append({"query": q, "hits": hits})
    return out
