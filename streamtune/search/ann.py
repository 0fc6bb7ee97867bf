"""Approximate nearest neighbours for large indexes: an inverted file (IVF) over unit vectors.

A spherical k-means coarse quantizer (numpy) splits the vectors into `lists`; each vector is kept with the
list of its nearest centroid (the parts hold them as float16; memory holds float32, list by list). A query
scores the centroids, takes the `nprobe` best lists and scores only their vectors. Centroids live in one
Parquet file, the list of every vector in one small Parquet file per index part: an incremental build
assigns only new parts.

Default nprobe: a quarter of the lists (at least 32). On bench/search.py's 1M clustered set (1,000 lists,
20,000 topics whose members lie at cosine ~0.4 from each other: a topic's neighbours spread over many
lists), 50 fresh queries, recall@10 against the exact scan for nprobe 32 / 64 / 128 / 192 / 256 / 320:
0.59 / 0.69 / 0.82 / 0.87 / 0.91 / 0.94. 256 lists are ~256k float32 rows (393 MB) read per query: 43 ms
as one BLAS thread, 26 ms on two; a list is too short for BLAS to split, so probes over more than 64k rows
are scored in two halves on two threads (IVF alone p50 63 ms with, 77-95 ms without, at load 2.5 on the
2 cores), and only the best k scores are selected (argpartition; a full sort of 256k scores was ~20 ms).
Float16 in memory would halve the bytes, but neither numpy nor torch has a fast float16/bfloat16 product on
this CPU (no AVX512-BF16/FP16: torch bf16 25 ms, f16 33-137 ms per 256k rows), so the vectors are float32:
1.5 GB at 1M x 384.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PER_LIST = 256  # k-means training vectors per list
CHUNK = 32768  # vectors scored against the centroids at a time (bounds the (chunk, lists) float32 matrix)
PROBE_FRACTION = 4  # nprobe 0 reads a quarter of the lists
MIN_PROBE = 32
SPLIT_ROWS = 65_536  # probes over more rows are scored on two threads (a list is too short for BLAS threads)
_pool: ThreadPoolExecutor | None = None


def default_nprobe(lists: int, nprobe: int = 0) -> int:
    """`nprobe` when set, else a quarter of the lists (at least 32): 256 of 1,000 at 1M rows."""
    return int(nprobe) if nprobe > 0 else max(MIN_PROBE, lists // PROBE_FRACTION)


def n_lists(rows: int, lists: int = 0) -> int:
    """`lists` when set, else about sqrt(rows) (1M -> 1,000: a probe of 32 lists reads ~3 % of the rows)."""
    return int(lists) if lists > 0 else max(16, int(round(math.sqrt(max(rows, 1)))))


def train(
    vectors: np.ndarray, lists: int, iters: int = 20, seed: int = 0, per_list: int = PER_LIST
) -> np.ndarray:
    """(lists, D) float32 unit centroids: spherical k-means on at most `per_list * lists` sampled vectors.
    64 per list and 12 rounds gave recall@10 0.79 at nprobe 32 (200k clustered vectors, 447 lists); 256 and
    20 gave 0.97 (bench/search.py): lists that cut across neighbourhoods cost more recall than training."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    take = (
        rng.choice(n, size=min(n, per_list * lists), replace=False) if n > per_list * lists else np.arange(n)
    )
    x = np.asarray(vectors[np.sort(take)], np.float32)
    x = x[np.linalg.norm(x, axis=1) > 0]
    lists = min(lists, len(x))
    cent = x[rng.choice(len(x), size=lists, replace=False)].copy()
    for _ in range(iters):
        a = assign(x, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, a, x)
        counts = np.bincount(a, minlength=lists)
        empty = np.flatnonzero(counts == 0)
        sums[empty] = x[rng.choice(len(x), size=len(empty), replace=False)]  # re-seed empty lists
        cent = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return cent.astype(np.float32)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) int32 list of each vector (its highest-cosine centroid)."""
    out = np.empty(len(vectors), np.int32)
    for s in range(0, len(vectors), CHUNK):
        out[s : s + CHUNK] = np.argmax(np.asarray(vectors[s : s + CHUNK], np.float32) @ centroids.T, axis=1)
    return out


def centroids_bytes(centroids: np.ndarray) -> bytes:
    dim = centroids.shape[1]
    arr = pa.FixedSizeListArray.from_arrays(pa.array(centroids.reshape(-1).astype(np.float32)), dim)
    buf = io.BytesIO()
    pq.write_table(pa.table({"centroid": arr}), buf, compression="zstd")
    return buf.getvalue()


def lists_bytes(lists: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"list": pa.array(lists.astype(np.int32))}), buf, compression="zstd")
    return buf.getvalue()


def read_centroids(table: pa.Table) -> np.ndarray:
    col = table.column("centroid").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32)


class IVF:
    """Vectors grouped by list. `owners[i]` is the index row of stored vector i (several frames may share a
    row: a row scores as its best vector)."""

    def __init__(self, centroids: np.ndarray, vectors: np.ndarray, lists: np.ndarray, owners: np.ndarray):
        self._fill(centroids, [np.asarray(lists)], [(vectors, owners)])

    @classmethod
    def from_parts(cls, centroids: np.ndarray, lists: list[np.ndarray], parts: Iterable) -> IVF:
        """Built part by part: `lists[i]` of part i, `parts` yields each part's (vectors, owners) in turn, so
        memory holds the sorted float32 matrix and one part (1M x 384: 1.5 GB, not three copies)."""
        ivf = cls.__new__(cls)
        ivf._fill(centroids, lists, parts)
        return ivf

    def _fill(self, centroids: np.ndarray, lists: list[np.ndarray], parts: Iterable) -> None:
        flat = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
        order = np.argsort(flat, kind="stable")
        pos = np.empty_like(order)
        pos[order] = np.arange(len(order))
        self.centroids = centroids
        # float32 in memory: converting float16 rows per query cost more than the products (measured: 32k
        # rows x 384, 97 ms to convert vs 13 ms to score on the loaded 2-core machine)
        self.vectors = np.empty((len(flat), centroids.shape[1]), np.float32)
        self.owners = np.empty(len(flat), np.int64)
        base = 0
        for (vecs, owners), part_lists in zip(parts, lists, strict=True):
            n = len(part_lists)
            if len(vecs) != n:
                raise ValueError(f"{len(vecs)} vectors but {n} list entries")
            self.vectors[pos[base : base + n]] = vecs
            self.owners[pos[base : base + n]] = owners
            base += n
        self.offsets = np.searchsorted(flat[order], np.arange(len(centroids) + 1)).astype(np.int64)
        # one vector per row (transcripts): the best k need no per-row reduction
        self.one_per_row = len(np.unique(self.owners)) == len(self.owners)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.owners.nbytes + self.centroids.nbytes

    def search(
        self, q: np.ndarray, k: int, nprobe: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of up to `k` best rows, best first. With `mask` (bool per row) only rows it allows;
        the probe widens (x4) until `k` of them are found or every list is read."""
        q = np.asarray(q, np.float32)
        by_list = np.argsort(-(self.centroids @ q))
        nprobe = max(1, min(default_nprobe(len(by_list), nprobe), len(by_list)))
        while True:
            rows, scores = self._probe(q, by_list[:nprobe], k, mask)
            if len(rows) >= k or nprobe >= len(by_list):
                break
            nprobe *= 4
        if len(rows) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        order = np.lexsort((rows, -scores))
        return rows[order], scores[order]

    def _probe(
        self, q: np.ndarray, probe: np.ndarray, k: int, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """At least the best `k` rows of the probed lists (all of them when fewer), unordered."""
        # one BLAS product per list over its contiguous rows: no gather copy
        spans = [(int(self.offsets[p]), int(self.offsets[p + 1])) for p in probe]
        spans = [(a, b) for a, b in spans if b > a]
        if not spans:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = np.empty(sum(b - a for a, b in spans), np.float32)
        owners = np.empty(len(scores), np.int64)
        starts = np.cumsum([0] + [b - a for a, b in spans])
        half = len(spans) // 2 if len(scores) > SPLIT_ROWS else 0
        later = (
            _threads().submit(self._score, q, spans[:half], starts[:half], scores, owners) if half else None
        )
        self._score(q, spans[half:], starts[half:], scores, owners)
        if later is not None:
            later.result()
        if mask is not None:
            keep = mask[owners]
            owners, scores = owners[keep], scores[keep]
        # only the best few need ordering (a full sort of 250k scores cost more than the products)
        m = k if self.one_per_row else 4 * k
        if len(scores) > m:
            top = np.argpartition(-scores, m - 1)[:m]
            if self.one_per_row:
                return owners[top], scores[top]
            sub_o, sub_s = owners[top], scores[top]
            if len(np.unique(sub_o)) >= k:
                owners, scores = sub_o, sub_s
        # a row's best vector: sort by score, keep each owner's first
        order = np.argsort(-scores, kind="stable")
        owners, scores = owners[order], scores[order]
        _, first = np.unique(owners, return_index=True)
        return owners[first], scores[first]

    def _score(self, q: np.ndarray, spans: list, starts: np.ndarray, scores: np.ndarray, owners: np.ndarray):
        for (a, b), at in zip(spans, starts.tolist(), strict=False):
            np.matmul(self.vectors[a:b], q, out=scores[at : at + b - a])
            owners[at : at + b - a] = self.owners[a:b]


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="ivf-probe")
    return _pool
