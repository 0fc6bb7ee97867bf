"""Loader throughput against its physical ceiling and against Hugging Face `datasets` streaming.

    python -m bench.loader [--quick]

Creates a raw shard set (>= 1 GB, or >= 200 MB with --quick) under a directory served by Debian's
nginx as a read-only S3 endpoint (path-style GetObject/HeadObject with Range; moto's Python server
reads the whole object for every ranged GET and would be the bottleneck), then measures, each in its own
process on the same server and bytes:

- ceiling: raw parallel ranged GETs with pyarrow's C++ S3 client, no decoding (best of 8 threads x 8 MiB
  and 16 threads x 16 MiB ranges);
- loader: CloudStreamingDataset (shuffle on) yielding every row as a dict;
- hf: `datasets.load_dataset("arrow", streaming=True)` over the same Arrow files through s3fs;
- latency: the loader through the project's fault proxy with 0 ms and with 50 ms added per request.

Ceiling and loader alternate `--repeats` times and the best run of each counts: on a shared machine the
other load only ever slows a run down. Each run makes two passes over the data and times the second
(steady state, as in training: for the loader the next epoch, a new shuffle); the first pass, which also
pays for connections, handles and first-touch memory, is reported as `*_cold_mb_s`. `ratio_ceiling` is best
loader over best ceiling; `ratio_ceiling_median` pairs each loader run with the ceiling runs of its own round,
which is steadier when the machine's speed drifts between rounds. The last stdout line is one JSON object with the numbers and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

BUCKET = "bench"
PREFIX = "shards"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- data and server ------------------------------------------------------------------------------


def make_shards(root: str, total_bytes: int, seed: int = 0) -> dict:
    """Raw shards of ~64 MiB with incompressible media (150-450 KB per sample), written straight to disk."""
    from streamtune.shards import RAW_SCHEMA, commit_index, encode_shard, shard_name

    out = os.path.join(root, BUCKET, PREFIX)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.bytes(8 << 20)  # media values are slices of one random pool: fast to build, incompressible
    entries, written, sample, i = [], 0, 0, 0
    while written < total_bytes:
        rows, size = [], 0
        while size < 64 << 20:
            a, b = (int(x) for x in rng.integers(150_000, 450_000, size=2))
            oa, ob = (int(x) for x in rng.integers(0, len(pool) - 450_000, size=2))
            rows.append(
                {
                    "sample_id": f"clip-{sample:07d}",
                    "audio": pool[oa : oa + a],
                    "image": pool[ob : ob + b],
                    "text": f"a caption for sample {sample}",
                    "meta": json.dumps({"n": sample}),
                    "sources": [f"clip-{sample:07d}.flac", f"clip-{sample:07d}.jpg"],
                }
            )
            size += a + b
            sample += 1
        data, entry = encode_shard(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
        name = shard_name(i)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        entries.append({"path": name, **entry})
        written += len(data)
        i += 1
    return commit_index(out, entries, RAW_SCHEMA)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NginxS3:
    """nginx serving `root` path-style: GET/HEAD of /bucket/key with Range, like S3 GetObject/HeadObject."""

    def __init__(self, root: str, workers: int = 2):
        self.dir = tempfile.mkdtemp(prefix="nginx-")
        self.port = free_port()
        conf = f"""
worker_processes {workers};
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location / {{ }}
    }}
}}
"""
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        user = ["-g", "user root;"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [nginx, "-p", self.dir, "-c", "nginx.conf", *user], stderr=subprocess.PIPE
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode()[-500:]}")

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class MotoS3:
    """Fallback when nginx is missing: moto's S3 server (it reads the whole object for every ranged GET)."""

    def __init__(self, root: str):
        from streamtune import storage
        from streamtune.testing.s3server import start_local_s3

        self.s3 = start_local_s3()
        self.s3.create_bucket(BUCKET)
        local = os.path.join(root, BUCKET, PREFIX)
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(f"s3://{BUCKET}/{PREFIX}/{name}", f.read(), self.s3.storage_options)

    @property
    def endpoint_url(self) -> str:
        return self.s3.endpoint_url

    def stop(self) -> None:
        self.s3.stop()


def _nginx_available() -> bool:
    return bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"))


# --- measurements, each run in a fresh process ----------------------------------------------------


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) << 10
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) << 10
    return 0


