"""Search index: build rate, bytes per segment, query latency at 10k and 1M segments, peak RSS.

    python -m bench.search [--quick] [--build 1000] [--small 10000] [--large 1000000]
    python -m bench.search --child large 1000000 ROOT   # one size; a ROOT that holds its index is reused

Everything is on local disk under a temporary folder (deleted at the end). Each size runs in a fresh process
so its peak RSS is its own. Measured:

- build: `--build` video segments (transcripts of ~25 words, 3 CLIP frames of 512 floats, a 4 KB thumbnail)
  through `build_index` with the real MiniLM model: segments/s and index bytes per segment (float16);
- small / large: synthetic feature sets (Zipf-distributed words; the large one text-only) indexed with random
  unit vectors standing in for MiniLM (the index is the same shape; only the embedding model is skipped), at
  float16 and (small) float32: bytes per segment, build seconds, open seconds; then 60 queries of 2-4 words
  through `Index.search` (FTS5 BM25 + the real MiniLM query embedding + brute-force cosine over every
  segment + fusion) and 10 with a sidecar filter: p50/p95 ms. Baselines in the same process: the MiniLM
  query embedding alone, the float32 matmul alone over all vectors and the FTS5 query alone (the parts of a
  query's time).

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

TARGET_P95_MS = 200.0


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def vocabulary(n: int = 6000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables, size=int(rng.integers(2, 4)))))
    return sorted(words)


def transcripts(n: int, vocab: list[str], words: int = 25, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    ids = rng.choice(len(vocab), size=(n, words), p=p / p.sum())
    arr = np.asarray(vocab, dtype=object)
    return [" ".join(row) for row in arr[ids]]


class ClusteredEmbedder:
    """Unit vectors around `topics` random centres (cosine ~0.64 to its centre, ~0.4 within a topic, ~0
    across) in place of MiniLM: the index has the same shape and the neighbourhood structure an ANN index
    relies on (uniform random vectors have none), without the model's cost. `queries(n)` draws fresh
    vectors from the same topics (in no index) to measure ANN recall against the exact scan."""

    dim = 384

    def __init__(self, topics: int = 20_000, noise: float = 1.2, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        c = self.rng.standard_normal((topics, self.dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.noise = noise

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._draw(len(texts), self.rng)

    def queries(self, n: int, seed: int = 99) -> np.ndarray:
        return self._draw(n, np.random.default_rng(seed))

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        g = rng.standard_normal((n, self.dim)).astype(np.float32) * (self.noise / np.sqrt(self.dim))
        v = self.centres[rng.integers(0, len(self.centres), n)] + g
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_features(url: str, n: int, frames: bool, seed: int = 0, rows_per_shard: int = 100_000) -> None:
    import pyarrow as pa

    from streamtune.decode.features import features_schema
    from streamtune.shards.writer import ShardSetWriter

    clip_dim = 512
    schema = features_schema(clip_dim)
    extra = [("segment_index", pa.int32()), ("t0", pa.float64()), ("t1", pa.float64()),
             ("frame_times", pa.list_(pa.float32())), ("frame_embeddings", pa.list_(pa.list_(pa.float32(), clip_dim))),
             ("thumbnails", pa.list_(pa.binary()))]  # fmt: skip
    schema = pa.schema(list(schema) + [pa.field(k, t) for k, t in extra if k not in schema.names])
    vocab = vocabulary()
    texts = transcripts(n, vocab, seed=seed + 1)
    rng = np.random.default_rng(seed)
    speakers = ["ana", "ben", "chloe", "dev"]
    w = ShardSetWriter(url, schema, max_shard_rows=rows_per_shard, max_shard_bytes=1 << 40)
    for start in range(0, n, rows_per_shard):
        stop = min(n, start + rows_per_shard)
        m = stop - start
        cols = {name: pa.nulls(m, schema.field(name).type) for name in schema.names}
        video = [f"footage/v{(start + i) // 8:07d}" for i in range(m)]
        seg = np.arange(start, stop) % 8
        cols["sample_id"] = pa.array(video)
        cols["sources"] = pa.array([[v + ".mp4"] for v in video], pa.list_(pa.string()))
        cols["meta"] = pa.array([json.dumps({"speaker": speakers[(start + i) % 4]}) for i in range(m)])
        cols["transcript"] = pa.array(texts[start:stop])
        cols["segment_index"] = pa.array(seg.astype(np.int32))
        cols["t0"] = pa.array(seg * 10.0)
        cols["t1"] = pa.array(seg * 10.0 + 9.5)
        if frames:
            f = rng.standard_normal((m * 3, clip_dim)).astype(np.float32)
            f /= np.linalg.norm(f, axis=1, keepdims=True)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), clip_dim)
            offsets = pa.array(np.arange(0, m * 3 + 1, 3, dtype=np.int32))
            cols["frame_embeddings"] = pa.ListArray.from_arrays(offsets, inner)
            mean = f.reshape(m, 3, clip_dim).mean(1)
            mean /= np.linalg.norm(mean, axis=1, keepdims=True)
            cols["clip_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(mean.reshape(-1)), clip_dim)
            cols["frame_times"] = pa.array(
                [[t, t + 4, t + 8] for t in (seg * 10.0).tolist()], pa.list_(pa.float32())
            )
            thumb = [rng.bytes(4096) for _ in range(3)]
            cols["thumbnails"] = pa.array([thumb] * m, pa.list_(pa.binary()))
        w.write(pa.table(cols, schema=schema))
    w.close(extra={"kind": "features"})


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "max_ms": round(float(max(ms)), 2)}  # fmt: skip


def run_build(root: str, n: int) -> dict:
    """Real MiniLM: build segments/s and bytes per segment."""
    from streamtune.config import IndexConfig
    from streamtune.search import build_index
    from streamtune.search.embed import text_embedder

    feats = os.path.join(root, "features")
    write_features(feats, n, frames=True, rows_per_shard=max(1, n // 4))
    text_embedder(IndexConfig().text_model)  # model load is not build time
    t0 = time.perf_counter()
    m = build_index(feats, os.path.join(root, "index"), IndexConfig())
    seconds = time.perf_counter() - t0
    return {"segments": n, "seconds": round(seconds, 2), "segments_per_s": round(n / seconds, 1),
            "embed_seconds": round(m["stats"]["embed_seconds"], 2),
            "bytes_per_segment": round(dir_bytes(os.path.join(root, "index")) / n, 1),
            "features_bytes_per_segment": round(dir_bytes(feats) / n, 1)}  # fmt: skip


def run_size(root: str, n: int, frames: bool, dtypes: list[str]) -> dict:
    from streamtune.config import IndexConfig
    from streamtune.search import ann, build_index, open_index
    from streamtune.search.index import read_manifest

    feats = os.path.join(root, "features")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(feats, "index.json")):  # a ROOT kept from an earlier run is reused
        write_features(feats, n, frames=frames)
    out: dict = {"segments": n, "frames": frames, "features_seconds": round(time.perf_counter() - t0, 1)}
    for dtype in dtypes:
        idx = os.path.join(root, f"index-{dtype}")
        m = read_manifest(idx)
        if m and m["rows"] == n:  # built by an earlier run of this ROOT: its own build figures
            seconds = m["stats"]["seconds"]
            out[dtype] = {"build_seconds": round(seconds, 1), "build_segments_per_s": round(n / seconds, 1),
                          "ann_build_seconds": m["stats"].get("ann_seconds"), "ann": bool(m.get("ann")),
                          "bytes_per_segment": round(dir_bytes(idx) / n, 1), "reused_build": True}  # fmt: skip
            continue
        t0 = time.perf_counter()
        emb = ClusteredEmbedder(topics=max(100, n // 50))  # ~50 segments a topic at every size
        m = build_index(feats, idx, IndexConfig(vector_dtype=dtype), embedder=emb)
        seconds = time.perf_counter() - t0
        out[dtype] = {"build_seconds": round(seconds, 1), "build_segments_per_s": round(n / seconds, 1),
                      "ann_build_seconds": m["stats"]["ann_seconds"], "ann": bool(m.get("ann")),
                      "bytes_per_segment": round(dir_bytes(idx) / n, 1)}  # fmt: skip
    idx_url = os.path.join(root, f"index-{dtypes[0]}")
    vocab = vocabulary()
    rng = np.random.default_rng(5)
    queries = [" ".join(rng.choice(vocab[50:3000], size=int(rng.integers(2, 5)))) for _ in range(70)]
    t0 = time.perf_counter()
    index = open_index(idx_url)
    out["open_seconds"] = round(time.perf_counter() - t0, 2)
    index.search("warm up the model", top=20)
    latencies, filtered = [], []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        hits = index.search(q, top=20, where=["speaker=ben"] if i >= 60 else None)
        (filtered if i >= 60 else latencies).append((time.perf_counter() - t0) * 1000)
        assert len(hits) == 20
    out["query"] = percentiles(latencies)
    out["query_filtered"] = percentiles(filtered)
    cached = []  # the same queries again: their MiniLM vectors are remembered, the rest of a search runs
    for q in queries[:60]:
        t0 = time.perf_counter()
        index.search(q, top=20)
        cached.append((time.perf_counter() - t0) * 1000)
    out["query_without_model"] = percentiles(cached)
    vectors = index.text_ann.vectors if index.text_ann is not None else index.text_vectors
    exact_ms, ann_ms, found = [], [], 0
    # float32 like a real query: a float64 vector would turn the product into a 3 GB float64 copy at 1M
    probes = ClusteredEmbedder(topics=max(100, n // 50)).queries(50).astype(np.float32)
    for q in probes:
        t0 = time.perf_counter()
        scores = vectors @ q
        exact = np.argpartition(-scores, 9)[:10]
        exact_ms.append((time.perf_counter() - t0) * 1000)
        if index.text_ann is not None:
            exact_rows = set(index.text_ann.owners[exact].tolist())
            t0 = time.perf_counter()
            rows, _ = index.text_ann.search(q, 10, index.cfg.ann_nprobe)
            ann_ms.append((time.perf_counter() - t0) * 1000)
            found += len(exact_rows & set(rows.tolist()))
    out["baseline_exact_scan"] = percentiles(exact_ms)  # every float32 vector scored: the search without ANN
    if ann_ms:
        lists = len(index.text_ann.centroids)
        out["ann"] = {"lists": lists, "nprobe": ann.default_nprobe(lists, index.cfg.ann_nprobe),
                      "recall_at_10": round(found / (10 * len(probes)), 4), **percentiles(ann_ms),
                      "memory_mb": round(index.text_ann.nbytes / 2**20, 1)}  # fmt: skip
    fts = []
    for qq in queries[:60]:
        t0 = time.perf_counter()
        index.lexical.search(qq, 100)
        fts.append((time.perf_counter() - t0) * 1000)
    embed = []
    for i, qq in enumerate(queries[:20]):
        t0 = time.perf_counter()
        index.query_vectors([f"{qq} {i}"])  # not seen before: the model runs
        embed.append((time.perf_counter() - t0) * 1000)
    out["baseline_query_embedding"] = percentiles(embed)
    out["baseline_fts5"] = percentiles(fts)
    out["ratio_p95_to_target"] = round(out["query"]["p95_ms"] / TARGET_P95_MS, 3)
    index.close()
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def child(kind: str, n: int, root: str) -> dict:
    if kind == "build":
        result = run_build(root, n)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return result
    if kind == "small":
        return run_size(root, n, frames=True, dtypes=["float16", "float32"])
    return run_size(root, n, frames=False, dtypes=["float16"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 / 2,000 / 50,000 segments.")
    ap.add_argument("--build", type=int, default=1000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, n, root = args.child
        print(json.dumps(child(kind, int(n), root)))
        return
    if args.quick:
        args.build, args.small, args.large = 200, 2000, 50_000
    result: dict = {"bench": "search", "cores": os.cpu_count(), "target_p95_ms": TARGET_P95_MS}
    tmp = tempfile.mkdtemp(prefix="bench-search-")
    try:
        for kind, n in (("build", args.build), ("small", args.small), ("large", args.large)):
            root = os.path.join(tmp, kind)
            os.makedirs(root)
            log(f"{kind}: {n} segments")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "bench.search", "--child", kind, str(n), root],
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode:
                log(proc.stderr[-4000:])
                raise SystemExit(f"{kind} failed")
            result[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"  {time.perf_counter() - t0:.0f} s: {json.dumps(result[kind])}")
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
