"""`streamtune retry RUN`: run a failed pipeline run again as the same flow run (same id and name), so
finished tasks come back from the cache and only what failed runs. Runs of a deployment are handed to its
workers (as the UI's Retry does); runs started by `streamtune run` / `demo` execute here."""

from __future__ import annotations

from typing import Any
from uuid import UUID

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class RetryError(ValueError):
    """The run cannot be retried (unknown, still running, not a pipeline run)."""


def _find(client: Any, id_or_name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_flow_run(UUID(id_or_name))
    except ValueError:
        pass
    except ObjectNotFound:
        raise RetryError(f"no flow run with id {id_or_name}") from None
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[id_or_name])))
    if len(runs) != 1:
        raise RetryError(f"{len(runs)} flow runs are named {id_or_name!r}: give the run id")
    return runs[0]


def retry_run(id_or_name: str) -> dict:
    """Retry a finished pipeline run; returns {"flow_run_id", "name", "state", "summary"?, "scheduled"?}."""
    from prefect import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from flows.params import PipelineParams
    from flows.pipeline import pipeline

    with get_client(sync_client=True) as client:
        run = _find(client, id_or_name)
        state = run.state.type.value if run.state else "UNKNOWN"
        if state not in TERMINAL:
            raise RetryError(f"flow run {run.name} is {state}: only finished runs can be retried")
        if client.read_flow(run.flow_id).name != pipeline.name:
            raise RetryError(f"flow run {run.name} is not a {pipeline.name} run")
        client.set_flow_run_state(run.id, Scheduled(message="Retried with streamtune retry"), force=True)
        if run.deployment_id:
            return {"flow_run_id": str(run.id), "name": run.name, "scheduled": True}
        run = client.read_flow_run(run.id)
    params = PipelineParams.model_validate(run.parameters["params"])
    state = run_flow(
        pipeline.with_options(flow_run_name=run.name),
        flow_run=run,
        parameters={"params": params},
        return_type="state",
    )
    out = {"flow_run_id": str(run.id), "name": run.name, "state": state.name}
    if state.is_completed():
        out["summary"] = state.result()
    return out
