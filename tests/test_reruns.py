"""Reruns that tell the truth: a cached result is used only while the objects it points at are whole, and a
rerun's artifacts describe the data as it stands, separately from what the run did."""

import os
import types
import uuid

import pytest
import s3fs

import flows  # noqa: F401  (Prefect settings first)
from tasks import stages

TASKS = {
    # task: (parameters, stored result, objects it points at relative to tmp)
    "build_manifest_task": (
        {"source_url": "s", "manifest_prefix": "m", "fingerprint": "f", "exclude_digest": "e"},
        lambda d: {"url": f"{d}/m/manifest-1.parquet", "bytes": 5},
        ["m/manifest-1.parquet"],
    ),
    "write_shard_task": (
        lambda d: {"plan": {"index": 3}, "manifest_hash": "h", "out_prefix": f"{d}/shards"},
        lambda d: {"entry": {"path": "shard-00003.arrow", "bytes": 5}},
        ["shards/shard-00003.arrow"],
    ),
    "rewrite_shard_task": (
        lambda d: {"entry": {"path": "x"}, "plan": {"index": 4}, "out_prefix": f"{d}/shards"},
        lambda d: {"entry": {"path": "shard-00004.arrow", "bytes": 5}},
        ["shards/shard-00004.arrow"],
    ),
    "decode_shard_task": (
        lambda d: {"raw_checksum": "c", "decode_key": "k", "out_prefix": f"{d}/features", "entry": {"path": "shard-00001.arrow"}},
        lambda d: {"entry": {"path": "shard-00001.arrow", "bytes": 5}},
        ["features/shard-00001.arrow"],
    ),
    "commit_shards_task": (
        lambda d: {"out_prefix": f"{d}/shards", "checksums": ["a"], "append": False},
        lambda d: {"shards": 1},
        ["shards/index.json"],
    ),
    "commit_features_task": (
        lambda d: {"out_prefix": f"{d}/features", "checksums": ["a"], "clip_model": "ViT-B-32"},
        lambda d: {"shards": 1},
        ["features/index.json"],
    ),
    "train_task": (
        lambda d: {"features_digest": "f", "train_settings": {}, "adapter_url": f"{d}/adapters", "resume_from": "none"},
        lambda d: {"adapter_path": f"{d}/adapters/v1", "adapter_bytes": 5},
        ["adapters/v1/adapters.safetensors"],
    ),
}  # fmt: skip


def _resolve(value, d):
    return value(d) if callable(value) else value


