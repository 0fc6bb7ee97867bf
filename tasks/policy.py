"""Retry, timeout, tag and result policy shared by every task.

Retries back off exponentially from `STREAMTUNE_RETRY_DELAY_S` (default 2 s: 2, 4, 8 ...) with +-50%
jitter so mapped shard tasks hitting a throttled bucket do not retry in lockstep. Bad input (ValueError,
TypeError) is deterministic: it fails at once instead of burning retries.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.tasks import exponential_backoff

TAGS = ("streamtune",)

# Per-stage wall-clock limits in seconds; generous because decode/train scale with data.
TIMEOUTS = {
    "manifest": 1800,
    "shard": 1800,
    "commit": 600,
    "decode": 3600,
    "train": 6 * 3600,
    "report": 300,
    "export": 3600,
    "index": 3600,
}


def retries() -> int:
    return int(os.environ.get("STREAMTUNE_TASK_RETRIES", "3"))


def retry_delay_s() -> float:
    return float(os.environ.get("STREAMTUNE_RETRY_DELAY_S", "2"))


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry I/O and runtime failures, not rejected input."""
    exc = getattr(state, "data", None)
    if isinstance(exc, ValueError | TypeError):
        import pyarrow as pa

        return isinstance(exc, pa.ArrowException)  # a truncated read is worth another try
    return True


def task_options(stage: str, *extra_tags: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `@task(...)`: retries with backoff + jitter, timeout, tags, persisted JSON results."""
    return {
        "retries": retries(),
        "retry_delay_seconds": exponential_backoff(backoff_factor=retry_delay_s()),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": is_transient,
        "timeout_seconds": timeout_s or TIMEOUTS[stage],
        "tags": [*TAGS, f"stage:{stage}", *extra_tags],
        "persist_result": True,
        "result_serializer": "json",
        "on_failure": [explain_failure],
    }


def advice(exc: BaseException) -> str:
    """What a person can do about a task failure, by its cause."""
    if isinstance(exc, FileNotFoundError):
        return (
            "an input it reads is gone (deleted, moved, or a fresh bucket): run the pipeline again, which "
            "rebuilds what is missing; if the source itself moved, fix source_url"
        )
    if isinstance(exc, PermissionError):
        return "storage refused access: check the worker's AWS credentials / profile and the bucket policy"
    if isinstance(exc, TimeoutError):
        return "it ran past its timeout: retry (`streamtune retry RUN`), or give the stage smaller shards"
    if isinstance(exc, ValueError | TypeError):
        return "the input or a setting is not usable (see the message): fix it, then `streamtune retry RUN`"
    if isinstance(exc, MemoryError):
        return (
            "out of memory: lower train.batch_size / train.seq_len or decode.audio_batch / decode.image_batch"
        )
    return (
        "retried automatically; if it keeps failing, read the message above, fix, then `streamtune retry RUN`"
    )


def explain_failure(task: Any, task_run: Any, state: Any) -> None:
    """on_failure hook: one log line that leads with the cause and says what to do."""
    from prefect.logging.loggers import task_run_logger

    exc = state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException):
        return
    message = str(exc).splitlines()[0] if str(exc) else ""
    task_run_logger(task_run, task=task).error(
        f"{task_run.name} failed: {type(exc).__name__}: {message} — what to do: {advice(exc)}"
    )


def model_tag(model: str) -> str:
    """A tag naming a model, usable as a concurrency-limit key (`model:whisper-tiny`)."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    return "model:" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60]


TRAIN_TAG = "streamtune-train"


def ensure_concurrency_limits(limits: dict[str, int], exclusive: list[str] = ()) -> None:
    """Create or update tag concurrency limits, and global limits of one slot named `exclusive`
    (idempotent)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for tag, limit in limits.items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
        for name in exclusive:
            client.upsert_global_concurrency_limit_by_name(name, 1)


def work_lock_name(work_url: str) -> str:
    """The global concurrency limit that keeps two pipeline runs off one work prefix at once."""
    import hashlib

    return "streamtune-work-" + hashlib.sha256(work_url.rstrip("/").encode()).hexdigest()[:12]


class _ThreadTimeoutNotice(logging.Filter):
    """Mapped tasks run in worker threads, where Prefect enforces `timeout_seconds` once the blocking call
    returns; Prefect repeats that notice for every task run, which buries the pipeline's own log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread. Timeouts in worker threads" not in record.getMessage()


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())