def run_ceiling(endpoint: str, threads: int, range_bytes: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from streamtune import storage

    url = f"s3://{BUCKET}/{PREFIX}"
    opts = {"endpoint_url": endpoint}
    index = json.loads(storage.read_bytes(f"{url}/index.json", opts))
    fs, base = storage.arrow_fs(url, opts)
    jobs = [
        (e["path"], off, min(range_bytes, e["bytes"] - off))
        for e in index["shards"]
        for off in range(0, e["bytes"], range_bytes)
    ]
    files = {e["path"]: fs.open_input_file(f"{base}/{e['path']}") for e in index["shards"]}

    def get(job):
        name, off, n = job
        return len(files[name].read_at(n, off))

    def one_pass() -> tuple[int, float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(get, jobs))
        return total, time.perf_counter() - start

    cold_bytes, cold_s = one_pass()
    total, elapsed = one_pass()
    return {
        "bytes": total,
        "seconds": elapsed,
        "mb_s": total / elapsed / 1e6,
        "cold_mb_s": cold_bytes / cold_s / 1e6,
        "cpu_s": _cpu(),
    }


def run_loader(
    endpoint: str,
    prefetch_bytes: int,
    max_concurrency: int,
    range_bytes: int = 8 << 20,
    zero_copy: bool = False,
) -> dict:
    from streamtune import CloudStreamingDataset

    ds = CloudStreamingDataset(
        f"s3://{BUCKET}/{PREFIX}",
        {"endpoint_url": endpoint},
        shuffle=True,
        seed=0,
        prefetch_bytes=prefetch_bytes,
        max_concurrency=max_concurrency,
        range_bytes=range_bytes,
        zero_copy=zero_copy,
    )
    before = _rss()

    def one_pass() -> tuple[int, int, float]:  # each pass is the next epoch: a new shuffle
        n = media = 0
        start = time.perf_counter()
        for sample in ds:
            n += 1
            media += len(sample["audio"]) + len(sample["image"])
        return n, media, time.perf_counter() - start

    _, _, cold_s = one_pass()
    n, media, elapsed = one_pass()
    total = ds.index["bytes"]
    return {
        "samples": n,
        "media_bytes": media,
        "seconds": elapsed,
        "mb_s": total / elapsed / 1e6,
        "cold_mb_s": total / cold_s / 1e6,
        "samples_s": n / elapsed,
        "cpu_s": _cpu(),
        "peak_rss_mb": _hwm() / 1e6,
        "rss_growth_mb": (_hwm() - before) / 1e6,
        "stats": ds.stats,
    }


def run_hf(endpoint: str) -> dict:
    import datasets

    from streamtune import storage

    url = f"s3://{BUCKET}/{PREFIX}"
    opts = {"endpoint_url": endpoint}
    index = json.loads(storage.read_bytes(f"{url}/index.json", opts))
    files = [f"{url}/{e['path']}" for e in index["shards"]]
    datasets.disable_progress_bars()
    ds = datasets.load_dataset(
        "arrow",
        data_files={"train": files},
        split="train",
        streaming=True,
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
    )
    n = media = 0
    start = time.perf_counter()
    for sample in ds:
        n += 1
        media += len(sample["audio"]) + len(sample["image"])
    elapsed = time.perf_counter() - start
    return {
        "samples": n,
        "media_bytes": media,
        "seconds": elapsed,
        "samples_s": n / elapsed,
        "mb_s": index["bytes"] / elapsed / 1e6,
    }


def run_latency(endpoint: str, latency_s: float, prefetch_bytes: int, max_concurrency: int) -> dict:
    from streamtune.testing.faultproxy import start_fault_proxy

    with start_fault_proxy(endpoint, latency_s=latency_s, methods=("GET", "HEAD")) as proxy:
        result = run_loader(proxy.endpoint_url, prefetch_bytes, max_concurrency)
        result["proxy"] = proxy.counts.as_dict()
    return result


SERVERS = {
    "nginx": "nginx (read-only S3 stand-in, path-style GET/HEAD with Range)",
    "moto": "moto ThreadedMotoServer (Python; reads the whole object per ranged GET)",
}
MODES = {"ceiling": run_ceiling, "loader": run_loader, "hf": run_hf, "latency": run_latency}


def in_subprocess(mode: str, *args, timeout: float = 900) -> dict:
    env = {**os.environ, **KEYS}
    cmd = [sys.executable, "-m", "bench.loader", "--child", mode, json.dumps(args)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=">= 200 MB instead of >= 1 GB")
    parser.add_argument("--gb", type=float, default=None, help="data size in GB (overrides --quick)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--prefetch-mb", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency (8 suits 2 cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for ceiling and loader")
    parser.add_argument(
        "--server", choices=sorted(SERVERS), default="nginx" if _nginx_available() else "moto"
    )
    parser.add_argument("--zero-copy", action="store_true", help="loader yields memoryviews instead of bytes")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, child_args = args.child
        print(json.dumps(MODES[mode](*json.loads(child_args))))
        return

    size = int((args.gb if args.gb else 0.2 if args.quick else 1.0) * 1e9)
    prefetch = args.prefetch_mb << 20
    root = tempfile.mkdtemp(prefix="bench-loader-")
    server = None
    try:
        t = time.perf_counter()
        index = make_shards(root, size)
        log(
            f"wrote {index['bytes'] / 1e6:.0f} MB in {len(index['shards'])} shards, {index['rows']} rows "
            f"({time.perf_counter() - t:.1f}s)"
        )
        server = NginxS3(root) if args.server == "nginx" else MotoS3(root)
        ep = server.endpoint_url
        ceilings, loaders = [], []
        for _ in range(args.repeats):
            for threads, range_mb in ((8, 8), (16, 16)):  # the best raw configuration is the ceiling
                ceilings.append(in_subprocess("ceiling", ep, threads, range_mb << 20))
                ceilings[-1]["config"] = f"{threads} threads x {range_mb} MiB ranges"
                log("ceiling", ceilings[-1]["config"], round(ceilings[-1]["mb_s"]), "MB/s")
            loaders.append(in_subprocess("loader", ep, prefetch, args.concurrency, 8 << 20, args.zero_copy))
            log("loader", round(loaders[-1]["mb_s"]), "MB/s", loaders[-1]["stats"])
        per_round = len(ceilings) // len(loaders)
        paired = [
            loaders[i]["mb_s"] / max(c["mb_s"] for c in ceilings[i * per_round : (i + 1) * per_round])
            for i in range(len(loaders))
        ]
        ceiling = max(ceilings, key=lambda r: r["mb_s"])
        loader = max(loaders, key=lambda r: r["mb_s"])
        hf = in_subprocess("hf", ep)
        log("hf", round(hf["mb_s"]), "MB/s", round(hf["samples_s"]), "samples/s")
        base = in_subprocess("latency", ep, 0.0, prefetch, args.concurrency)
        log("proxy 0 ms", round(base["mb_s"]), "MB/s")
        slow = in_subprocess("latency", ep, args.latency_ms / 1000, prefetch, args.concurrency)
        log(f"proxy {args.latency_ms:g} ms", round(slow["mb_s"]), "MB/s")
        assert loader["samples"] == hf["samples"] == index["rows"]
        result = {
            "server": SERVERS[args.server],
            "data_mb": round(index["bytes"] / 1e6, 1),
            "shards": len(index["shards"]),
            "rows": index["rows"],
            "loader_mb_s": round(loader["mb_s"], 1),
            "loader_samples_s": round(loader["samples_s"], 1),
            "loader_wait_s": loader["stats"]["wait_s"],
            "loader_cold_mb_s": round(max(r["cold_mb_s"] for r in loaders), 1),
            "ceiling_mb_s": round(ceiling["mb_s"], 1),
            "ceiling_cold_mb_s": round(max(r["cold_mb_s"] for r in ceilings), 1),
            "ceiling_config": ceiling["config"],
            "ratio_ceiling": round(loader["mb_s"] / ceiling["mb_s"], 3),
            "ratio_ceiling_per_round": [round(r, 3) for r in paired],
            "ratio_ceiling_median": round(float(np.median(paired)), 3),
            "hf_samples_s": round(hf["samples_s"], 1),
            "hf_mb_s": round(hf["mb_s"], 1),
            "ratio_hf": round(loader["samples_s"] / hf["samples_s"], 3),
            "latency_ms": args.latency_ms,
            "proxy_mb_s": round(base["mb_s"], 1),
            "proxy_latency_mb_s": round(slow["mb_s"], 1),
            "ratio_latency": round(slow["mb_s"] / base["mb_s"], 3),
            "peak_rss_mb": round(loader["peak_rss_mb"], 1),
            "rss_growth_mb": round(loader["rss_growth_mb"], 1),
            "prefetch_mb": args.prefetch_mb,
            "zero_copy": args.zero_copy,
            "max_concurrency": args.concurrency,
            "all_ceiling_mb_s": [round(r["mb_s"], 1) for r in ceilings],
            "all_loader_mb_s": [round(r["mb_s"], 1) for r in loaders],
        }
    finally:
        if server:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
