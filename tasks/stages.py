"""The pipeline's tasks: each wraps one streamtune call, with the shared retry policy and a content cache key.

Task results are small JSON documents (URLs, index entries, stats), never data: the data lives in the work
prefix, so a cached result always points at objects that exist.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from streamtune.storage import join
from tasks.cache import digest, keyed, source_fingerprint
from tasks.policy import task_options


def shard_outputs(parameters: dict, result: dict) -> list:
    """The shard file a write/rewrite/decode result describes, at its recorded size (none for a dropped one)."""
    entry = result.get("entry")
    return [(join(parameters["out_prefix"], entry["path"]), entry["bytes"])] if entry else []


@task(
    name="build-manifest",
    task_run_name="build-manifest",
    cache_policy=keyed(
        "manifest",
        "source_url",
        "fingerprint",
        "exclude_digest",
        "manifest_prefix",
        "id_column",
        outputs=lambda p, r: [(r["url"], r.get("bytes"))],
    ),
    **task_options("manifest"),
)
def build_manifest_task(
    source_url: str,
    manifest_prefix: str,
    fingerprint: str,
    exclude_digest: str,
    shards_prefix: str | None = None,
    id_column: str | None = None,
    source_options: dict | None = None,
    work_options: dict | None = None,
) -> dict:
    """List and classify the source (skipping what the shard set at `shards_prefix` already holds, for
    incremental runs); write the manifest; return its summary. The held versions are read here rather than
    passed in: a record file can hold millions of them."""
    from streamtune import storage
    from streamtune.ingest import ingested_sources, unusable_objects
    from streamtune.manifest import build_manifest, manifest_hash, summarize_manifest, write_manifest

    log = get_run_logger()
    t0 = time.perf_counter()
    exclude = ingested_sources(shards_prefix, work_options) if shards_prefix else {}
    table, problems = build_manifest(source_url, source_options, exclude=exclude, id_column=id_column)
    digest = manifest_hash(table)
    url = storage.join(manifest_prefix, f"manifest-{digest[:16]}.parquet")
    size = write_manifest(table, url, work_options)
    summary = summarize_manifest(table)
    log.info(
        "manifest %s: %s objects, %s samples (%.1fs)",
        url,
        summary["objects"],
        summary["samples"],
        time.perf_counter() - t0,
    )
    quarantine = problems + unusable_objects(table)
    return {"url": url, "bytes": size, "hash": digest, "summary": summary, "quarantine": quarantine}


@task(
    name="plan-shards",
    task_run_name="plan-shards",
    cache_policy=keyed("shard", "manifest_hash", "max_shard_bytes", "start_index", "inline_max_bytes"),
    **task_options("commit"),
)
def plan_shards_task(
    manifest_url: str,
    manifest_hash: str,
    max_shard_bytes: int,
    start_index: int,
    work_options: dict | None = None,
    inline_max_bytes: int = 64 << 20,
) -> list[dict]:
    from streamtune.ingest import plan_shards
    from streamtune.manifest import read_manifest

    return plan_shards(
        read_manifest(manifest_url, work_options),
        max_shard_bytes=max_shard_bytes,
        start_index=start_index,
        inline_max_bytes=inline_max_bytes,
    )


@task(
    name="write-shard",
    task_run_name="write-shard-{index:05d}",
    cache_policy=keyed(
        "shard",
        "manifest_hash",
        "plan",
        "out_prefix",
        outputs=shard_outputs,
    ),
    **task_options("shard"),
)
def write_shard_task(
    index: int,
    plan: dict,
    source_url: str,
    manifest_url: str,
    manifest_hash: str,
    out_prefix: str,
    source_options: dict | None = None,
    work_options: dict | None = None,
) -> dict:
    """Pack one planned shard's objects into `out_prefix/shard-NNNNN.arrow`."""
    from streamtune.ingest import write_raw_shard
    from streamtune.manifest import read_manifest

    t0 = time.perf_counter()
    manifest = read_manifest(manifest_url, work_options)
    result = write_raw_shard(
        source_url, manifest, plan, out_prefix, source_options=source_options, out_options=work_options
    )
    entry = result["entry"]
    get_run_logger().info(
        "wrote %s: %s rows, %s bytes in %.2fs (%d quarantined)",
        entry["path"],
        entry["rows"],
        entry["bytes"],
        time.perf_counter() - t0,
        len(result["quarantine"]),
    )
    return result


