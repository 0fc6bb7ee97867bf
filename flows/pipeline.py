"""The pipeline flow: manifest -> shards -> decode -> train, one subflow per stage.

Every task persists its (small, JSON) result under a content cache key, so retrying a failed flow run or
running the same parameters again skips whatever finished and redoes only what failed. To force a stage to
run again, pass its name in `force` (e.g. `force: [decode]`), or set PREFECT_TASKS_REFRESH_CACHE=true to
recompute everything.
"""

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run as current_flow_run

from flows.params import PipelineParams, Stage
from streamtune.storage import join as storage_join
from tasks import artifacts
from tasks.cache import digest, prefix_key
from tasks.policy import TRAIN_TAG, ensure_concurrency_limits, model_tag, work_lock_name
from tasks.settings import save_result_storage_block
from tasks.stages import (
    build_manifest_task,
    commit_features_task,
    commit_shards_task,
    data_state_task,
    decode_shard_task,
    export_task,
    index_task,
    list_source_task,
    plan_rewrites_task,
    plan_shards_task,
    read_shard_set_task,
    rewrite_shard_task,
    shard_checksums,
    train_task,
    write_shard_task,
)

__all__ = ["PipelineParams", "Stage", "pipeline", "serve"]


def _refresh(task, stage: str, params: PipelineParams):
    return task.with_options(refresh_cache=True) if stage in params.force else task


def _flow_run_name() -> str:
    return f"streamtune-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="manifest", flow_run_name="manifest", persist_result=True, result_serializer="json")
def manifest_flow(params: PipelineParams) -> dict:
    """List the source, skipping objects already in the shard set when incremental; write the manifest."""
    so, wo = params.source_options or None, params.work_options or None
    listing = list_source_task(params.source_url, params.url("shards"), params.incremental, so, wo)
    result = _refresh(build_manifest_task, "manifest", params)(
        params.source_url,
        params.url("manifests"),
        fingerprint=listing["fingerprint"],
        exclude_digest=listing["exclude_digest"],
        shards_prefix=params.url("shards") if params.incremental else None,
        id_column=params.shard.id_column,
        source_options=so,
        work_options=wo,
    )
    artifacts.manifest_artifact(result["summary"], result["url"], params.incremental)
    return result


@flow(name="shard", flow_run_name="shard", persist_result=True, result_serializer="json")
def shard_flow(params: PipelineParams, manifest: dict) -> dict:
    """Plan shards from the manifest and write them as mapped tasks; in incremental runs also write again the
    committed shards that hold superseded samples. Commit the index once all exist."""
    wo = params.work_options or None
    out = params.url("shards")
    state = read_shard_set_task(out, "shards", wo) if params.incremental else None
    start = state["next_index"] if state else 0
    plans = plan_shards_task(
        manifest["url"], manifest["hash"], params.shard.max_shard_bytes, start, work_options=wo,
        inline_max_bytes=params.shard.inline_max_bytes,
    )  # fmt: skip
    rewrites: list[dict] = []
    committed: dict[str, dict] = {}
    if state and manifest["summary"].get("superseded_samples"):
        committed = {e["path"]: e for e in state["entries"]}
        rewrites = plan_rewrites_task(
            manifest["url"],
            manifest["hash"],
            list(committed.values()),
            digest(sorted((path, e["checksum"]) for path, e in committed.items())),
            start + len(plans),
            out_prefix=prefix_key(out),
            work_options=wo,
        )
    if not plans and not rewrites:
        get_run_logger().info("nothing new to shard")
        return {"new_shards": [], "cached_shards": 0, "quarantine": manifest["quarantine"], "bytes": 0}
    rewritten, rewrite_futures = [], []
    if rewrites:
        rewrite = _refresh(rewrite_shard_task, "shard", params)
        rewrite_futures = rewrite.map(
            index=[p["index"] for p in rewrites],
            entry=[committed[p["replaces"]] for p in rewrites],
            plan=rewrites,
            out_prefix=unmapped(prefix_key(out)),
            work_options=unmapped(wo),
        )
        rewritten = rewrite_futures.result()
    write = _refresh(write_shard_task, "shard", params)
    futures = write.map(
        index=[p["index"] for p in plans],
        plan=plans,
        source_url=unmapped(params.source_url),
        manifest_url=unmapped(manifest["url"]),
        manifest_hash=unmapped(manifest["hash"]),
        out_prefix=unmapped(prefix_key(out)),
        source_options=unmapped(params.source_options or None),
        work_options=unmapped(wo),
    )
    results = futures.result() + rewritten
    commit = _refresh(commit_shards_task, "shard", params)
    commit(
        prefix_key(out),
        results,
        shard_checksums(results),
        append=params.incremental,
        problems=manifest["quarantine"],
        work_options=wo,
    )
    states = [f.state.name for f in [*futures, *rewrite_futures]]
    ran = [r for r, state in zip(futures.result() + rewritten, states, strict=True) if state != "Cached"]
    entries = [r["entry"] for r in ran if r["entry"] is not None]
    quarantine = list(manifest["quarantine"]) + [q for r in results for q in r["quarantine"]]
    return {
        "new_shards": [e["path"] for e in entries],
        "cached_shards": len(results) - len(ran),
        "replaced_shards": [r["replaces"] for r in rewritten],
        "quarantine": quarantine,
        "bytes": sum(int(e["bytes"]) for e in entries),
    }


