import itertools
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

from streamtune import CloudStreamingDataset
from streamtune.shards import RAW_SCHEMA, ShardError, ShardSetWriter, read_index
from streamtune.stream.plan import build_ranges, epoch_order, partition_bounds

N_ROWS = 997  # prime: never divisible by the world sizes


def make_rows(n, seed=0, media=(0, 3000)):
    rng = np.random.default_rng(seed)
    return [
        {
            "sample_id": f"s{i:05d}",
            "audio": rng.bytes(int(rng.integers(*media))),
            "image": None if i % 5 == 0 else rng.bytes(int(rng.integers(*media))),
            "text": f"text {i}",
            "meta": json.dumps({"i": i}),
            "sources": [f"s{i:05d}.wav"],
            "video": None,
            "refs": None,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def shardset(s3server, tmp_path_factory):
    bucket = s3server.create_bucket(f"stream-{uuid.uuid4().hex[:10]}")
    prefix = f"{bucket}/shards"
    writer = ShardSetWriter(
        prefix, RAW_SCHEMA, s3server.storage_options, max_shard_bytes=120_000, batch_bytes=20_000
    )
    writer.write(make_rows(N_ROWS))
    index = writer.close()
    assert len(index["shards"]) >= 10
    return prefix, s3server.storage_options, str(tmp_path_factory.mktemp("range-cache"))


def ids(samples):
    return [s["sample_id"] for s in samples]


def small(prefix, opts, **kw):
    """A dataset with ranges and budgets scaled to the small test set."""
    kw.setdefault("range_bytes", 40_000)
    kw.setdefault("prefetch_bytes", 400_000)
    kw.setdefault("shuffle_shards", 4)
    return CloudStreamingDataset(prefix, opts, **kw)


def run_epochs(ds, epochs):
    out = []
    while ds.epoch < epochs:
        out += ids(ds)
    return out


def test_sequential_rows_equal_written_rows(shardset):
    prefix, opts, cache = shardset
    ds = small(prefix, opts)
    assert len(ds) == N_ROWS
    assert list(ds) == make_rows(N_ROWS)
    stats = ds.stats
    assert stats["samples"] == N_ROWS and stats["requests"] > 0 and stats["bytes"] > 0
    assert stats["retries"] == 0 and stats["mb_s"] > 0


def test_shuffle_is_deterministic_and_mixes_shards(shardset):
    prefix, opts, cache = shardset
    a = ids(small(prefix, opts, shuffle=True, seed=7))
    assert sorted(a) == [f"s{i:05d}" for i in range(N_ROWS)]
    assert a == ids(small(prefix, opts, shuffle=True, seed=7))
    assert a != ids(small(prefix, opts, shuffle=True, seed=8))
    ds = small(prefix, opts, shuffle=True, seed=7)
    ds.set_epoch(1)
    assert ids(ds) != a
    # block shuffle: neighbours mostly come from different shards
    index = read_index(prefix, opts)
    shard_of = {}
    start = 0
    for k, e in enumerate(index["shards"]):
        for i in range(start, start + e["rows"]):
            shard_of[f"s{i:05d}"] = k
        start += e["rows"]
    same = sum(shard_of[x] == shard_of[y] for x, y in itertools.pairwise(a))
    assert same / (len(a) - 1) < 0.5


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_resume_anywhere_matches_uninterrupted(shardset, shuffle, world_size):
    prefix, opts, cache = shardset
    for rank in sorted({0, world_size - 1}):
        # The shared disk cache keeps the many re-reads cheap; fetching itself is covered elsewhere.
        kw = dict(shuffle=shuffle, seed=3, rank=rank, world_size=world_size, cache_dir=cache)
        full = run_epochs(small(prefix, opts, **kw), 2)
        n = len(small(prefix, opts, **kw))
        assert len(full) == 2 * n
        cuts = {0, 1, 17, n // 2, n - 1, n, n + 1, n + n // 3, 2 * n - 1, 2 * n}
        for cut in sorted(cuts):
            ds = small(prefix, opts, **kw)
            seen = []
            while len(seen) < cut:
                it = iter(ds)
                for sample in it:
                    seen.append(sample["sample_id"])
                    if len(seen) == cut:
                        break
                it.close()
            state = json.loads(json.dumps(ds.state_dict()))
            fresh = small(prefix, opts, **kw)
            fresh.load_state_dict(state)
            rest = run_epochs(fresh, 2)
            assert seen + rest == full, f"rank {rank}/{world_size} cut {cut}"


@pytest.mark.parametrize("shuffle", [False, True])
def test_partitions_are_disjoint_and_complete(shardset, shuffle):
    prefix, opts, cache = shardset
    everything = sorted(f"s{i:05d}" for i in range(N_ROWS))
    for world_size in range(1, 9):
        parts = [
            ids(small(prefix, opts, shuffle=shuffle, seed=1, rank=r, world_size=world_size))
            for r in range(world_size)
        ]
        assert sorted(itertools.chain(*parts)) == everything, world_size
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    workers = [
        ids(
            small(
                prefix,
                opts,
                shuffle=shuffle,
                rank=1,
                world_size=2,
                worker_id=w,
                num_workers=3,
                cache_dir=cache,
            )
        )
        for w in range(3)
    ]
    rank1 = ids(small(prefix, opts, shuffle=shuffle, rank=1, world_size=2, cache_dir=cache))
    assert sorted(itertools.chain(*workers)) == sorted(rank1)


def test_plan_partitions_many_shapes():
    """Order logic alone, over many shard layouts, sizes and partition counts."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        shards = []
        for _ in range(int(rng.integers(1, 12))):
            rows = [int(x) for x in rng.integers(1, 9, size=int(rng.integers(1, 6)))]
            offsets = np.cumsum([8] + [100] * len(rows))[:-1]
            shards.append(
                {
                    "rows": sum(rows),
                    "batches": [
                        {"offset": int(o), "length": 100, "rows": r}
                        for o, r in zip(offsets, rows, strict=True)
                    ],
                }
            )
        ranges = build_ranges(shards, range_bytes=int(rng.integers(100, 400)))
        total = ranges.total_rows
        for world in range(1, 9):
            for workers in (1, 3):
                got = []
                for r in range(world):
                    for w in range(workers):
                        order = epoch_order(
                            ranges,
                            seed=trial,
                            epoch=1,
                            shuffle=bool(trial % 2),
                            parts=[(r, world), (w, workers)],
                            shuffle_shards=3,
                            block_bytes=250,
                        )
                        lo, hi = partition_bounds(total, [(r, world), (w, workers)])
                        assert len(order) == hi - lo
                        got.append(order)
                assert sorted(np.concatenate(got).tolist()) == list(range(total))


def test_resume_in_a_fresh_process(shardset, s3server, tmp_path):
    prefix, opts, cache = shardset
    kw = dict(shuffle=True, seed=11, rank=1, world_size=3)
    full = ids(small(prefix, opts, **kw))
    ds = small(prefix, opts, **kw)
    seen = [s["sample_id"] for s in itertools.islice(ds, 123)]
    (tmp_path / "state.json").write_text(json.dumps(ds.state_dict()))
    script = f"""
import json, sys
from streamtune import CloudStreamingDataset
ds = CloudStreamingDataset({prefix!r}, {opts!r}, range_bytes=40_000, prefetch_bytes=400_000, shuffle_shards=4,
                           shuffle=True, seed=11, rank=1, world_size=3)
ds.load_state_dict(json.load(open(sys.argv[1])))
print(json.dumps([s["sample_id"] for s in ds]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state.json")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert seen + json.loads(out.stdout.strip().splitlines()[-1]) == full


def test_state_from_another_order_is_refused(shardset):
    prefix, opts, cache = shardset
    state = small(prefix, opts, shuffle=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        small(prefix, opts, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        small(prefix, opts, shuffle=True, seed=1, world_size=2).load_state_dict(state)


def test_columns_and_bad_urls(shardset, bucket, s3opts):
    prefix, opts, cache = shardset
    rows = list(small(prefix, opts, columns=["sample_id", "text"]))
    assert rows[5] == {"sample_id": "s00005", "text": "text 5"}
    with pytest.raises(ValueError, match="not in the shard set"):
        small(prefix, opts, columns=["nope"])
    with pytest.raises(ShardError, match="not found"):
        CloudStreamingDataset(f"{bucket}/missing", s3opts, retries=1)


def test_compressed_feature_shards_stream(bucket, s3opts):
    n = 300
    emb = np.random.default_rng(0).standard_normal((n, 16), dtype=np.float32)
    table = pa.table(
        {
            "sample_id": [f"f{i}" for i in range(n)],
            "transcript": ["words " * (i % 50) for i in range(n)],
            "clip_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 16),
            "tags": [["x"] * (i % 3) for i in range(n)],
        }
    )
    writer = ShardSetWriter(f"{bucket}/feat", table.schema, s3opts, max_shard_rows=70, batch_bytes=4_000)
    writer.write(table)
    index = writer.close()
    assert {e["compression"] for e in index["shards"]} == {"zstd"}
    rows = list(CloudStreamingDataset(f"{bucket}/feat", s3opts, shuffle=True, range_bytes=10_000))
    by_id = {r["sample_id"]: r for r in rows}
    assert len(by_id) == n
    for i in (0, 77, n - 1):
        r = by_id[f"f{i}"]
        assert r["transcript"] == "words " * (i % 50) and r["tags"] == ["x"] * (i % 3)
        np.testing.assert_array_equal(r["clip_embedding"], emb[i])


def test_checksum_mismatch_refetches_then_names_the_shard(bucket, s3opts):
    from streamtune import storage

    prefix = f"{bucket}/corrupt"
    writer = ShardSetWriter(prefix, RAW_SCHEMA, s3opts, max_shard_rows=100, batch_bytes=20_000)
    writer.write(make_rows(300))
    index = writer.close()
    victim = index["shards"][1]
    url = f"{prefix}/{victim['path']}"
    data = bytearray(storage.read_bytes(url, s3opts))
    data[victim["batches"][-1]["offset"] + 200] ^= 0x55
    storage.write_bytes(url, bytes(data), s3opts)
    ds = CloudStreamingDataset(prefix, s3opts, backoff_s=0.001, checksum_retries=2)
    with pytest.raises(ShardError, match=victim["path"]):
        list(ds)
    assert ds.stats["checksum_failures"] == 3  # first read + 2 refetches


def test_disk_cache_serves_second_pass_and_respects_limit(shardset, tmp_path):
    prefix, opts, cache = shardset
    ds = small(prefix, opts, cache_dir=str(tmp_path), cache_limit_bytes=10 << 20)
    first = ids(ds)
    requests = ds.stats["requests"]
    second = ids(ds)
    assert first == second
    assert ds.stats["requests"] == requests and ds.stats["cache_hits"] > 0
    limited = small(prefix, opts, cache_dir=str(tmp_path / "small"), cache_limit_bytes=300_000)
    assert sorted(ids(limited)) == sorted(first)
    size = sum(os.path.getsize(tmp_path / "small" / f) for f in os.listdir(tmp_path / "small"))
    assert 0 < size <= 300_000
    corrupt = sorted(os.listdir(tmp_path))[0]
    if corrupt.endswith(".range"):
        with open(tmp_path / corrupt, "r+b") as f:
            f.seek(100)
            f.write(b"\x00garbage\x00")
        assert ids(small(prefix, opts, cache_dir=str(tmp_path))) == first


def test_copy_keeps_position_and_zero_copy_rows(shardset):
    import copy

    prefix, opts, cache = shardset
    ds = small(prefix, opts, shuffle=True, seed=5)
    full = ids(small(prefix, opts, shuffle=True, seed=5))
    head = [s["sample_id"] for s in itertools.islice(ds, 40)]
    # the state a DataLoader worker receives: arguments and position (__getstate__), never data
    clone = copy.deepcopy(ds)
    assert head + ids(clone) == full
    views = list(small(prefix, opts, zero_copy=True, columns=["sample_id", "audio"]))
    expected = make_rows(N_ROWS)
    assert all(isinstance(v["audio"], memoryview) for v in views)
    assert [bytes(v["audio"]) for v in views] == [r["audio"] for r in expected]


def test_buffer_pool_never_reuses_a_buffer_that_a_row_still_views():
    import pyarrow as pa

    from streamtune.stream.buffers import BufferPool

    pool = BufferPool(64 << 20)
    view = pool.take(3 << 20)
    view[:5] = b"hello"
    row = memoryview(pa.py_buffer(view).slice(0, 5))  # what a zero-copy row is
    pool.give(view)
    other = pool.take(1 << 20)
    other[:5] = b"XXXXX"
    assert bytes(row) == b"hello" and pool.reused == 0
    del row
    pool.give(other)
    pool.take(2 << 20)
    assert pool.reused == 1  # the first buffer came back once its row was gone


def test_streaming_reuses_range_buffers(shardset):
    prefix, opts, _ = shardset
    ds = small(prefix, opts, shuffle=True)
    assert sorted(ids(ds)) == [f"s{i:05d}" for i in range(N_ROWS)]
    assert ds._buffers.reused > ds._buffers.allocated


def test_xxh64_indexes_still_read_and_unknown_checksum_algorithms_fail(bucket, s3opts):
    from streamtune import storage
    from streamtune.shards.format import checksum

    prefix = f"{bucket}/legacy-checksums"
    writer = ShardSetWriter(prefix, RAW_SCHEMA, s3opts, max_shard_rows=50, batch_bytes=20_000)
    writer.write(make_rows(120))
    index = writer.close()
    assert index["shards"][0]["checksum"].startswith("xxh3:")
    raw = json.loads(storage.read_bytes(f"{prefix}/index.json", s3opts))
    for shard in raw["shards"]:  # as written before the switch to xxh3
        data = storage.read_bytes(f"{prefix}/{shard['path']}", s3opts)
        shard["checksum"] = checksum(data, "xxh64")
        for b in shard["batches"]:
            b["checksum"] = checksum(data[b["offset"] : b["offset"] + b["length"]], "xxh64")
    storage.write_bytes(f"{prefix}/index.json", json.dumps(raw).encode(), s3opts)
    assert sorted(ids(CloudStreamingDataset(prefix, s3opts))) == [f"s{i:05d}" for i in range(120)]

    raw["shards"][0]["batches"][0]["checksum"] = "md5:0123"
    storage.write_bytes(f"{prefix}/index.json", json.dumps(raw).encode(), s3opts)
    with pytest.raises(ShardError, match="unknown checksum algorithm"):
        list(CloudStreamingDataset(prefix, s3opts))