@task(
    name="plan-rewrites",
    task_run_name="plan-rewrites",
    cache_policy=keyed("shard", "manifest_hash", "index_digest", "start_index"),
    **task_options("commit"),
)
def plan_rewrites_task(
    manifest_url: str,
    manifest_hash: str,
    entries: list[dict],
    index_digest: str,
    start_index: int,
    out_prefix: str | None = None,
    work_options: dict | None = None,
) -> list[dict]:
    """Committed shards holding samples the manifest supersedes (changed or removed at the source)."""
    from streamtune.ingest import plan_rewrites, superseded_samples
    from streamtune.manifest import read_manifest

    stale = superseded_samples(read_manifest(manifest_url, work_options))
    if not stale:
        return []
    return plan_rewrites(
        entries, stale, start_index=start_index, prefix=out_prefix, storage_options=work_options
    )


@task(
    name="rewrite-shard",
    task_run_name="rewrite-shard-{index:05d}",
    cache_policy=keyed(
        "shard",
        "entry",
        "plan",
        "out_prefix",
        outputs=shard_outputs,
    ),
    **task_options("shard"),
)
def rewrite_shard_task(
    index: int, entry: dict, plan: dict, out_prefix: str, work_options: dict | None = None
) -> dict:
    """Write a committed shard again without its superseded samples."""
    from streamtune.ingest import rewrite_raw_shard

    result = rewrite_raw_shard(out_prefix, entry, plan, work_options)
    new = result["entry"]
    get_run_logger().info(
        "%s without %d superseded samples -> %s",
        plan["replaces"],
        len(plan["drop"]),
        new["path"] if new else "(empty, dropped)",
    )
    return result


@task(
    name="commit-shards",
    task_run_name="commit-shards",
    cache_policy=keyed(
        "shard",
        "out_prefix",
        "checksums",
        "append",
        outputs=lambda p, r: [join(p["out_prefix"], "index.json")],
    ),
    **task_options("commit"),
)
def commit_shards_task(
    out_prefix: str,
    results: list[dict],
    checksums: list[str],
    append: bool,
    problems: list[dict] | None = None,
    work_options: dict | None = None,
) -> dict:
    """Write index.json last: the shard set becomes visible only once every shard exists."""
    from streamtune.ingest import commit_raw_shards

    index = commit_raw_shards(out_prefix, results, work_options, append=append, problems=problems)
    return {"shards": len(index["shards"]), "rows": index["rows"], "bytes": index["bytes"]}


def shard_checksums(results: list[dict[str, Any]]) -> list[str]:
    return [
        f"{r['entry']['path']}:{r['entry']['checksum']}" if r["entry"] else f"-{r['replaces']}"
        for r in results
    ]


_DECODERS: dict[str, tuple[Any, threading.Lock]] = {}
_DECODERS_LOCK = threading.Lock()


def shared_decoder(cfg: Any) -> tuple[Any, threading.Lock]:
    """One decoder (Whisper + CLIP loaded once) per process and config, shared by the mapped decode tasks,
    with the lock its users hold: the decoder's batching state and models are not safe to share between
    threads, so thread-runner tasks take turns and parallel decode runs in processes (Dask, Ray)."""
    from streamtune.decode.features import Decoder

    key = cfg.key()
    with _DECODERS_LOCK:
        if key not in _DECODERS:
            _DECODERS[key] = (Decoder(cfg), threading.Lock())
        return _DECODERS[key]