def _task_runner(params: PipelineParams):
    """The decode fan-out's runner: threads in this process, or an existing/local Dask cluster, or Ray."""
    try:
        if params.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            if params.dask_address:
                return DaskTaskRunner(address=params.dask_address)
            return DaskTaskRunner(
                cluster_class="distributed.LocalCluster",
                cluster_kwargs={"n_workers": params.dask_workers, "threads_per_worker": 1, "processes": True},
            )
        if params.task_runner == "ray":
            from prefect_ray import RayTaskRunner

            return RayTaskRunner()
    except ImportError as e:
        package = "prefect-dask" if params.task_runner == "dask" else "prefect-ray"
        raise RuntimeError(
            f"task_runner={params.task_runner!r} needs {package}: pip install {package}"
        ) from e
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=params.decode_concurrency)


def shard_number(path: str) -> int:
    return int(path.split("-")[1].split(".")[0])


@flow(name="decode", flow_run_name="decode", persist_result=True, result_serializer="json")
def decode_flow(params: PipelineParams) -> dict:
    """Decode every committed raw shard as mapped tasks and commit the feature index.

    Shards decoded by an earlier run come back from the cache (state Cached) without loading a model, so
    an incremental run does model work only for its new shards.
    """
    wo = params.work_options or None
    raw, out = prefix_key(params.url("shards")), prefix_key(params.url("features"))
    state = read_shard_set_task(raw, "shards", wo)
    if not state["committed"]:
        get_run_logger().info("no raw shards yet")
        return {"decoded": {"audio": 0, "image": 0}, "quarantine": [], "stats": {}, "new_shards": []}
    entries = state["entries"]
    if not params.decode.clip_pretrained:
        get_run_logger().warning(
            "CLIP runs with random weights (decode.clip_pretrained is not set): image embeddings are valid "
            "vectors but zero-shot tags mean nothing; set decode.clip_pretrained to a checkpoint or hub tag"
        )
    settings = params.decode.model_dump()
    decode_key = params.decode.key()
    decode = _refresh(decode_shard_task, "decode", params)
    decode = decode.with_options(
        tags=[*decode.tags, model_tag(params.decode.whisper_model), model_tag(params.decode.clip_model)]
    )
    t0 = time.perf_counter()
    futures = decode.map(
        index=[shard_number(e["path"]) for e in entries],
        raw_prefix=unmapped(raw),
        entry=entries,
        raw_checksum=[e["checksum"] for e in entries],
        out_prefix=unmapped(out),
        decode_settings=unmapped(settings),
        decode_key=unmapped(decode_key),
        work_options=unmapped(wo),
    )
    results = futures.result()
    seconds = time.perf_counter() - t0
    fresh = [
        r for r, f in zip(results, futures, strict=True) if f.state.name != "Cached" and not r.get("skipped")
    ]
    commit = _refresh(commit_features_task, "decode", params)
    checksums = [f"{r['entry']['path']}:{r['entry']['checksum']}" for r in results]
    commit(out, results, checksums, work_options=wo, clip_model=params.decode.clip_model)
    stats = merge_stats([r.get("stats") or {} for r in fresh])
    stats["seconds"] = round(seconds, 2)
    by_path = {e["path"]: e for e in entries}
    stats["raw_bytes"] = sum(int(by_path.get(r["entry"]["path"], {}).get("bytes", 0)) for r in fresh)
    quarantine = [q for r in fresh for q in r.get("quarantine") or []]
    if fresh:
        artifacts.decode_artifact(stats, decoded_counts(stats, quarantine))
    return {
        "decoded": decoded_counts(stats, quarantine),
        "stats": stats,
        "quarantine": quarantine,
        "new_shards": [r["entry"]["path"] for r in fresh],
        "cached_shards": len(results) - len(fresh),
    }


def decoded_counts(stats: dict, quarantine: list[dict]) -> dict[str, int]:
    """Audio files transcribed and images embedded (files that failed to decode are not counted)."""
    bad_audio = {q.get("sample_id") for q in quarantine if q.get("modality") == "audio"}
    return {"audio": int(stats.get("audio_files", 0)) - len(bad_audio), "image": int(stats.get("images", 0))}


