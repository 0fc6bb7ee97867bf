import json
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from streamtune import CloudStreamingDataset
from streamtune.shards import RAW_SCHEMA, ShardError, ShardSetWriter
from streamtune.testing.faultproxy import start_fault_proxy
from tests.test_stream import make_rows


@pytest.fixture(scope="module")
def faultset(s3server):
    bucket = s3server.create_bucket(f"faults-{uuid.uuid4().hex[:10]}")
    prefix = f"{bucket}/shards"
    writer = ShardSetWriter(
        prefix, RAW_SCHEMA, s3server.storage_options, max_shard_bytes=400_000, batch_bytes=50_000
    )
    writer.write(make_rows(600, seed=5, media=(500, 4000)))
    writer.close()
    return prefix


def multiset(ds):
    return Counter((s["sample_id"], hash(s["audio"]), hash(s["image"])) for s in ds)


@pytest.mark.parametrize(
    "faults",
    [
        {"slowdown": 0.25},
        {"reset": 0.25},
        {"truncate": 0.25},
        {"short": 0.3},
        {"slowdown": 0.1, "reset": 0.1, "truncate": 0.1, "short": 0.1, "latency_s": 0.01},
    ],
    ids=["503", "reset", "truncate", "short", "mixed"],
)
def test_faults_do_not_change_the_samples(s3server, faultset, faults):
    opts = s3server.storage_options
    kw = dict(shuffle=True, seed=2, range_bytes=100_000, backoff_s=0.002, retries=12)
    expected = multiset(CloudStreamingDataset(faultset, opts, **kw))
    with start_fault_proxy(s3server.endpoint_url, seed=1, **faults) as proxy:
        ds = CloudStreamingDataset(faultset, proxy.storage_options(opts), **kw)
        got = multiset(ds)
        injected = proxy.counts.as_dict()
    assert got == expected
    assert sum(v for k, v in injected.items() if k != "requests") > 0
    stats = ds.stats
    assert stats["retries"] + stats["refetched_bytes"] > 0
    if faults.get("short"):
        assert stats["refetched_bytes"] > 0  # only the missing half was fetched again


def test_retry_budget_gives_a_clear_error(s3server, faultset):
    opts = s3server.storage_options
    with start_fault_proxy(s3server.endpoint_url, slowdown=1.0, methods=("GET", "HEAD")) as proxy:
        with pytest.raises(ShardError, match="gave up after 3 attempts"):
            CloudStreamingDataset(faultset, proxy.storage_options(opts), retries=2, backoff_s=0.001)


def test_latency_is_hidden_by_parallel_fetches(s3server, faultset):
    opts = s3server.storage_options
    kw = dict(range_bytes=50_000, prefetch_bytes=2 << 20, max_concurrency=16)
    with start_fault_proxy(s3server.endpoint_url, latency_s=0.1) as proxy:
        ds = CloudStreamingDataset(faultset, proxy.storage_options(opts), **kw)
        n = sum(1 for _ in ds)
    stats = ds.stats
    serial_s = 0.1 * stats["requests"]
    assert n == 600
    assert stats["wait_s"] < serial_s / 3, stats


MEMORY_SCRIPT = """
import json, sys
from streamtune import CloudStreamingDataset

def rss(field):  # VmHWM is this process's own peak (ru_maxrss would include the parent's, across fork)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) << 10

url, prefetch = sys.argv[1], int(sys.argv[2])
ds = CloudStreamingDataset(url, shuffle=True, prefetch_bytes=prefetch, range_bytes=2 << 20, max_concurrency=8)
before = rss("VmRSS")
n = nbytes = 0
for s in ds:
    n += 1
    nbytes += len(s["audio"] or b"") + len(s["image"] or b"")
peak = rss("VmHWM")
print(json.dumps({"n": n, "nbytes": nbytes, "growth": peak - before, "stats": ds.stats}))
"""


def test_memory_stays_within_prefetch_budget(s3server):
    prefetch = 16 << 20
    bucket = s3server.create_bucket(f"mem-{uuid.uuid4().hex[:10]}")
    prefix = f"{bucket}/big"
    writer = ShardSetWriter(
        prefix, RAW_SCHEMA, s3server.storage_options, max_shard_bytes=8 << 20, batch_bytes=1 << 20
    )
    rows = 0
    blob = bytes(range(256)) * 1024  # 256 KiB per media value
    for _ in range(24):  # ~ 12 x 16 MiB = 192 MiB of media
        batch = [
            {
                "sample_id": f"m{rows + i}",
                "audio": blob,
                "image": blob[: 131072 + i],
                "text": "t",
                "meta": "{}",
                "sources": [],
            }
            for i in range(20)
        ]
        rows += len(batch)
        writer.write(batch)
    index = writer.close()
    assert index["bytes"] >= 10 * prefetch
    env = {**__import__("os").environ, **s3server.env()}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, prefix, str(prefetch)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == rows
    assert result["stats"]["peak_prefetch_bytes"] <= prefetch
    # The constant covers per-thread malloc arenas and HTTP client buffers of 8 fetch threads.
    assert result["growth"] <= prefetch + (48 << 20), result