@task(
    name="decode-shard",
    task_run_name="decode-shard-{index:05d}",
    cache_policy=keyed(
        "decode",
        "raw_checksum",
        "out_prefix",
        "decode_key",
        outputs=shard_outputs,
    ),
    **task_options("decode"),
)
def decode_shard_task(
    index: int,
    raw_prefix: str,
    entry: dict,
    raw_checksum: str,
    out_prefix: str,
    decode_settings: dict,
    decode_key: str,
    work_options: dict | None = None,
) -> dict:
    """Decode one raw shard (audio -> Whisper transcript, image -> CLIP embedding + tags, video -> segments)
    into a feature shard."""
    from streamtune.decode.features import DecodeConfig, decode_shard

    cfg = DecodeConfig(**decode_settings)
    t0 = time.perf_counter()
    decoder, lock = shared_decoder(cfg)
    with lock:
        result = decode_shard(raw_prefix, entry, out_prefix, cfg, work_options, decoder=decoder)
    s = result.get("stats") or {}
    if result.get("skipped"):
        get_run_logger().info(f"{entry['path']}: already decoded with these settings, kept")
    else:
        get_run_logger().info(
            f"decoded {entry['path']} in {time.perf_counter() - t0:.1f} s: {s.get('samples', 0)} samples, "
            f"{s.get('audio_seconds', 0):.0f} s of audio, {s.get('images', 0)} images, "
            f"{s.get('videos', 0)} videos ({s.get('segments', 0)} segments, {s.get('frames_sampled', 0)} frames), "
            f"{s.get('quarantined', 0)} quarantined"
        )
    return result


@task(
    name="commit-features",
    task_run_name="commit-features",
    cache_policy=keyed(
        "decode",
        "out_prefix",
        "checksums",
        "clip_model",
        outputs=lambda p, r: [join(p["out_prefix"], "index.json")],
    ),
    **task_options("commit"),
)
def commit_features_task(
    out_prefix: str,
    results: list[dict],
    checksums: list[str],
    work_options: dict | None = None,
    clip_model: str | None = None,
) -> dict:
    """Commit the feature set; `clip_model` (the decode config's) sets the index's embedding width."""
    from streamtune.decode.clip import embed_dim
    from streamtune.decode.features import commit_features

    clip_dim = embed_dim(clip_model) if clip_model else None
    index = commit_features(out_prefix, results, work_options, clip_dim=clip_dim)
    return {"shards": len(index["shards"]), "rows": index["rows"], "bytes": index["bytes"]}