def merge_stats(stats: list[dict]) -> dict:
    total: dict[str, Any] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()}


@flow(name="index", flow_run_name="index", persist_result=True, result_serializer="json")
def index_flow(params: PipelineParams) -> dict:
    """Build or update the search index beside the features (WORK_URL/index); publishes counts and sample hits."""
    wo = params.work_options or None
    features = prefix_key(params.url("features"))
    state = read_shard_set_task(features, "features", wo)
    if not state["committed"]:
        get_run_logger().info("no features yet: nothing to index")
        return {}
    settings = params.index.model_dump(mode="json")
    settings["clip_model"] = settings["clip_model"] or params.decode.clip_model
    settings["clip_pretrained"] = settings["clip_pretrained"] or params.decode.clip_pretrained
    task_state = _refresh(index_task, "index", params)(
        features_url=features,
        features_digest=digest([(e["path"], e["checksum"]) for e in state["entries"]]),
        index_url=params.url("index"),
        index_settings=settings,
        work_options=wo,
        return_state=True,
    )
    result = dict(task_state.result())
    result["cached"] = task_state.name == "Cached"
    if not result["cached"]:
        artifacts.index_artifact(result)
    return result


@flow(name="train", flow_run_name="train", persist_result=True, result_serializer="json")
def train_flow(params: PipelineParams) -> dict:
    """Fine-tune on the committed features (one training at a time: the `streamtune-train` tag limit)."""
    wo = params.work_options or None
    features = prefix_key(params.url("features"))
    state = read_shard_set_task(features, "features", wo)
    if not state["committed"]:
        get_run_logger().info("no features yet: nothing to train on")
        return {}
    features_digest = digest([(e["path"], e["checksum"]) for e in state["entries"]])
    train = _refresh(train_task, "train", params)
    if params.retrain_unchanged:
        train = train.with_options(refresh_cache=True)
    train = train.with_options(tags=[*train.tags, TRAIN_TAG, model_tag(params.train.model)])
    settings = params.train.model_dump(mode="json", exclude={"storage_options"})
    if params.train.stage == "instruct" and params.align_iters:
        # stage 1 on its own task and adapter folder: cached, so later runs reuse it while its inputs stand
        aligned = train.with_options(task_run_name="train-align")(
            features_url=features,
            features_digest=features_digest,
            train_settings={**settings, "stage": "align", "iters": params.align_iters},
            adapter_url=storage_join(params.adapter_url, "align"),
            checkpoint_url=params.checkpoint_url,
            work_options=wo,
            label="align",
        )
        settings["init_adapter"] = aligned["adapter_path"]
    state = train(
        features_url=features,
        features_digest=features_digest,
        train_settings=settings,
        adapter_url=params.adapter_url,
        checkpoint_url=params.checkpoint_url,
        resume_from=params.resume_from,
        work_options=wo,
        return_state=True,
    )
    result = dict(state.result())
    result["cached"] = state.name == "Cached"
    if result["cached"]:
        get_run_logger().info(
            "training skipped: features and settings are unchanged since the run that trained %s "
            "(set retrain_unchanged: true to train again)",
            result["adapter_path"],
        )
    return result


@flow(
    name="streamtune-pipeline",
    flow_run_name=_flow_run_name,
    persist_result=True,
    result_serializer="json",
    log_prints=True,
)
def pipeline(params: PipelineParams) -> dict:
    """Manifest -> shard -> decode -> train. Returns the run summary (the fields of summary.json)."""
    t0 = time.perf_counter()
    per_model = params.decode_concurrency
    if params.task_runner != "threads":  # every worker process holds its own copy of the models
        per_model = max(per_model, params.dask_workers)
    limits = {
        model_tag(params.decode.whisper_model): per_model,
        model_tag(params.decode.clip_model): per_model,
        TRAIN_TAG: 1,
    }
    lock = work_lock_name(params.work_url)
    ensure_concurrency_limits(limits, exclusive=[lock])
    with concurrency(lock, occupy=1):  # one run at a time per work prefix (others wait here)
        return _stages(params, t0)


