"""`streamtune demo`: generate the embedded default set, serve it from loopback S3, run the pipeline flow."""

from __future__ import annotations

import json
import os
import threading
import time

from streamtune import storage
from streamtune.config import DEFAULT_MODEL
from streamtune.demo.data import generate_demo_source, upload_dir
from streamtune.testing.s3server import start_local_s3

BUCKET = "streamtune-demo"
DEMO_VIDEOS = 2  # 15 s narrated clips of moving shapes: footage end to end (~45 s of decode, shared CPU)
DEMO_PROMPT_SAMPLE = {"transcript": "This picture shows a blue circle.", "tags": ["circle", "blue"]}


def demo_params(workdir: str, *, samples: int = 24, iters: int | None = None) -> dict:
    """Pipeline parameters of the embedded default (a local adapter folder, everything else in the bucket)."""
    params = {
        "source_url": f"s3://{BUCKET}/raw",
        "work_url": f"s3://{BUCKET}/streamtune",
        "shard": {"max_shard_bytes": 256 << 10},  # several small shards, so the fan-out is visible
        "decode": {"segment_seconds": 6.0},  # the demo's 15 s videos become two or three segments each
        # the text adapter has learned the captions by step ~10; the rest of the 10-minute budget goes to
        # the multimodal part
        "train": {"adapter_path": os.path.join(workdir, "adapters"), "iters": iters or 14, "batch_size": 2},
    }
    return params


def run_demo(workdir: str, *, samples: int = 24, iters: int | None = None, multimodal: bool = True) -> dict:
    """Run the whole pipeline on generated data; writes `workdir/summary.json` and returns the summary.
    `multimodal`: then teach the model to see pictures and hear speech (`streamtune.demo.multimodal`)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", os.path.join(workdir, ".prefect"))
    started = time.time()
    source_dir = os.path.join(workdir, "source")
    print(
        f"[demo] generating {samples} samples (speech + drawings + captions) and {DEMO_VIDEOS} videos in {source_dir}",
        flush=True,
    )
    server = _start_prefect_server()
    generate_demo_source(source_dir, n=samples, videos=DEMO_VIDEOS)

    s3 = start_local_s3()
    try:
        os.environ.update(
            s3.env()
        )  # every stage, including Prefect task runs, reaches the bucket via the AWS env
        s3.create_bucket(BUCKET)
        uploaded = upload_dir(source_dir, f"s3://{BUCKET}/raw")
        print(f"[demo] uploaded {uploaded} bytes to s3://{BUCKET}/raw on {s3.endpoint_url}", flush=True)

        from flows.pipeline import PipelineParams, pipeline

        server.join()
        summary = pipeline(PipelineParams(**demo_params(workdir, samples=samples, iters=iters)))
        summary = dict(summary)
        summary["generation"] = _before_after(summary, workdir)
        summary["search"] = _search(f"s3://{BUCKET}/streamtune/index", source_dir)
        if multimodal:
            from streamtune.demo.multimodal import run as run_multimodal

            summary["multimodal"] = run_multimodal(f"s3://{BUCKET}/streamtune", workdir, log=_log)
        summary["seconds"] = round(time.time() - started, 1)
        summary["s3_endpoint"] = s3.endpoint_url
    finally:
        s3.stop()
    storage.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _start_prefect_server() -> threading.Thread:
    """Without PREFECT_API_URL the first flow starts a temporary Prefect server (13-25 s on 2 cores): start
    it on a thread while the source set is generated; join before the first flow."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    def start() -> None:
        if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the instance the flow's client then finds running

    thread = threading.Thread(target=start, name="prefect-server", daemon=True)
    thread.start()
    return thread


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _search(index_url: str, source_dir: str) -> dict:
    """One search over the indexed footage: the second shot the narrator names in the first video."""
    import re

    from streamtune.search import SearchError, open_index
    from streamtune.search.rank import timecode

    started = time.perf_counter()
    with open(os.path.join(source_dir, "clips", "metadata.jsonl")) as f:
        videos = [r for r in map(json.loads, f) if r.get("shots")]
    named = re.findall(r"\ba (\w+ \w+)", videos[0]["caption"]) if videos else []
    query = f"the {named[1 if len(named) > 1 else 0]}" if named else "a red circle"
    try:
        with open_index(index_url) as index:
            hits = index.search(query, top=3)
    except SearchError as e:
        print(f"[demo] search {query!r}: {e}", flush=True)
        return {"query": query, "error": str(e)}
    out: dict = {"query": query, "seconds": round(time.perf_counter() - started, 2), "hits": len(hits)}
    if hits:
        h = hits[0]
        out["top"] = {"source": h.source, "t0": h.t0, "t1": h.t1, "timecode": f"{timecode(h.t0)}-{timecode(h.t1)}",
                      "snippet": h.marked(), "matched": h.matched, "score": h.score}  # fmt: skip
        print(f"[demo] search {query!r}: {h.source} {out['top']['timecode']} \"{h.marked()}\" "
              f"({', '.join(h.matched) or 'fused rank only'}; {out['seconds']} s)", flush=True)  # fmt: skip
    return out


def _before_after(summary: dict, workdir: str) -> dict:
    from streamtune.train.data import render
    from streamtune.train.generate import generate

    model = summary.get("model") or DEFAULT_MODEL
    rendered = render(DEMO_PROMPT_SAMPLE)
    prompt = rendered[0] if rendered else DEMO_PROMPT_SAMPLE["transcript"]
    before = generate(model, prompt, max_tokens=24)
    after = generate(model, prompt, adapter_path=summary["adapter_path"], max_tokens=24)
    return {"prompt": prompt, "before": before, "after": after}


if __name__ == "__main__":
    print(json.dumps(run_demo("streamtune-demo"), indent=2, default=str))
