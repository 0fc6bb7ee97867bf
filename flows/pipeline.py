"""The pipeline flow: manifest -> shards -> decode -> train, one subflow per stage.

Every task persists its (small, JSON) result under a content cache key, so retrying a failed flow run or
running the same parameters again skips whatever finished and redoes only what failed. To force a stage to
run again, pass its name in `force` (e.g. `force: [decode]`), or set PREFECT_TASKS_REFRESH_CACHE=true to
recompute everything.
"""

import time
from typing import Any, Literal

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel, Field, field_validator

import flows  # noqa: F401  (applies the Prefect settings defaults first)
from flows.settings import save_result_storage_block
from tasks import artifacts
from tasks.cache import digest, prefix_key, source_fingerprint
from tasks.policy import TRAIN_TAG, ensure_concurrency_limits, model_tag
from tasks.stages import (
    build_manifest_task,
    commit_features_task,
    commit_shards_task,
    decode_shard_task,
    plan_rewrites_task,
    plan_shards_task,
    rewrite_shard_task,
    shard_checksums,
    train_task,
    write_shard_task,
)

Stage = Literal["manifest", "shard", "decode", "train"]
SECRET_OPTIONS = {
    "key",
    "secret",
    "token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "session_token",
    "secret_key",
    "access_key",
}