@task(
    name="train-adapter",
    task_run_name="train-adapter",
    cache_policy=keyed(
        "train",
        "features_digest",
        "train_settings",
        "adapter_url",
        "resume_from",
        outputs=lambda p, r: [(join(r["adapter_path"], "adapters.safetensors"), r.get("adapter_bytes"))],
    ),
    **task_options("train"),
)
def train_task(
    features_url: str,
    features_digest: str,
    train_settings: dict,
    adapter_url: str,
    checkpoint_url: str,
    resume_from: str = "none",
    work_options: dict | None = None,
    label: str = "train",
) -> dict:
    """LoRA/QLoRA fine-tune on the streamed feature shards into a new adapter version under `adapter_url`;
    move `adapter_url/latest.json` to it once it is complete.

    Checkpoints go under `checkpoint_url/<digest of this task's inputs and starting adapter>`, so a retry of
    this very task continues exactly where the crashed attempt stopped, while a run with other data,
    settings or starting point starts its own; `resume_from="latest"` starts from the latest adapter.
    """
    import os

    import streamtune  # noqa: F401  (BLAS preload before MLX)
    from streamtune import CloudStreamingDataset, storage
    from streamtune.config import TrainArgs
    from streamtune.train import adapters, checkpoint
    from streamtune.train.trainer import train
    from tasks.artifacts import ProgressArtifact, TrainingMetricsArtifact, loss_curve_artifact, loss_curve_png

    log = get_run_logger()
    args = TrainArgs.model_validate(train_settings)
    init = args.init_adapter
    if resume_from == "latest":
        init = adapters.latest(adapter_url, work_options) or init
        log.info(f"warm start from {init}" if init else f"no adapter under {adapter_url} yet: starting fresh")
    key = digest(features_digest, train_settings, adapter_url, resume_from, init)[:16]
    ckpt = storage.join(checkpoint_url, key)
    resume = checkpoint.latest(ckpt, work_options) is not None
    if resume:
        log.info(f"resuming the interrupted attempt from its checkpoint at {ckpt}")
    version = f"{time.strftime('%Y%m%d-%H%M%S')}-{key[:8]}"
    version_url = storage.join(adapter_url, version)
    args = args.model_copy(
        update={
            "adapter_path": version_url,
            "checkpoint_url": ckpt,
            "storage_options": work_options,
            "save_every": args.save_every or max(args.iters // 4, 1),
            "resume": resume,
            "init_adapter": init,
        }
    )
    dataset = CloudStreamingDataset(features_url, storage_options=work_options, shuffle=True, seed=args.seed)
    progress = ProgressArtifact(args.iters, f"Training {args.model} ({args.iters} steps, {args.stage})")
    metrics = TrainingMetricsArtifact(args.iters)

    def on_step(m: dict) -> None:
        progress.update(m["step"])
        metrics.update(m)
        if m["step"] == 1 or m["step"] % 10 == 0 or m["step"] == args.iters:
            log.info(
                f"step {m['step']}/{args.iters} (global {m['global_step']}): loss {m['loss']:.3f}, "
                f"{m['tokens_per_s']:,.0f} tokens/s"
            )

    result = train(args, dataset, on_step=on_step)
    progress.update(args.iters)
    metrics.finish(result)
    local = adapters.local_dir(version_url)
    png = loss_curve_png(
        result["losses"],
        f"{args.model} loss",
        [(h["step"], h["val_loss"]) for h in result["history"] if "val_loss" in h],
    )
    with open(os.path.join(local, "loss_curve.png"), "wb") as f:
        f.write(png)
    adapters.upload(local, version_url, work_options, extra=("loss_curve.png",))
    weights = adapters.describe(local)
    lora = f"{args.fine_tune_type} rank {args.rank}, scale {args.scale}, {args.num_layers} layers"
    info = {
        "version": version,
        "base_model": args.model,
        "lora": lora,
        "steps": result["steps"],
        "global_step": result["global_step"],
        "flow_run": flow_run_name(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **weights,
    }
    pointer = adapters.publish(adapter_url, version_url, info, work_options)
    png_url = storage.join(version_url, "loss_curve.png")
    loss_curve_artifact(png, png_url, result, key="loss-curve" if label == "train" else f"loss-curve-{label}")
    from tasks.artifacts import adapter_artifact

    adapter_artifact(pointer | {"latest": storage.join(adapter_url, adapters.LATEST)})
    log.info(
        f"adapter {version} written to {version_url} ({weights['bytes'] / 1e6:.1f} MB); latest.json points at it"
    )
    keep = ("steps", "global_step", "loss_first", "loss_last", "losses", "tokens", "samples", "tokens_per_s",
            "seconds", "peak_mem_mb", "val_loss", "packed", "resumed_from_step")  # fmt: skip
    return {
        **{k: result.get(k) for k in keep},
        "adapter_path": version_url,
        "adapter_version": version,
        "adapter_bytes": weights["bytes"],
        "adapter_sha256": weights["sha256"],
        "lora": lora,
        "loss_curve": png_url,
    }


def flow_run_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name


@task(name="list-source", task_run_name="list-source", cache_policy=NO_CACHE, **task_options("manifest"))
def list_source_task(
    source_url: str,
    shards_prefix: str,
    incremental: bool,
    source_options: dict | None = None,
    work_options: dict | None = None,
) -> dict:
    """The source's fingerprint and, for incremental runs, a digest of the committed shard set (what the
    manifest will skip), both part of the manifest's cache key."""
    from streamtune import storage
    from streamtune.shards import read_index

    held = None
    if incremental and storage.exists(join(shards_prefix, "index.json"), work_options):
        held = [(e["path"], e["checksum"]) for e in read_index(shards_prefix, work_options)["shards"]]
    return {"fingerprint": source_fingerprint(source_url, source_options), "exclude_digest": digest(held)}


@task(name="read-shard-set", task_run_name="read-{name}", cache_policy=NO_CACHE, **task_options("commit"))
def read_shard_set_task(prefix: str, name: str, work_options: dict | None = None) -> dict:
    """The committed state of a shard set: its index entries and the next free shard number."""
    from streamtune import storage
    from streamtune.ingest import next_shard_index
    from streamtune.shards import read_index

    if not storage.exists(join(prefix, "index.json"), work_options):
        return {"committed": False, "entries": [], "next_index": 0}
    entries = read_index(prefix, work_options)["shards"]
    return {"committed": True, "entries": entries, "next_index": next_shard_index(prefix, work_options)}


@task(name="data-state", task_run_name="data-state", cache_policy=NO_CACHE, **task_options("report"))
def data_state_task(work_url: str, wo: dict | None = None) -> dict:
    """What the work prefix holds now: raw shard set, feature set and the current quarantine."""
    from streamtune.report import data_state

    state = data_state(work_url, wo)
    for part in ("shards", "features"):
        state[part].pop("entries", None) if len(state[part].get("entries", [])) > 200 else None
    return state


@task(
    name="export-adapter",
    task_run_name="export-{to}",
    cache_policy=keyed("export", "adapter_path", "base", "to", "out_url", outputs=lambda p, r: [r["out"]]),
    **task_options("export"),
)
def export_task(
    adapter_path: str, base: str, to: str, out_url: str, work_options: dict | None = None
) -> dict:
    """Hand the finished adapter off as `to` (peft, gguf-adapter, fused-mlx, fused-gguf, ollama) at `out_url`."""
    import os
    import tempfile

    from streamtune import storage
    from streamtune.export import export_adapter
    from streamtune.train.adapters import is_remote

    log = get_run_logger()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "out") if is_remote(out_url) else out_url
        summary = export_adapter(adapter_path, base, to, local, force=True, storage_options=work_options)
        if is_remote(out_url):
            fs, path = storage.get_fs(out_url, work_options)
            fs.put(local, path, recursive=True)
    for note in summary.get("notes") or []:
        log.warning(note)
    log.info(f"exported {adapter_path} as {to} to {out_url} in {summary['seconds']:.1f} s")
    return {**summary, "out": out_url}


@task(
    name="build-index",
    task_run_name="build-index",
    cache_policy=keyed(
        "index",
        "features_digest",
        "index_url",
        "index_settings",
        outputs=lambda p, r: [join(p["index_url"], "index.json")],
    ),
    **task_options("index"),
)
def index_task(
    features_url: str,
    features_digest: str,
    index_url: str,
    index_settings: dict,
    work_options: dict | None = None,
) -> dict:
    """Build or update the search index of the feature set (only changed shards and transcripts are redone),
    then run a few sample queries for the artifact."""
    from streamtune.config import IndexConfig
    from streamtune.search import build_index, open_index
    from streamtune.search.rank import sample_queries, top_hits

    cfg = IndexConfig(**index_settings)
    m = build_index(features_url, index_url, cfg, work_options)
    s = m["stats"]
    get_run_logger().info(
        f"indexed {m['rows']} segments in {s['seconds']:.1f} s: {s['embedded']} embedded, {s['reused']} reused, "
        f"{s['shards_reused']} shards unchanged, {s['removed']} rows removed"
    )
    with open_index(index_url, cfg, work_options) as index:
        queries = cfg.sample_queries or sample_queries(index)
        samples = top_hits(index, queries)
        signals = ["lexical", "semantic", *index.signals]
    keys = ("embedded", "reused", "shards", "shards_reused", "removed", "seconds")
    return {"url": index_url, "rows": m["rows"], "bytes": m["bytes"], "parts": len(m["parts"]),
            "modalities": m.get("modalities", {}), **{k: s[k] for k in keys}, "signals": signals,
            "samples": samples}  # fmt: skip
