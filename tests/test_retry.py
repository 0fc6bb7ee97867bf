"""`streamtune retry RUN`: a failed pipeline run started without a deployment runs again as the same flow run
(same id, same name); finished tasks come back from the cache and only the failed shard is written."""

import json
import shutil
import subprocess
import sys

from helpers import cli_in_process, prefect_api_env

import flows  # noqa: F401


def test_retry_reruns_the_same_flow_run_and_only_what_failed(tmp_path, monkeypatch, capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import PipelineParams, pipeline

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / f"{name}.txt").write_text(f"{name}: a caption long enough to fill a small shard. " * 20)
    work = tmp_path / "work"
    blocker = work / "shards" / "shard-00001.arrow"
    blocker.mkdir(parents=True)  # a storage fault for one shard: its path is taken by a folder
    params = PipelineParams(
        source_url=str(src), work_url=str(work), shard={"max_shard_bytes": 600}, skip=["decode", "train"]
    )
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id

    shutil.rmtree(blocker)
    result = subprocess.run(
        [sys.executable, "-m", "app", "retry", str(run_id)],
        capture_output=True,
        text=True,
        timeout=600,
        env=prefect_api_env(),  # this session's API (and its database), not a temporary server of its own
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["flow_run_id"] == str(run_id) and out["state"] == "Completed"

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [c.id for c in children]}))
    assert run.state.is_completed() and run.run_count == 2 and run.name == out["name"]
    states: dict[str, list[str]] = {}
    for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time):
        states.setdefault(t.name, []).append(t.state.name)
    assert states["write-shard-00001"][0] == "Failed" and states["write-shard-00001"][-1] == "Completed"
    assert states["write-shard-00000"][-1] == "Cached" and states["write-shard-00002"][-1] == "Cached"
    assert (work / "shards" / "index.json").exists()

    bad = cli_in_process(monkeypatch, capsys, "retry", "no-such-run")
    assert bad.returncode != 0 and "no-such-run" in bad.stderr and "Traceback" not in bad.stderr
