"""The IVF index of large search indexes: recall against the exact scan, filters, incremental builds on S3."""

from __future__ import annotations

import numpy as np
from test_search import corpus, write_features

from streamtune import storage
from streamtune.config import IndexConfig
from streamtune.search import ann, build_index, open_index
from streamtune.shards.index import read_index


def clustered(n: int, dim: int = 64, topics: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    v = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, dim)) * 0.8
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_recall_and_filters():
    data = clustered(20_050)
    data, queries = data[:20_000], data[20_000:]  # queries from the same topics, not in the index
    cent = ann.train(data, ann.n_lists(len(data)))
    ivf = ann.IVF(cent, data, ann.assign(data, cent), np.arange(len(data)))
    assert len(cent) == 141 and len(ivf) == len(data)
    hits = 0
    for q in queries:
        exact = np.argsort(-(data @ q))[:10]
        rows, scores = ivf.search(q, 10, nprobe=16)
        assert np.all(np.diff(scores) <= 0)
        hits += len(set(rows.tolist()) & set(exact.tolist()))
    assert hits / (10 * len(queries)) >= 0.95
    assert (
        ann.default_nprobe(1000) == 250
        and ann.default_nprobe(141) == 35
        and ann.default_nprobe(100) == 32
        and ann.default_nprobe(141, 8) == 8
    )
    rows, _ = ivf.search(queries[0], 10, nprobe=0)  # 0: the default share of the lists
    assert len(rows) == 10
    mask = np.zeros(len(data), bool)
    mask[::997] = True  # 21 rows: the probe must widen to find 10 of them
    rows, _ = ivf.search(queries[0], 10, nprobe=1, mask=mask)
    assert len(rows) == 10 and mask[rows].all()
    # several vectors per row (frames): a row scores as its best one
    owners = np.arange(len(data)) // 4
    ivf = ann.IVF(cent, data, ann.assign(data, cent), owners)
    rows, scores = ivf.search(queries[0], 5, nprobe=len(cent))
    best = np.full(owners[-1] + 1, -np.inf)
    np.maximum.at(best, owners, data @ queries[0])
    assert rows.tolist() == np.argsort(-best)[:5].tolist()
    assert np.allclose(scores, np.sort(best)[::-1][:5], atol=2e-3)  # float16 storage


def test_index_with_ivf_is_incremental_and_matches_exact(s3server):
    bucket = s3server.create_bucket("search-ann")
    opts = s3server.storage_options
    features, out = f"{bucket}/work/features", f"{bucket}/work/idx"
    rows, truth = corpus(seed=5, clips=12)
    write_features(features, rows, opts, rows_per_shard=8)
    cfg = IndexConfig(ann_min_rows=1, ann_lists=4, ann_nprobe=4)  # every list read: same as exact
    first = build_index(features, out, cfg, opts)
    assert set(first["ann"]) == {"text", "frames"} and len(first["ann"]["text"]["parts"]) == 6

    queries = [f"the {t['place']} {t['subject']}" for t in truth[::5]]
    with open_index(out, cfg, opts) as index, open_index(out, IndexConfig(ann_min_rows=0), opts) as exact:
        assert index.text_ann is not None and exact.text_ann is None
        for q in queries:
            a = [
                (h.row, h.signals["semantic"]["rank"])
                for h in index.search(q, top=20, weights={"lexical": 0})
            ]
            b = [
                (h.row, h.signals["semantic"]["rank"])
                for h in exact.search(q, top=20, weights={"lexical": 0})
            ]
            assert a == b
        assert all(h.meta["speaker"] == "ben" for h in index.search("budget", top=10, where=["speaker=ben"]))

    # one segment changed, the last clip removed: the centroids stay, only the changed shard's lists are assigned
    changed = [dict(r) for r in rows if r["sample_id"] != "interviews/clip011"]
    changed[1]["transcript"] = "the lighthouse keeper retired after forty years"
    for e in read_index(features, opts)["shards"]:
        fs, path = storage.get_fs(storage.join(features, e["path"]), opts)
        fs.rm_file(path)
    write_features(features, changed, opts, rows_per_shard=8)
    second = build_index(features, out, cfg, opts)
    for kind in ("text", "frames"):
        old, new = first["ann"][kind], second["ann"][kind]
        assert new["centroids"] == old["centroids"]
        kept = {k for k, v in new["parts"].items() if old["parts"].get(k) == v}
        assert len(kept) == 4 and len(new["parts"]) == 6  # shards 0 (changed) and 5 (shorter) are new
    fs, root = storage.get_fs(out, opts)
    stored = {f.removeprefix(root.rstrip("/") + "/") for f in fs.find(root)} - {"index.json"}
    listed = {p["path"] for p in second["parts"]} | {second["lexical"]["path"]}
    listed |= {v["path"] for e in second["ann"].values() for v in e["parts"].values()}
    listed |= {e["centroids"] for e in second["ann"].values()}
    assert stored == listed
    with open_index(out, cfg, opts) as index:
        hit = index.search("lighthouse keeper retired", top=1)[0]
        assert (hit.sample_id, hit.segment_index) == ("interviews/clip000", 1)
        assert not any(h.sample_id == "interviews/clip011" for h in index.search("the budget", top=100))
