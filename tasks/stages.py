"""The pipeline's tasks: each wraps one streamtune call, with the shared retry policy and a content cache key.

Task results are small JSON documents (URLs, index entries, stats), never data: the data lives in the work
prefix, so a cached result always points at objects that exist.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import get_run_logger, task

from streamtune.shards import shard_name
from streamtune.storage import join
from tasks.cache import digest, keyed
from tasks.policy import task_options


@task(
    name="build-manifest",
    task_run_name="build-manifest",
    cache_policy=keyed("manifest", "source_url", "fingerprint", "exclude_digest", "manifest_prefix"),
    **task_options("manifest"),
)
def build_manifest_task(
    source_url: str,
    manifest_prefix: str,
    fingerprint: str,
    exclude_digest: str,
    exclude: dict[str, str] | None = None,
    source_options: dict | None = None,
    work_options: dict | None = None,
) -> dict:
    """List and classify the source (skipping `exclude`d objects); write the manifest; return its summary."""
    from streamtune import storage
    from streamtune.ingest import unusable_objects
    from streamtune.manifest import build_manifest, manifest_hash, summarize_manifest, write_manifest

    log = get_run_logger()
    t0 = time.perf_counter()
    table, problems = build_manifest(source_url, source_options, exclude=exclude)
    digest = manifest_hash(table)
    url = storage.join(manifest_prefix, f"manifest-{digest[:16]}.parquet")
    write_manifest(table, url, work_options)
    summary = summarize_manifest(table)
    log.info(
        "manifest %s: %s objects, %s samples (%.1fs)",
        url,
        summary["objects"],
        summary["samples"],
        time.perf_counter() - t0,
    )
    return {"url": url, "hash": digest, "summary": summary, "quarantine": problems + unusable_objects(table)}


@task(
    name="plan-shards",
    task_run_name="plan-shards",
    cache_policy=keyed("shard", "manifest_hash", "max_shard_bytes", "start_index"),
    **task_options("commit"),
)
def plan_shards_task(
    manifest_url: str,
    manifest_hash: str,
    max_shard_bytes: int,
    start_index: int,
    work_options: dict | None = None,
) -> list[dict]:
    from streamtune.ingest import plan_shards
    from streamtune.manifest import read_manifest

    return plan_shards(
        read_manifest(manifest_url, work_options), max_shard_bytes=max_shard_bytes, start_index=start_index
    )


@task(
    name="write-shard",
    task_run_name="write-shard-{index:05d}",
    cache_policy=keyed(
        "shard",
        "manifest_hash",
        "plan",
        "out_prefix",
        outputs=lambda p: [join(p["out_prefix"], shard_name(p["plan"]["index"]))],
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
    work_options: dict | None = None,
) -> list[dict]:
    """Committed shards holding samples the manifest supersedes (changed or removed at the source)."""
    from streamtune.ingest import plan_rewrites, superseded_samples
    from streamtune.manifest import read_manifest

    stale = superseded_samples(read_manifest(manifest_url, work_options))
    return plan_rewrites(entries, stale, start_index=start_index) if stale else []


@task(
    name="rewrite-shard",
    task_run_name="rewrite-shard-{index:05d}",
    cache_policy=keyed(
        "shard",
        "entry",
        "plan",
        "out_prefix",
        outputs=lambda p: [join(p["out_prefix"], shard_name(p["plan"]["index"]))],
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
        "shard", "out_prefix", "checksums", "append", outputs=lambda p: [join(p["out_prefix"], "index.json")]
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
        outputs=lambda p: [join(p["out_prefix"], p["entry"]["path"])],
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
    """Decode one raw shard (audio -> Whisper transcript, image -> CLIP embedding + tags) into a feature shard."""
    from streamtune.decode.features import DecodeConfig, decode_shard

    cfg = DecodeConfig(**decode_settings)
    t0 = time.perf_counter()
    decoder, lock = shared_decoder(cfg)
    with lock:
        result = decode_shard(raw_prefix, entry, out_prefix, cfg, work_options, decoder=decoder)
    get_run_logger().info(
        "decoded %s in %.1fs: %s", entry["path"], time.perf_counter() - t0, result.get("stats")
    )
    return result


@task(
    name="commit-features",
    task_run_name="commit-features",
    cache_policy=keyed(
        "decode", "out_prefix", "checksums", outputs=lambda p: [join(p["out_prefix"], "index.json")]
    ),
    **task_options("commit"),
)
def commit_features_task(
    out_prefix: str, results: list[dict], checksums: list[str], work_options: dict | None = None
) -> dict:
    from streamtune.decode.features import commit_features

    index = commit_features(out_prefix, results, work_options)
    return {"shards": len(index["shards"]), "rows": index["rows"], "bytes": index["bytes"]}


ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def _local_adapter_dir(adapter_url: str) -> tuple[str, bool]:
    """Where the trainer writes (mlx-lm saves to a local folder); True when it must be uploaded after."""
    import hashlib
    import os
    import tempfile

    if "://" not in adapter_url or adapter_url.startswith("file://"):
        return adapter_url.removeprefix("file://"), False
    name = hashlib.sha256(adapter_url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "streamtune-adapters", name), True


def _warm_start(bundle: tuple, adapter_url: str, work_options: dict | None) -> bool:
    """Load the latest adapter weights into the freshly built model; False when there is none yet."""
    import mlx.core as mx

    from streamtune import storage

    url = storage.join(adapter_url, "adapters.safetensors")
    if not storage.exists(url, work_options):
        return False
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapters.safetensors")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(url, work_options))
        weights = mx.load(path)
    bundle[0].load_weights(list(weights.items()), strict=False)
    mx.eval(bundle[0].parameters())
    return True


@task(
    name="train-adapter",
    task_run_name="train-adapter",
    cache_policy=keyed(
        "train",
        "features_digest",
        "train_settings",
        "adapter_url",
        "resume_from",
        outputs=lambda p: [join(p["adapter_url"], "adapters.safetensors")],
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
) -> dict:
    """LoRA/QLoRA fine-tune on the streamed feature shards; save the adapter and its loss curve next to it.

    Checkpoints go under `checkpoint_url/<digest of this task's inputs>`, so a retry of this very task
    continues exactly where the crashed attempt stopped, while a run with other data or settings starts
    its own; `resume_from="latest"` starts from the adapter a previous run left.
    """
    import os

    import streamtune  # noqa: F401  (BLAS preload before MLX)
    from streamtune import CloudStreamingDataset, storage
    from streamtune.train.trainer import TrainArgs, setup_model, train
    from tasks.artifacts import ProgressArtifact, loss_curve_png

    log = get_run_logger()
    local_dir, upload = _local_adapter_dir(adapter_url)
    iters = int(train_settings["iters"])
    args = TrainArgs(
        **train_settings,
        adapter_path=local_dir,
        checkpoint_url=storage.join(
            checkpoint_url, digest(features_digest, train_settings, adapter_url, resume_from)[:16]
        ),
        storage_options=work_options,
        save_every=max(iters // 4, 1),
        resume=True,
    )
    bundle = setup_model(args)
    if resume_from == "latest":
        warm = _warm_start(bundle, adapter_url, work_options)
        log.info("warm start from %s" if warm else "no adapter at %s yet: starting fresh", adapter_url)
    dataset = CloudStreamingDataset(features_url, storage_options=work_options, shuffle=True, seed=args.seed)
    progress = ProgressArtifact(iters, f"Training {args.model} ({iters} steps)")

    def on_step(m: dict) -> None:
        progress.update(m["step"])
        if m["step"] == 1 or m["step"] % 10 == 0 or m["step"] == iters:
            log.info("step %d/%d loss %.4f %.0f tok/s", m["step"], iters, m["loss"], m["tokens_per_s"])

    result = train(args, dataset, on_step=on_step, model_bundle=bundle)
    progress.update(iters)
    png = loss_curve_png(result["losses"], f"{args.model} loss")
    with open(os.path.join(local_dir, "loss_curve.png"), "wb") as f:
        f.write(png)
    if upload:
        for name in (*ADAPTER_FILES, "loss_curve.png"):
            with open(os.path.join(local_dir, name), "rb") as f:
                storage.write_bytes(storage.join(adapter_url, name), f.read(), work_options)
    keep = (
        "steps",
        "loss_first",
        "loss_last",
        "losses",
        "tokens",
        "samples",
        "tokens_per_s",
        "seconds",
        "peak_mem_mb",
        "val_loss",
        "packed",
    )
    return {
        **{k: result.get(k) for k in keep},
        "adapter_path": adapter_url,
        "loss_curve": storage.join(adapter_url, "loss_curve.png"),
    }