def _stages(params: PipelineParams, t0: float) -> dict:
    log = get_run_logger()
    name = current_flow_run.name or "streamtune"

    def stage(subflow, *args, after=None):
        return subflow.with_options(flow_run_name=f"{name}-{subflow.name}")(
            *args, wait_for=after, return_state=True
        )

    manifest_state = stage(manifest_flow, params)
    manifest = manifest_state.result()
    shards_state = stage(shard_flow, params, manifest, after=[manifest_state])
    shards = shards_state.result()
    last = [shards_state]
    decoded = {"decoded": {"audio": 0, "image": 0}, "quarantine": [], "stats": {}, "new_shards": []}
    decoded |= {"cached_shards": 0, "skipped": True}
    if params.runs("decode"):
        decode = decode_flow.with_options(task_runner=_task_runner(params))
        last = [stage(decode, params, after=last)]
        decoded = last[0].result()
    indexed: dict[str, Any] = {}
    if params.runs("index"):
        index_state = stage(index_flow, params, after=last)
        indexed = index_state.result()
    train: dict[str, Any] = {}
    if params.runs("train"):
        train = stage(train_flow, params, after=last).result()  # unchanged inputs: the cached result
    exports = []
    if params.export and train.get("adapter_path"):
        version = train["adapter_path"].rstrip("/").rsplit("/", 1)[-1]
        for fmt in params.export:
            out = params.url("exports", version, fmt)
            exports.append(
                export_task(train["adapter_path"], params.train.model, fmt, out, params.work_options or None)
            )
    quarantined = len(shards["quarantine"]) + len(decoded["quarantine"])
    summary = {
        "samples": manifest["summary"]["samples"],
        "shards": len(shards["new_shards"]),
        "shard_names": shards["new_shards"],
        "decoded": decoded["decoded"],
        "quarantined": quarantined,
        "train": {k: train.get(k) for k in ("steps", "loss_first", "loss_last", "val_loss", "tokens_per_s")},
        "adapter_path": train.get("adapter_path") or params.adapter_url,
        "model": params.train.model,
        "flow_run_id": str(current_flow_run.id),
        "flow_run_name": name,
        "bytes_streamed": shards["bytes"],
        "audio_seconds": decoded["stats"].get("audio_seconds", 0),
        "images_embedded": decoded["decoded"]["image"],
        "features": decoded["stats"].get("features", 0),
        "index": {k: indexed[k] for k in ("rows", "embedded", "reused", "bytes", "cached") if k in indexed},
        "seconds": round(time.perf_counter() - t0, 1),
        "urls": {
            "source": params.source_url,
            "manifest": manifest["url"],
            "shards": params.url("shards"),
            "features": params.url("features"),
            "index": params.url("index"),
            "adapter": train.get("adapter_path") or params.adapter_url,
            "adapters": params.adapter_url,
            "checkpoints": params.checkpoint_url,
        },
    }
    summary["exports"] = {e["format"]: e["out"] for e in exports}
    summary["run"] = run_story(params, manifest, shards, decoded, train)
    state = data_state_task(params.work_url, wo=params.work_options or None)
    summary["data"] = {k: v for k, v in state.items() if k != "quarantine"}
    summary["data"]["quarantined"] = len(state["quarantine"])
    artifacts.data_state_artifacts(state)
    artifacts.run_summary_artifact(summary, decoded["stats"], train, state)
    log.info("%s", summary["run"]["headline"])
    return summary


def run_story(params: PipelineParams, manifest: dict, shards: dict, decoded: dict, train: dict) -> dict:
    """What this run did, stage by stage, in words (the run page and summary.json say the same)."""
    listed = manifest["summary"]["samples"]
    new = len(shards["new_shards"])
    if decoded.get("skipped"):
        decode = "skipped (skip: [decode])"
    elif decoded["new_shards"] or not decoded["cached_shards"]:
        decode = f"{len(decoded['new_shards'])} shards decoded, {decoded['cached_shards']} unchanged (cached)"
    else:
        decode = f"cached: all {decoded['cached_shards']} shards unchanged"
    if not params.runs("train"):
        training = "skipped (skip: [train])"
    elif not train:
        training = "skipped: no features to train on"
    elif train.get("cached"):
        training = (
            "skipped: features and settings unchanged (the adapter of the run that trained them stands)"
        )
    else:
        training = f"{train.get('steps')} steps"
    scope = "new or changed samples" if params.incremental else "samples listed"
    headline = f"{listed} {scope}; {new} shards written; decode {decode}; training {training}"
    return {"samples_listed": listed, "shards_written": new, "decode": decode, "training": training,
            "headline": headline}  # fmt: skip


def serve(
    cron: str = "0 3 * * *",
    parameters: dict | None = None,
    name: str = "streamtune-scheduled",
    timezone: str = "UTC",
) -> None:
    """Serve the pipeline on this machine (Prefect `flow.serve`): a cron-scheduled deployment (in `timezone`)
    whose runs are incremental and continue from the latest adapter unless `parameters` say otherwise. One
    run of it at a time; runs on the same work prefix also wait for each other (`work_lock_name`)."""
    from prefect.schedules import Cron

    params = {"incremental": True, "resume_from": "latest", **(parameters or {})}
    PipelineParams.model_validate(params)  # a wrong key fails here, not at 3 a.m.
    save_result_storage_block()  # no-op unless STREAMTUNE_RESULT_STORAGE is a remote URL
    pipeline.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"params": params},
        tags=["streamtune"],
        global_limit=1,
    )
