"""Task policy, cache keys, parameters and artifact pictures: the parts of orchestration that need no server."""

import io
import os
import subprocess
import sys

import pytest
from PIL import Image
from pydantic import ValidationError

from flows.pipeline import PipelineParams
from tasks import cache, policy
from tasks.artifacts import loss_curve_png, markdown_table


def test_prefect_starts_private_and_persisting():
    code = (
        "import flows, prefect.settings as s; st = s.get_current_settings();"
        "print(st.server.analytics_enabled, st.results.persist_by_default, st.results.default_serializer)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "json"]


def test_task_options_retry_with_backoff_jitter_timeout_and_tags():
    opts = policy.task_options("decode", "model:tiny")
    assert opts["retries"] >= 1
    delays = opts["retry_delay_seconds"](4)
    assert delays == sorted(delays) and delays[1] == 2 * delays[0]  # exponential
    assert 0 < opts["retry_jitter_factor"] <= 1
    assert opts["timeout_seconds"] > 0
    assert {"streamtune", "stage:decode", "model:tiny"} <= set(opts["tags"])
    assert opts["persist_result"] is True and opts["result_serializer"] == "json"


class _State:
    def __init__(self, exc):
        self.data = exc


def test_bad_input_is_not_retried_but_io_is():
    import pyarrow as pa

    assert policy.is_transient(None, None, _State(OSError("connection reset")))
    assert policy.is_transient(None, None, _State(pa.ArrowInvalid("truncated")))
    assert not policy.is_transient(None, None, _State(ValueError("unsafe shard name")))


def test_model_tags_are_usable_limit_names():
    assert policy.model_tag("/models/Whisper Tiny.en/") == "model:whisper-tiny.en"
    assert policy.model_tag("offline:smollm2") == "model:offline-smollm2"


def test_cache_key_follows_content_not_credentials():
    key = cache.keyed("shard", "manifest_hash", "plan", "out_prefix").cache_key_fn
    base = {"manifest_hash": "m1", "plan": {"index": 0, "sample_ids": ["a"]}, "out_prefix": "s3://b/shards"}
    k = key(None, {**base, "work_options": {"endpoint_url": "http://a"}})
    assert k == key(None, {**base, "work_options": {"endpoint_url": "http://b"}})
    assert k != key(None, {**base, "manifest_hash": "m2"})
    assert k != key(None, {**base, "plan": {"index": 0, "sample_ids": ["a", "b"]}})
    assert k.startswith("streamtune-shard-")


def test_code_version_changes_with_the_stage_sources(tmp_path, monkeypatch):
    (tmp_path / "streamtune" / "decode").mkdir(parents=True)
    (tmp_path / "streamtune" / "decode" / "x.py").write_text("A = 1\n")
    monkeypatch.setattr(cache, "_ROOT", tmp_path)
    monkeypatch.setitem(cache.STAGE_CODE, "decode", ["streamtune/decode"])
    cache.code_version.cache_clear()
    before = cache.code_version("decode")
    (tmp_path / "streamtune" / "decode" / "x.py").write_text("A = 2\n")
    cache.code_version.cache_clear()
    assert cache.code_version("decode") != before
    cache.code_version.cache_clear()


def test_source_fingerprint_sees_new_and_changed_objects(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = cache.source_fingerprint(str(tmp_path))
    assert cache.source_fingerprint(str(tmp_path)) == first
    (tmp_path / "b.txt").write_text("two")
    second = cache.source_fingerprint(str(tmp_path))
    assert second != first
    (tmp_path / "b.txt").write_text("three!")
    assert cache.source_fingerprint(str(tmp_path)) != second


def test_params_refuse_credentials_and_unknown_stages():
    ok = PipelineParams(
        source_url="s3://b/raw", work_url="s3://b/w", work_options={"endpoint_url": "http://x"}
    )
    assert ok.adapter_url == "s3://b/w/adapters"
    with pytest.raises(ValidationError, match="credentials"):
        PipelineParams(source_url="s3://b/raw", work_url="s3://b/w", source_options={"secret": "s"})
    with pytest.raises(ValidationError):
        PipelineParams(source_url="s3://b/raw", work_url="s3://b/w", force=["everything"])
    schema = PipelineParams.model_json_schema()  # what the UI renders as the run form
    assert {"source_url", "work_url", "incremental", "resume_from", "force"} <= set(schema["properties"])


def test_loss_curve_is_a_png_picture():
    png = loss_curve_png([3.0, 2.5, 2.0, 1.7])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size[0] >= 400
    assert markdown_table([{"a": "x|y"}]).splitlines()[2] == "| x\\|y |"


def test_force_refreshes_only_the_named_stage():
    from flows.pipeline import _refresh
    from tasks.stages import decode_shard_task, write_shard_task

    params = PipelineParams(source_url="s3://b/raw", work_url="s3://b/w", force=["decode"])
    assert _refresh(decode_shard_task, "decode", params).refresh_cache is True
    assert not _refresh(write_shard_task, "shard", params).refresh_cache


def test_decode_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import _task_runner

    params = PipelineParams(source_url="s3://b/raw", work_url="s3://b/w", decode_concurrency=2)
    assert isinstance(_task_runner(params), ThreadPoolTaskRunner)
    on_dask = params.model_copy(update={"task_runner": "dask", "dask_address": "tcp://127.0.0.1:8786"})
    assert isinstance(_task_runner(on_dask), DaskTaskRunner)
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install prefect-ray"):
            _task_runner(params.model_copy(update={"task_runner": "ray"}))
