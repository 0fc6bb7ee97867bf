"""Approximate nearest neighbours for large indexes: an inverted file (IVF) over unit vectors.

A spherical k-means coarse quantizer (numpy) splits the vectors into `lists`; each vector is kept with the
list of its nearest centroid (the parts hold them as float16; memory holds float32, list by list). A query
scores the centroids, takes the `nprobe` best lists and scores only their vectors. Centroids live in one
Parquet file, the list of every vector in one small Parquet file per index part: an incremental build
assigns only new parts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PER_LIST = 256  # k-means training vectors per list
CHUNK = 32768  # vectors scored against the centroids at a time (bounds the (chunk, lists) float32 matrix)


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
        nprobe = max(1, min(nprobe, len(by_list)))
        while True:
            rows, scores = self._probe(q, by_list[:nprobe], mask)
            if len(rows) >= k or nprobe >= len(by_list):
                break
            nprobe *= 4
        if len(rows) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        order = np.lexsort((rows, -scores))
        return rows[order], scores[order]

    def _probe(
        self, q: np.ndarray, probe: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        # one BLAS product per list over its contiguous rows: no gather copy
        spans = [(int(self.offsets[p]), int(self.offsets[p + 1])) for p in probe]
        spans = [(a, b) for a, b in spans if b > a]
        if not spans:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = np.concatenate([self.vectors[a:b] @ q for a, b in spans])
        owners = np.concatenate([self.owners[a:b] for a, b in spans])
        if mask is not None:
            keep = mask[owners]
            owners, scores = owners[keep], scores[keep]
        # a row's best vector: sort by score, keep each owner's first
        order = np.argsort(-scores, kind="stable")
        owners, scores = owners[order], scores[order]
        _, first = np.unique(owners, return_index=True)
        return owners[first], scores[first]
