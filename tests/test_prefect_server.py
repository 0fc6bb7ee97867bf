"""The pipeline against a real Prefect server, run the way docker-compose.yml runs it (without Docker).

The bucket job, the deploy job and the process worker run the compose services' own commands; the
served deployment runs `deployments/serve.py` (what `streamtune serve` calls). Data is tiny text so the
tests are about orchestration; decode runs the real decoder (text rows need no model).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from corpus import tiny_clip_config
from prefect_server import (
    ROOT,
    compose,
    service_command,
    start_service,
    task_runs_of,
    wait_flow_run,
)

from streamtune import storage
from streamtune.shards import read_index, read_shard_table

pytest_plugins = ["prefect_server"]  # the session's Prefect server fixtures

BUCKET = "streamtune"


def put_text(fs: s3fs.S3FileSystem, prefix: str, names: list[str]) -> None:
    for name in names:
        fs.pipe(
            f"{prefix}/{name}.txt", f"{name}: a caption long enough to fill a small shard. ".encode() * 20
        )


def params(source_url: str, work_url: str, **extra) -> dict:
    return {
        "source_url": source_url,
        "work_url": work_url,
        "shard": {"max_shard_bytes": 600},
        "skip": ["index", "train"],  # the search index has its own flow tests (test_search)
        **extra,
    }


def states_by_name(runs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r.state.name)
    return out


@pytest.fixture(scope="module")
def stack(prefect_server, s3server, tmp_path_factory):
    """Buckets + deployments + a process worker, from the compose services' commands."""
    base = tmp_path_factory.mktemp("stack")
    overrides = {
        **s3server.env(),
        "STREAMTUNE_SOURCE_URL": f"s3://{BUCKET}/nightly/raw",
        "STREAMTUNE_WORK_URL": str(base / "nightly-work"),
        "STREAMTUNE_APP_DIR": str(ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "STREAMTUNE_TASK_RETRIES": "1",
        "STREAMTUNE_RETRY_DELAY_S": "0.1",
    }
    for job in ("minio-init", "deploy"):
        done = subprocess.run(
            service_command(job),
            env=prefect_server.client_env(job, **overrides),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, f"{job} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    worker = start_service("worker", prefect_server.client_env("worker", **overrides), base / "worker.log")
    fs = s3fs.S3FileSystem(**s3server.storage_options)
    yield {"server": prefect_server, "env": overrides, "base": base, "fs": fs, "worker": worker}
    worker.stop()


def test_deploy_job_registers_scheduled_deployments(stack, prefect_client):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("streamtune-pipeline/nightly-finetune")
        on_demand = client.read_deployment_by_name("streamtune-pipeline/on-demand")
        limits = {c.tag: c.concurrency_limit for c in client.read_concurrency_limits(limit=50, offset=0)}
        results = client.read_block_document_by_name("streamtune-results", "remote-file-system")
    assert results.data["basepath"] == "s3://streamtune/prefect-results"
    assert "secret" not in str(results.data["settings"]).lower()  # credentials stay in the worker env
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    p = nightly.parameters["params"]
    assert p["incremental"] is True and p["resume_from"] == "latest"
    assert p["source_url"] == stack["env"]["STREAMTUNE_SOURCE_URL"]  # `{{ $VAR }}` resolved when deploying
    assert on_demand.parameters["params"]["incremental"] is False and not on_demand.schedules
    assert nightly.work_pool_name == "streamtune"
    assert limits["streamtune-train"] == 1
    # the bucket job created the bucket on the S3 server
    assert stack["fs"].exists(BUCKET)


def test_failed_shard_is_redone_on_retry_and_finished_tasks_come_from_cache(stack, prefect_client):
    from prefect.deployments import run_deployment

    fs, base = stack["fs"], stack["base"]
    source = f"{BUCKET}/retry-{uuid.uuid4().hex[:8]}/raw"
    put_text(fs, source, ["a", "b", "c"])
    work = base / "retry-work"
    # Storage fault for one shard: its object path is taken by a directory, so writing it fails.
    blocker = work / "shards" / "shard-00001.arrow"
    blocker.mkdir(parents=True)

    run = run_deployment(
        "streamtune-pipeline/on-demand", parameters={"params": params(f"s3://{source}", str(work))}, timeout=0
    )
    first = wait_flow_run(run.id, timeout_s=240, worker=stack["worker"])
    assert first.state.is_failed(), first.state
    before = states_by_name(task_runs_of(run.id))
    assert before["write-shard-00001"] == ["Failed"]
    assert before["write-shard-00000"] == ["Completed"] and before["write-shard-00002"] == ["Completed"]

    shutil.rmtree(blocker)
    retry = subprocess.run(
        [str(Path(service_command("worker")[0])), "flow-run", "retry", str(run.id)],
        env=stack["server"].client_env("worker", **stack["env"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    second = wait_flow_run(run.id, timeout_s=240, worker=stack["worker"])
    assert second.state.is_completed(), second.state
    assert second.run_count == 2

    after = states_by_name(task_runs_of(run.id))
    # finished in the first attempt: not executed again
    assert after["build-manifest"] == ["Completed"]  # its subflow run was reused as is
    assert after["write-shard-00000"] == ["Completed", "Cached"]
    assert after["write-shard-00002"] == ["Completed", "Cached"]
    # failed in the first attempt: executed for real now
    assert after["write-shard-00001"] == ["Failed", "Completed"]
    assert after["commit-shards"] == ["Completed"]
    assert [e["path"] for e in read_index(str(work / "shards"))["shards"]] == [
        "shard-00000.arrow",
        "shard-00001.arrow",
        "shard-00002.arrow",
    ]
    assert read_index(str(work / "features"))["rows"] == 3
    # results persisted where compose puts them: S3 (the block the deploy job created)
    assert len(fs.ls(f"{BUCKET}/prefect-results")) >= 10


def test_served_schedule_is_incremental(stack, prefect_client, tmp_path):
    """`streamtune serve` path: flow.serve with cron; a second scheduled run shards only new and changed
    objects, and writes again, without the old version, the shard that held a changed sample."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    fs = stack["fs"]
    source = f"s3://{BUCKET}/served-{uuid.uuid4().hex[:8]}/raw"
    work = str(tmp_path / "served-work")
    config = tmp_path / "params.yaml"
    # the broken picture is opened with the decoder's CLIP: a small one (the default ViT-B-32 takes ~20 s)
    config.write_text(
        f"source_url: {source}\nwork_url: {work}\nshard: {{max_shard_bytes: 600}}\nskip: [index, train]\n"
        f"decode: {{clip_model: {tiny_clip_config(tmp_path)}}}\n"
    )
    env = stack["server"].client_env("worker", **stack["env"])
    served = subprocess.Popen(
        [service_command("minio-init")[0], "deployments/serve.py", str(config), "--cron", "0 4 * * *"],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        name = "streamtune-pipeline/streamtune-scheduled"
        deployment = None
        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    deployment = client.read_deployment_by_name(name)
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(1)
        assert deployment is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert [s.schedule.cron for s in deployment.schedules] == ["0 4 * * *"]
        assert deployment.parameters["params"]["incremental"] is True

        put_text(fs, source.removeprefix("s3://"), ["n1", "n2"])
        fs.pipe(f"{source.removeprefix('s3://')}/n9.png", b"\x89PNG\r\n\x1a\n" + b"not really an image" * 3)
        first = run_deployment(name, timeout=0)  # the schedule's own parameters
        assert wait_flow_run(first.id, timeout_s=240).state.is_completed()
        from prefect.artifacts import Artifact

        quarantined = Artifact.get("quarantine").data
        assert "n9.png" in quarantined  # the broken picture is set aside with its reason; the run goes on
        put_text(fs, source.removeprefix("s3://"), ["n3"])
        fs.pipe(f"{source.removeprefix('s3://')}/n2.txt", b"n2, edited since the first run.")
        second = run_deployment(name, timeout=0)
        assert wait_flow_run(second.id, timeout_s=240).state.is_completed()
    finally:
        os.killpg(served.pid, 15)
        served.wait(30)

    runs1, runs2 = states_by_name(task_runs_of(first.id)), states_by_name(task_runs_of(second.id))
    assert sorted(n for n in runs1 if n.startswith("write-shard")) == [
        f"write-shard-0000{i}" for i in range(3)
    ]
    assert sorted(n for n in runs2 if n.startswith("write-shard")) == [
        "write-shard-00003",
        "write-shard-00004",
    ]
    # shard 1 held only the old n2: written again without it, it is empty and leaves the index
    assert [n for n in runs2 if n.startswith("rewrite-shard")] == ["rewrite-shard-00005"]
    # unchanged shards' features come back from the cache; only the new shards are decoded
    assert {n: runs2[n] for n in runs2 if n.startswith("decode-shard")} == {
        "decode-shard-00000": ["Cached"],
        "decode-shard-00002": ["Cached"],
        "decode-shard-00003": ["Completed"],
        "decode-shard-00004": ["Completed"],
    }
    index = read_index(storage.join(work, "shards"))
    assert [e["path"] for e in index["shards"]] == [f"shard-0000{i}.arrow" for i in (0, 2, 3, 4)]
    assert sorted(k for e in index["shards"] for k in e["sources"]) == [
        "n1.txt",
        "n2.txt",
        "n3.txt",
        "n9.png",
    ]
    features = read_index(storage.join(work, "features"))
    assert features["rows"] == 3 and features["quarantine"]["rows"] == 1
    texts = {
        r["sample_id"]: r["text"]
        for e in features["shards"]
        for r in read_shard_table(storage.join(work, "features"), e).to_pylist()
    }
    assert texts["n2"] == "n2, edited since the first run." and texts["n3"].startswith("n3: ")


def test_compose_worker_command_is_the_one_run_here(stack):
    assert stack["worker"].process.poll() is None, stack["worker"].log()
    assert compose()["services"]["worker"]["command"][:3] == ["prefect", "worker", "start"]
