"""Multimodal training as a pipeline run: generated drawings and voices on a loopback S3 server, decoded
into encoder tokens, then stage 1 (projectors) and stage 2 (projectors + LoRA) as cached, retryable tasks.
A second run with the same inputs reuses both; the artifacts carry both stages' loss curves."""

import json

import pytest
from corpus import tiny_clip_config

from streamtune.decode.clip import save_random_checkpoint
from streamtune.demo.data import upload_dir
from streamtune.demo.multimodal import write_source
from streamtune.train.synthetic import write_random_model

pytestmark = pytest.mark.slow

TEMPLATE = {
    "prompt": "{image}\n{audio}\n{meta_question}",
    "completion": "{meta_answer}",
    "system": "Be brief.",
}


def _task_runs(flow_run_id: str) -> dict[str, list]:
    """{task run name: [task runs]} of a flow run and its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter

    with get_client(sync_client=True) as client:
        ids, todo = [flow_run_id], [flow_run_id]
        while todo:  # subflows of subflows (pipeline -> train -> ...)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo))
            )
            todo = [str(c.id) for c in children]
            ids += todo
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": ids}), task_run_filter=TaskRunFilter()
        )
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r)
    return out


def _artifact_keys(flow_run_id: str) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="loss-curve"))
        )
    return {a.key for a in arts if str(a.flow_run_id) in _flow_ids(flow_run_id)}


def _flow_ids(flow_run_id: str) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, todo = {flow_run_id}, [flow_run_id]
    with get_client(sync_client=True) as client:
        while todo:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo))
            )
            todo = [str(c.id) for c in children]
            ids |= set(todo)
    return ids


def test_two_stages_run_as_cached_tasks_and_a_rerun_reuses_them(s3server, tmp_path, monkeypatch):
    from flows.pipeline import PipelineParams, pipeline
    from streamtune import storage

    for k, v in s3server.env().items():
        monkeypatch.setenv(k, v)
    write_source(str(tmp_path / "source"), images=4, audio=4)
    bucket = s3server.create_bucket("mm-pipeline")
    upload_dir(str(tmp_path / "source"), f"{bucket}/raw")
    clip = tiny_clip_config(tmp_path)
    params = PipelineParams(
        source_url=f"{bucket}/raw",
        work_url=f"{bucket}/st",
        decode={
            "clip_model": clip,
            "clip_pretrained": save_random_checkpoint(clip, str(tmp_path / "clip.safetensors"), seed=0),
            "media_tokens": ["image", "audio"],
            "transcribe": False,
        },
        train={
            "model": write_random_model(str(tmp_path / "tiny"), "tiny", seed=1),
            "stage": "instruct",
            "template": TEMPLATE,
            "iters": 4,
            "batch_size": 2,
            "seq_len": 128,
            "num_layers": 2,
        },
        align_iters=3,
        skip=["index"],
    )
    first = pipeline(params)
    runs = _task_runs(first["flow_run_id"])
    assert [r.state.name for r in runs["train-align"]] == ["Completed"]
    assert [r.state.name for r in runs["train-adapter"]] == ["Completed"]
    for name in ("train-align", "train-adapter"):  # retryable
        assert runs[name][0].empirical_policy.retries >= 1
    assert {"loss-curve", "loss-curve-align"} <= _artifact_keys(first["flow_run_id"])

    train = first["train"]
    assert train["steps"] == 4
    opts = s3server.storage_options
    adapter = first["adapter_path"]
    for name in ("adapters.safetensors", "adapter_config.json", "projector.safetensors", "multimodal.json"):
        assert storage.exists(storage.join(adapter, name), opts), name
    meta = json.loads(storage.read_bytes(storage.join(adapter, "multimodal.json"), opts))
    assert meta["stage"] == "instruct"
    assert meta["media"]["image"]["encoder"] == "open_clip" and meta["media"]["image"]["model"] == clip
    assert meta["media"]["audio"]["encoder"] == "whisper"
    # stage 2 started from stage 1's output (its projectors, its step count), which holds a projector too
    from streamtune.train import adapters

    assert adapters.read_config(adapter, opts)["global_step"] == 3 + 4

    aligned = adapters.latest(f"{bucket}/st/adapters/align", opts)
    assert storage.exists(storage.join(aligned, "projector.safetensors"), opts)
    assert json.loads(storage.read_bytes(storage.join(aligned, "multimodal.json"), opts))["stage"] == "align"

    second = pipeline(params)
    runs = _task_runs(second["flow_run_id"])
    assert [r.state.name for r in runs["train-align"]] == ["Cached"]
    assert [r.state.name for r in runs["train-adapter"]] == ["Cached"]
    assert second["adapter_path"] == adapter


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch):
    monkeypatch.setenv("STREAMTUNE_RETRY_DELAY_S", "0")
