"""Long footage through the decode stage: a video read by reference vs downloaded whole.

    python -m bench.footage [--minutes 60] [--size-mb 1100] [--no-transcribe]

Generates a 720p H.264 + AAC video of `--minutes` and about `--size-mb` (one GOP encoded once and repeated
with rising timestamps: a valid file every decoder plays through) into a directory served by Debian's nginx
as a read-only S3 endpoint (`--server python` or no nginx: a small Python range server; moto keeps objects
in Python memory and reads the whole object for every ranged GET). The shard stage writes a raw shard in which the video is a reference (it is over
`shard.inline_max_bytes`), then each variant decodes it in a fresh process:

- refs: `decode_shard` as the pipeline runs it: the raw shard streams in, the video is opened with
  `open_ref` (ranged GETs through RemoteFile) and decoded into segments (audio windows through Whisper,
  keyframes through CLIP);
- baseline: the whole object downloaded into memory first, then the same Decoder on the bytes.

Per variant: `peak_rss_mb` (the child's max RSS), `bytes_fetched / object_size`, `audio_rtf` (seconds of
audio transcribed per second of decoding), `frames_s` (frames sampled per second), wall time, segments.
The last stdout line is one JSON object; `ratio_*` compare refs with the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BUCKET = "bench"
KEY = "footage/interview.mp4"
INLINE_MAX_BYTES = 1 << 20  # small runs (--minutes 2) stay references too
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class RangeServer:
    """Fallback where nginx is missing (the GPU machine): a threaded Python HTTP server with nginx's
    answers to path-style GET/HEAD with Range (Content-Range, ETag from mtime and size)."""

    def __init__(self, root: str):
        import threading
        from email.utils import formatdate
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = os.path.realpath(os.path.join(root, self.path.split("?")[0].lstrip("/")))
                if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                st = os.stat(path)
                start, end = 0, st.st_size - 1
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start, end = int(a), min(int(b) if b else end, end)
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(end - start + 1))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
                self.send_header("ETag", f'"{int(st.st_mtime):x}-{st.st_size:x}"')
                self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    with open(path, "rb") as f:
                        f.seek(start)
                        self.wfile.write(f.read(end - start + 1))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def generate(root: str, minutes: float, size_mb: float, width: int, height: int, fps: int) -> dict:
    from streamtune.testing.footage import write_long_video

    path = os.path.join(root, BUCKET, KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    seconds = minutes * 60
    bit_rate = int(size_mb * 8e6 / seconds)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        info = write_long_video(
            f, seconds=seconds, width=width, height=height, fps=fps, video_bit_rate=bit_rate
        )
    info |= {"bytes": os.path.getsize(path), "generate_s": round(time.perf_counter() - t0, 1)}
    return info


def shard(out: str) -> dict:
    """The shard stage on the served object: manifest row by HEAD (nginx lists nothing), then a raw shard."""
    import pyarrow as pa

    from streamtune.ingest import plan_shards, write_raw_shard
    from streamtune.manifest import SCHEMA
    from streamtune.shards import RAW_SCHEMA, commit_index
    from streamtune.sniff import MORE_BYTES, SNIFF_BYTES, detect_modality, more_bytes_at
    from streamtune.stream.remote_file import RemoteFile, object_version

    url = f"s3://{BUCKET}/{KEY}"
    version, size = object_version(url)
    with RemoteFile(url, version, size, block_bytes=MORE_BYTES) as f:
        head = f.read(SNIFF_BYTES)
        at = more_bytes_at(head, size)
        more = None
        if at is not None:  # the index follows the media data (as PyAV writes MP4)
            f.seek(at)
            more = f.read(MORE_BYTES)
    modality, how = detect_modality(KEY, head, more, at or 0)
    row = {"sample_id": KEY.rsplit(".", 1)[0], "key": KEY, "size": size, "etag": version}
    manifest = pa.Table.from_pylist([row | {"modality": modality, "detected_by": how}], schema=SCHEMA)
    (plan,) = plan_shards(manifest, inline_max_bytes=INLINE_MAX_BYTES)
    t0 = time.perf_counter()
    result = write_raw_shard(f"s3://{BUCKET}", manifest, plan, out)
    commit_index(out, [result["entry"]], RAW_SCHEMA)
    return {"modality": modality, "detected_by": how, "raw_shard_bytes": result["entry"]["bytes"],
            "shard_s": round(time.perf_counter() - t0, 3), "entry": result["entry"]}  # fmt: skip


def decode_config(args) -> dict:
    return {
        "whisper_model": args.whisper,
        "transcribe": args.transcribe,
        "keyframe_every": args.keyframe_every,
        "cache_dir": args.cache_dir,
    }


def child(variant: str, raw: str, out: str, cfg_fields: dict) -> dict:
    """One variant in this (fresh) process; returns its figures."""
    import numpy as np
    import pyarrow as pa

    from streamtune import storage
    from streamtune.config import DecodeConfig
    from streamtune.decode.features import Decoder, decode_shard
    from streamtune.shards import read_index, read_shard_table
    from streamtune.stream import remote_file

    cfg = DecodeConfig(**cfg_fields)
    decoder = Decoder(cfg)
    _ = decoder.clip  # models load before the clock starts
    if cfg.transcribe:
        _ = decoder.transcriber
    models_rss = _rss_mb()
    entry = read_index(raw)["shards"][0]
    remote_file.totals(reset=True)
    t0 = time.perf_counter()
    if variant == "refs":
        result = decode_shard(raw, entry, out, cfg, decoder=decoder)
        stats, quarantine = result["stats"], result["quarantine"]
        fetched = remote_file.totals()
    else:  # the whole object in memory, then the same decoder
        raw_table = read_shard_table(raw, entry)
        data = storage.read_bytes(raw_table.column("refs")[0].as_py()[0]["url"])
        fetched = {"bytes": len(data), "requests": 1, "largest_request": len(data)}
        offsets = pa.py_buffer(np.array([0, len(data)], np.int32))
        video = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)])  # no copy
        table = raw_table.set_column(raw_table.schema.get_field_index("video"), "video", video)
        table = table.drop_columns(["refs"])
        del data, video, raw_table
        _, quarantine, stats = decoder.decode_table_stats(table)
        del table
    wall = time.perf_counter() - t0
    size = read_shard_table(raw, entry).to_pylist()[0]["refs"][0]["size"]
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "models_rss_mb": models_rss,
        "bytes_fetched": fetched["bytes"],
        "fetched_ratio": round(fetched["bytes"] / size, 4),
        "requests": fetched["requests"],
        "largest_request": fetched["largest_request"],
        "audio_seconds": round(stats["audio_seconds"], 1),
        "audio_rtf": round(stats["audio_seconds"] / wall, 2),
        "video_seconds": round(stats["video_seconds"], 1),
        "frames_sampled": stats["frames_sampled"],
        "frames_s": round(stats["frames_sampled"] / wall, 2),
        "segments": stats["segments"],
        "quarantine": [q["error"] for q in quarantine],
    }


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run_child(variant: str, raw: str, out: str, cfg_fields: dict, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.footage", "--child", variant, "--raw", raw, "--out", out,
           "--cfg", json.dumps(cfg_fields)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--size-mb", type=float, default=1100.0)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--whisper", default="offline:tiny.en")
    p.add_argument("--no-transcribe", dest="transcribe", action="store_false")
    p.add_argument("--keyframe-every", type=float, default=5.0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--server", choices=["auto", "nginx", "python"], default="auto")
    p.add_argument("--child", choices=["refs", "baseline"])
    p.add_argument("--raw")
    p.add_argument("--out")
    p.add_argument("--cfg")
    args = p.parse_args(argv)
    if args.child:
        result = child(args.child, args.raw, args.out, json.loads(args.cfg))
        print(json.dumps(result))
        return result

    from bench.loader import NginxS3, _nginx_available

    root = tempfile.mkdtemp(prefix="bench-footage-")
    log(f"generating {args.minutes} min, ~{args.size_mb} MB of {args.width}x{args.height} under {root}")
    video = generate(root, args.minutes, args.size_mb, args.width, args.height, args.fps)
    log(json.dumps(video))
    nginx = args.server == "nginx" or (args.server == "auto" and _nginx_available())
    server = NginxS3(root) if nginx else RangeServer(root)
    env = {**os.environ, **KEYS, "AWS_ENDPOINT_URL_S3": server.endpoint_url}
    os.environ.update({k: v for k, v in env.items() if k in KEYS or k == "AWS_ENDPOINT_URL_S3"})
    try:
        raw, out = os.path.join(root, "shards"), os.path.join(root, "features")
        sharded = shard(raw)
        entry = sharded.pop("entry")
        log(json.dumps(sharded))
        cfg_fields = decode_config(args)
        results = {"refs": run_child("refs", raw, out, cfg_fields, env)}
        log("refs", json.dumps(results["refs"]))
        if not args.skip_baseline:
            results["baseline"] = run_child("baseline", raw, out + "-baseline", cfg_fields, env)
            log("baseline", json.dumps(results["baseline"]))
    finally:
        server.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    refs, base = results["refs"], results.get("baseline")
    summary = {
        "object_bytes": video["bytes"],
        "object_mb": round(video["bytes"] / 1e6, 1),
        "video_seconds": video["seconds"],
        "resolution": f"{args.width}x{args.height}",
        "raw_shard_bytes": sharded["raw_shard_bytes"],
        "modality": sharded["modality"],
        "shard_rows": entry["rows"],
        "transcribe": args.transcribe,
        "peak_rss_mb": refs["peak_rss_mb"],
        "bytes_fetched_ratio": refs["fetched_ratio"],
        "audio_rtf": refs["audio_rtf"],
        "frames_s": refs["frames_s"],
        "refs": refs,
    }
    if base is not None:
        summary["baseline"] = base
        summary["ratio_peak_rss"] = round(refs["peak_rss_mb"] / base["peak_rss_mb"], 3)
        summary["ratio_wall"] = round(refs["wall_s"] / base["wall_s"], 3)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
