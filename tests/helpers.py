"""Small pieces several test modules share: the CLI in this process, the two-rank `mlx.launch`, waiting for a
checkpoint before a SIGKILL, and the environment that points a CLI subprocess at this process's Prefect API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def cli_in_process(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`streamtune ARGS` through the same entry point (app.cli.main), without a new interpreter; what the
    test printed before is not part of the result."""
    from app.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["streamtune", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def mlx_launch() -> str | None:
    """The `mlx.launch` of this environment (None when MLX's launcher is not installed)."""
    return shutil.which("mlx.launch", path=sys.prefix + "/bin") or shutil.which("mlx.launch")


def launch_two_ranks(script: Path, arg: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python script arg` as two ranks of mx.distributed's ring backend on loopback."""
    launch = mlx_launch() or "mlx.launch"
    proc = subprocess.run(
        [launch, "--backend", "ring", "-n", "2", "--", sys.executable, str(script), arg],
        capture_output=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc


def kill_at_step(
    proc: subprocess.Popen,
    latest: Callable[[], dict | None],
    step: int,
    poll_s: float = 0.05,
    timeout: float = 240,
) -> None:
    """SIGKILL `proc` once its latest committed checkpoint (`latest()`, polled every `poll_s`) reaches `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        head = latest()
        if head and head["step"] >= step:
            break
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"finished before step {step}: {err[-3000:]!r}")
        time.sleep(poll_s)
    os.kill(proc.pid, 9)
    proc.wait()
    assert proc.returncode == -9


def prefect_api_env(**extra: str) -> dict[str, str]:
    """os.environ with PREFECT_API_URL set to this process's ephemeral Prefect API (started if not yet): a
    CLI subprocess then talks to it instead of starting a temporary server of its own (~10 s each)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return {**os.environ, "PREFECT_API_URL": url, **extra}


def cli_outputs(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`cli_in_process` as (exit code, stdout, stderr)."""
    r = cli_in_process(monkeypatch, capsys, *args)
    return r.returncode, r.stdout, r.stderr