class PipelineParams(BaseModel):
    """Pipeline parameters (the Prefect UI renders this as the run form). Credentials never go here: they
    come from the AWS environment of the worker (or a profile named in the options)."""

    source_url: str = Field(
        description="Where the raw objects are: s3://bucket/prefix, a folder, any fsspec URL"
    )
    work_url: str = Field(description="Prefix for manifests, shards, features, adapters and checkpoints")
    source_options: dict[str, Any] = Field(default_factory=dict, description="Non-secret storage options")
    work_options: dict[str, Any] = Field(default_factory=dict, description="Non-secret storage options")
    max_shard_bytes: int = Field(64 << 20, gt=0)
    # decode
    whisper_model: str = "offline:tiny.en"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = Field(None, description="open_clip tag or a local checkpoint path")
    labels: list[str] = Field(
        default_factory=list, description="Zero-shot tag vocabulary; empty: the default"
    )
    decode_concurrency: int = Field(1, ge=1, description="Decode tasks at once per model, across runs")
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    dask_address: str | None = Field(None, description="Existing Dask scheduler; default a LocalCluster")
    dask_workers: int = Field(2, ge=1)
    # train
    train: bool = True
    model: str = "offline:smollm2"
    qlora: bool = False
    rank: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    iters: int = Field(50, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=16)
    seed: int = 0
    adapter_subpath: str = "adapters"
    adapter_path: str | None = Field(None, description="Adapter folder; default work_url/adapter_subpath")
    # scheduling
    incremental: bool = Field(False, description="Only objects new since the last committed shard set")
    resume_from: Literal["none", "latest"] = "none"
    force: list[Stage] = Field(
        default_factory=list, description="Stages to recompute, ignoring cached results"
    )

    @field_validator("source_options", "work_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = sorted(SECRET_OPTIONS & {k.lower() for k in value})
        if found:
            raise ValueError(
                f"storage options must not carry credentials ({', '.join(found)}); use the AWS env"
            )
        return value

    def url(self, *parts: str) -> str:
        from streamtune.storage import join

        return join(self.work_url, *parts)

    @property
    def adapter_url(self) -> str:
        return self.adapter_path or self.url(self.adapter_subpath)

    def train_settings(self) -> dict[str, Any]:
        keys = ("model", "qlora", "rank", "lr", "iters", "batch_size", "seq_len", "seed")
        return {k: getattr(self, k) for k in keys}

    def decode_settings(self) -> dict[str, Any]:
        return {
            "whisper_model": self.whisper_model,
            "clip_model": self.clip_model,
            "clip_pretrained": self.clip_pretrained,
            **({"labels": list(self.labels)} if self.labels else {}),
        }


def _refresh(task, stage: str, params: PipelineParams):
    return task.with_options(refresh_cache=True) if stage in params.force else task


def _flow_run_name() -> str:
    return f"streamtune-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="manifest", flow_run_name="manifest", persist_result=True, result_serializer="json")
def manifest_flow(params: PipelineParams) -> dict:
    """List the source, skipping objects already in the shard set when incremental; write the manifest."""
    from streamtune.ingest import ingested_sources

    so, wo = params.source_options or None, params.work_options or None
    exclude = ingested_sources(params.url("shards"), wo) if params.incremental else {}
    result = _refresh(build_manifest_task, "manifest", params)(
        params.source_url,
        params.url("manifests"),
        fingerprint=source_fingerprint(params.source_url, so),
        exclude_digest=digest(sorted(exclude.items())),
        exclude=exclude,
        source_options=so,
        work_options=wo,
    )
    artifacts.manifest_artifact(result["summary"], result["url"])
    return result


@flow(name="shard", flow_run_name="shard", persist_result=True, result_serializer="json")
def shard_flow(params: PipelineParams, manifest: dict) -> dict:
    """Plan shards from the manifest and write them as mapped tasks; in incremental runs also write again the
    committed shards that hold superseded samples. Commit the index once all exist."""
    from streamtune import storage
    from streamtune.ingest import next_shard_index
    from streamtune.shards import read_index

    wo = params.work_options or None
    out = params.url("shards")
    start = next_shard_index(out, wo) if params.incremental else 0
    plans = plan_shards_task(
        manifest["url"], manifest["hash"], params.max_shard_bytes, start, work_options=wo
    )
    rewrites: list[dict] = []
    committed: dict[str, dict] = {}
    if params.incremental and manifest["summary"].get("superseded_samples"):
        if storage.exists(storage.join(out, "index.json"), wo):
            committed = {e["path"]: e for e in read_index(out, wo)["shards"]}
        rewrites = plan_rewrites_task(
            manifest["url"],
            manifest["hash"],
            list(committed.values()),
            digest(sorted((path, e["checksum"]) for path, e in committed.items())),
            start + len(plans),
            work_options=wo,
        )
    if not plans and not rewrites:
        get_run_logger().info("nothing new to shard")
        return {"new_shards": [], "quarantine": manifest["quarantine"], "bytes": 0}
    rewritten = []
    if rewrites:
        rewrite = _refresh(rewrite_shard_task, "shard", params)
        rewritten = rewrite.map(
            index=[p["index"] for p in rewrites],
            entry=[committed[p["replaces"]] for p in rewrites],
            plan=rewrites,
            out_prefix=unmapped(prefix_key(out)),
            work_options=unmapped(wo),
        ).result()
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
    entries = [r["entry"] for r in results if r["entry"] is not None]
    artifacts.shard_table_artifact(entries)
    quarantine = list(manifest["quarantine"]) + [q for r in results for q in r["quarantine"]]
    return {
        "new_shards": [e["path"] for e in entries],
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
    from streamtune import storage
    from streamtune.decode.features import DecodeConfig
    from streamtune.shards import read_index

    wo = params.work_options or None
    raw, out = prefix_key(params.url("shards")), prefix_key(params.url("features"))
    if not storage.exists(storage.join(raw, "index.json"), wo):
        get_run_logger().info("no raw shards yet")
        return {"decoded": {"audio": 0, "image": 0}, "quarantine": [], "stats": {}, "new_shards": []}
    entries = read_index(raw, wo)["shards"]
    settings = params.decode_settings()
    decode_key = DecodeConfig(**settings).key()
    decode = _refresh(decode_shard_task, "decode", params)
    decode = decode.with_options(
        tags=[*decode.tags, model_tag(params.whisper_model), model_tag(params.clip_model)]
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
    commit(out, results, [f"{r['entry']['path']}:{r['entry']['checksum']}" for r in results], work_options=wo)
    stats = merge_stats([r.get("stats") or {} for r in fresh])
    stats["seconds"] = round(seconds, 2)
    quarantine = [q for r in fresh for q in r.get("quarantine") or []]
    artifacts.decode_artifact(stats)
    artifacts.shard_table_artifact([r["entry"] for r in results], key="feature-shard-table")
    return {
        "decoded": decoded_counts(stats, quarantine),
        "stats": stats,
        "quarantine": quarantine,
        "new_shards": [r["entry"]["path"] for r in fresh],
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


@flow(name="train", flow_run_name="train", persist_result=True, result_serializer="json")
def train_flow(params: PipelineParams) -> dict:
    """Fine-tune on the committed features (one training at a time: the `streamtune-train` tag limit)."""
    from streamtune import storage
    from streamtune.shards import read_index

    wo = params.work_options or None
    features = prefix_key(params.url("features"))
    index = read_index(features, wo)
    features_digest = digest([(e["path"], e["checksum"]) for e in index["shards"]])
    train = _refresh(train_task, "train", params)
    train = train.with_options(tags=[*train.tags, TRAIN_TAG, model_tag(params.model)])
    result = train(
        features_url=features,
        features_digest=features_digest,
        train_settings=params.train_settings(),
        adapter_url=params.adapter_url,
        checkpoint_url=params.url("checkpoints"),
        resume_from=params.resume_from,
        work_options=wo,
    )
    png_url = storage.join(params.adapter_url, "loss_curve.png")
    artifacts.loss_curve_artifact(storage.read_bytes(png_url, wo), png_url, result)
    artifacts.adapter_artifact(result["adapter_path"])
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
    log = get_run_logger()
    t0 = time.perf_counter()
    per_model = params.decode_concurrency
    if params.task_runner != "threads":  # every worker process holds its own copy of the models
        per_model = max(per_model, params.dask_workers)
    limits = {
        model_tag(params.whisper_model): per_model,
        model_tag(params.clip_model): per_model,
        TRAIN_TAG: 1,
    }
    ensure_concurrency_limits(limits)
    manifest = manifest_flow(params)
    shards = shard_flow(params, manifest)
    decode_runner = _task_runner(params)
    decoded = decode_flow.with_options(task_runner=decode_runner)(params)
    train: dict[str, Any] = {}
    if params.train and _has_features(params):
        train = train_flow(params)  # unchanged features and settings: the cached result, no new steps
    quarantined = len(shards["quarantine"]) + len(decoded["quarantine"])
    summary = {
        "samples": manifest["summary"]["samples"],
        "shards": len(shards["new_shards"]),
        "shard_names": shards["new_shards"],
        "decoded": decoded["decoded"],
        "quarantined": quarantined,
        "train": {k: train.get(k) for k in ("steps", "loss_first", "loss_last", "tokens_per_s")},
        "adapter_path": train.get("adapter_path") or params.adapter_url,
        "model": params.model,
        "flow_run_id": str(current_flow_run.id),
        "bytes_streamed": shards["bytes"],
        "audio_seconds": decoded["stats"].get("audio_seconds", 0),
        "images_embedded": decoded["decoded"]["image"],
        "features": decoded["stats"].get("features", 0),
        "seconds": round(time.perf_counter() - t0, 1),
        "urls": {
            "source": params.source_url,
            "manifest": manifest["url"],
            "shards": params.url("shards"),
            "features": params.url("features"),
            "adapter": params.adapter_url,
            "checkpoints": params.url("checkpoints"),
        },
    }
    artifacts.quarantine_artifact(shards["quarantine"] + decoded["quarantine"])
    artifacts.throughput_artifact(throughput_rows(summary, decoded["stats"], train))
    log.info("pipeline summary: %s", {k: summary[k] for k in ("samples", "shards", "decoded", "quarantined")})
    return summary


def _has_features(params: PipelineParams) -> bool:
    from streamtune import storage

    return storage.exists(params.url("features", "index.json"), params.work_options or None)


def throughput_rows(summary: dict, decode_stats: dict, train: dict) -> list[dict]:
    rows = [{"stage": "shard", "metric": "bytes", "value": summary["bytes_streamed"]}]
    if decode_stats.get("seconds"):
        n = summary["decoded"]["audio"] + summary["decoded"]["image"]
        rows.append(
            {"stage": "decode", "metric": "samples/s", "value": round(n / decode_stats["seconds"], 2)}
        )
    if train.get("tokens_per_s"):
        rows.append({"stage": "train", "metric": "tokens/s", "value": round(train["tokens_per_s"], 1)})
    return rows


def serve(
    cron: str = "0 3 * * *", parameters: dict | None = None, name: str = "streamtune-scheduled"
) -> None:
    """Serve the pipeline on this machine (Prefect `flow.serve`): a cron-scheduled deployment whose runs are
    incremental and continue from the latest adapter unless `parameters` say otherwise."""
    params = {"incremental": True, "resume_from": "latest", **(parameters or {})}
    save_result_storage_block()  # no-op unless STREAMTUNE_RESULT_STORAGE is a remote URL
    pipeline.serve(name=name, cron=cron, parameters={"params": params}, tags=["streamtune"])