@pytest.mark.parametrize("name", sorted(TASKS))
def test_cached_result_is_used_only_while_its_objects_are_whole(name, tmp_path):
    """One mechanism for every task that returns a pointer to storage: the stored result stands while the
    objects exist at their recorded size; gone or truncated, the task runs again under a key of its own."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    params, result, files = TASKS[name]
    d = str(tmp_path)
    params = _resolve(params, d)
    task = getattr(stages, name)
    from prefect.serializers import JSONSerializer

    store = ResultStore(
        result_storage=LocalFileSystem(basepath=str(tmp_path / "results")), serializer=JSONSerializer()
    )
    context = types.SimpleNamespace(result_store=store)
    key = task.cache_policy.compute_key(task_ctx=context, inputs=params, flow_parameters={})
    for f in files:
        os.makedirs(os.path.dirname(tmp_path / f), exist_ok=True)
        (tmp_path / f).write_bytes(b"12345")
    assert (
        task.cache_policy.compute_key(task_ctx=context, inputs=params, flow_parameters={}) == key
    )  # nothing stored
    store.write(obj=result(d), key=key)
    assert task.cache_policy.compute_key(task_ctx=context, inputs=params, flow_parameters={}) == key  # whole
    (tmp_path / files[0]).write_bytes(b"12")  # truncated (sizes are checked where a result records one)
    truncated = task.cache_policy.compute_key(task_ctx=context, inputs=params, flow_parameters={})
    os.remove(tmp_path / files[0])
    gone = task.cache_policy.compute_key(task_ctx=context, inputs=params, flow_parameters={})
    assert gone != key and gone.startswith(key + "-rerun-")
    if "bytes" in str(result(d)):
        assert truncated != key


def _params(bucket: str, work: str, **extra) -> dict:
    return {"source_url": f"{bucket}/raw", "work_url": work, "shard": {"max_shard_bytes": 400},
            "skip": ["decode", "train"], **extra}  # fmt: skip


def _source(fs: s3fs.S3FileSystem, bucket: str) -> None:
    for i in range(4):
        fs.pipe(f"{bucket[5:]}/raw/s{i}.txt", f"Sample {i} says hello to the model. ".encode() * 6)
    fs.pipe(f"{bucket[5:]}/raw/latin.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    fs.pipe(f"{bucket[5:]}/raw/blob.bin", os.urandom(64))  # not a medium


def _task_states(flow_run_id: str) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id] + [str(c.id) for c in children]
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": ids}), task_run_filter=TaskRunFilter()
        )
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r.state.name)
    return out


def test_fresh_bucket_at_the_same_urls_rebuilds_instead_of_trusting_the_cache(s3server, monkeypatch):
    from flows.pipeline import PipelineParams, pipeline

    monkeypatch.setenv("STREAMTUNE_RETRY_DELAY_S", "0")
    for k, v in s3server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3server.create_bucket(f"rerun-{uuid.uuid4().hex[:8]}")
    fs = s3fs.S3FileSystem(**s3server.storage_options)
    _source(fs, bucket)
    params = PipelineParams(**_params(bucket, f"{bucket}/work"))
    first = pipeline(params)
    rows = first["data"]["shards"]["rows"]
    assert first["shards"] >= 2 and rows >= 4 and first["data"]["quarantined"] == 2

    # the same parameters again: nothing new, and the run says so, while the data state still shows everything
    again = pipeline(params)
    assert again["shards"] == 0 and "0 shards written" in again["run"]["headline"]
    assert again["data"]["shards"]["rows"] == rows and again["data"]["quarantined"] == 2
    states = _task_states(again["flow_run_id"])
    assert states["build-manifest"] == ["Cached"] and set(states["commit-shards"]) <= {"Cached"}

    # a fresh bucket at the same URLs: every cached pointer is stale, so the stages run again and succeed
    fs.rm(f"{bucket[5:]}/work", recursive=True)
    fs.invalidate_cache()
    rebuilt = pipeline(params)
    states = _task_states(rebuilt["flow_run_id"])
    assert states["build-manifest"] == ["Completed"], states
    assert all(s == "Completed" for name, ss in states.items() if name.startswith("write-shard") for s in ss)
    assert rebuilt["data"]["shards"]["rows"] == rows and rebuilt["data"]["quarantined"] == 2
    assert fs.exists(f"{bucket[5:]}/work/shards/index.json")


def test_artifacts_tell_the_state_and_the_run_apart(s3server, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.pipeline import PipelineParams, pipeline

    for k, v in s3server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3server.create_bucket(f"story-{uuid.uuid4().hex[:8]}")
    _source(s3fs.S3FileSystem(**s3server.storage_options), bucket)
    params = PipelineParams(**_params(bucket, f"{bucket}/work"))
    pipeline(params)
    noop = pipeline(params)  # everything cached
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[noop["flow_run_id"]]))
        )
        names = {
            f.name
            for f in client.read_flow_runs()
            if f.parent_task_run_id and f.name.startswith(noop["flow_run_name"])
        }
    by_key = {a.key: a for a in arts}
    assert "quarantine" in by_key and "nothing" not in by_key["quarantine"].description
    assert "2 (" in by_key["quarantine"].description and "encoding" in by_key["quarantine"].description
    assert f"{noop['data']['shards']['rows']} rows" in by_key["shard-set"].description
    summary = by_key["run-summary"].data
    assert "0 shards written" in summary and "samples" in summary and "3.26110" not in summary
    assert (
        "decode-stats" not in by_key
    )  # nothing was decoded by this run: no decode numbers pretend otherwise
    assert {f"{noop['flow_run_name']}-manifest", f"{noop['flow_run_name']}-shard"} <= names
