"""Record files: JSONL -> shards, Parquet streamed in place vs converted vs Hugging Face `datasets`, and the
memory of sharding a JSONL file larger than the memory budget.

    python -m bench.records [--quick] [--records 200000] [--big-gb 2.0]

Everything is on local disk under a temporary folder (deleted at the end): per-record work is CPU-bound
Python, and local files keep storage out of the comparison. Each measurement runs in a fresh process so
its peak RSS is its own. Measured:

- jsonl_to_shards: manifest (scan: offsets, line numbers, digests) + shard (ranged reads, parse, raw rows,
  Arrow IPC shards) of `--records` chat records in mlx-lm's `messages` format, records/s end to end;
- parquet_in_place: CloudStreamingDataset over the Parquet file itself (row groups as ranges), shuffle on,
  every row as a dict; parquet_converted: the same records after manifest + shard (conversion records/s)
  and streamed from the shards; hf: `datasets.load_dataset("parquet", streaming=True)` over the same file,
  every row as a dict. ratio_hf = in place / hf;
- big: a >= `--big-gb` GB JSONL (generated, then deleted) through manifest + shard: peak RSS and records/s.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def chat(i: int, rng: random.Random, words: int) -> dict:
    text = lambda n: " ".join(rng.choice(VOCAB) for _ in range(n))  # noqa: E731
    return {
        "messages": [
            {"role": "system", "content": "You answer questions about the records."},
            {"role": "user", "content": f"Question {i}: {text(words)}?"},
            {"role": "assistant", "content": text(words * 2)},
        ]
    }


VOCAB = "alpha beta gamma delta river stone cloud paper engine window garden silver orange music".split()


def write_jsonl(path: str, n: int | None = None, min_bytes: int = 0, words: int = 40) -> int:
    """Chat records, one per line; `n` records, or until the file holds `min_bytes`. Returns records."""
    rng = random.Random(0)
    count = size = 0
    with open(path, "w") as f:
        while (n is not None and count < n) or (n is None and size < min_bytes):
            line = json.dumps(chat(count, rng, words)) + "\n"
            f.write(line)
            size += len(line)
            count += 1
    return count


def write_parquet(path: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    rows = [
        {
            "id": i,
            "prompt": " ".join(rng.choice(VOCAB) for _ in range(30)),
            "completion": " ".join(rng.choice(VOCAB) for _ in range(60)),
        }
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10_000, compression="zstd")


# --- measurements, each in its own process ----------------------------------------------------------


def shard(source: str, out: str) -> dict:
    from streamtune.ingest import commit_raw_shards, plan_shards, write_raw_shard
    from streamtune.manifest import build_manifest, summarize_manifest

    t0 = time.perf_counter()
    table, problems = build_manifest(source)
    t1 = time.perf_counter()
    plans = plan_shards(table)
    results = [write_raw_shard(source, table, p, out) for p in plans]
    index = commit_raw_shards(out, results, append=False, problems=problems)
    t2 = time.perf_counter()
    records = summarize_manifest(table)["records"]
    return {
        "records": records,
        "shards": len(index["shards"]),
        "manifest_s": round(t1 - t0, 2),
        "shard_s": round(t2 - t1, 2),
        "records_s": round(records / (t2 - t0)),
        "quarantined": len(problems) + sum(len(r["quarantine"]) for r in results),
    }


def stream(url: str) -> dict:
    from streamtune import CloudStreamingDataset

    ds = CloudStreamingDataset(url, shuffle=True, seed=0)
    n = 0
    t0 = time.perf_counter()
    for _ in ds:
        n += 1
    elapsed = time.perf_counter() - t0
    return {"records": n, "seconds": round(elapsed, 2), "records_s": round(n / elapsed)}


def hf(path: str) -> dict:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={"train": [path]}, split="train", streaming=True)
    n = 0
    t0 = time.perf_counter()
    for _ in ds:
        n += 1
    elapsed = time.perf_counter() - t0
    return {"records": n, "seconds": round(elapsed, 2), "records_s": round(n / elapsed)}


def child(what: str, *args: str) -> dict:
    """Run `what` in a fresh interpreter; its result plus its own peak RSS."""
    code = (
        "import json, resource, sys, streamtune; from bench.records import " + what + " as f; "
        "r = f(*sys.argv[1:]); r['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); "
        "print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="20k records, a 0.2 GB big file")
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--big-gb", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one under /tmp)")
    a = p.parse_args()
    n, big = (20_000, 0.2) if a.quick else (a.records, a.big_gb)
    root = tempfile.mkdtemp(prefix="bench-records-", dir=a.dir)
    result: dict = {"records": n}
    try:
        src = os.path.join(root, "src")
        os.makedirs(os.path.join(src, "jsonl"))
        write_jsonl(os.path.join(src, "jsonl", "train.jsonl"), n)
        result["jsonl_to_shards"] = child("shard", os.path.join(src, "jsonl"), os.path.join(root, "s1"))
        log("jsonl -> shards", result["jsonl_to_shards"])

        os.makedirs(os.path.join(src, "pq"))
        pq_path = os.path.join(src, "pq", "train.parquet")
        write_parquet(pq_path, n)
        in_place = child("stream", pq_path)
        convert = child("shard", os.path.join(src, "pq"), os.path.join(root, "s2"))
        converted = child("stream", os.path.join(root, "s2"))
        hf_run = child("hf", pq_path)
        log("parquet in place", in_place, "converted", convert, converted, "hf", hf_run)
        result |= {
            "parquet_in_place": in_place,
            "parquet_convert": convert,
            "parquet_converted": converted,
            "hf_streaming": hf_run,
            "ratio_hf": round(in_place["records_s"] / hf_run["records_s"], 2),
            "ratio_converted_vs_in_place": round(converted["records_s"] / in_place["records_s"], 2),
        }
        shutil.rmtree(os.path.join(root, "s1"))
        shutil.rmtree(os.path.join(root, "s2"))

        os.makedirs(os.path.join(src, "big"))
        big_path = os.path.join(src, "big", "train.jsonl")
        t0 = time.perf_counter()
        count = write_jsonl(big_path, min_bytes=int(big * 1e9))
        size = os.path.getsize(big_path)
        log(f"wrote {size / 1e9:.2f} GB, {count} records in {time.perf_counter() - t0:.0f}s")
        run = child("shard", os.path.join(src, "big"), os.path.join(root, "s3"))
        result["big_jsonl"] = {"gb": round(size / 1e9, 2), **run}
        log("big", result["big_jsonl"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["peak_rss_mb_big"] = result.get("big_jsonl", {}).get("peak_rss_mb")
    print(json.dumps(result))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
