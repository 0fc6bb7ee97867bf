"""Run docker-compose.yml's services without Docker: the same commands, with loopback endpoints.

`prefect-server` runs `prefect server start` exactly as compose does, on SQLite instead of Postgres and a
free port. `compose_env(service, ...)` gives any service's environment with container host names swapped
for the test's servers, so the worker, deploy and bucket jobs run unchanged. One Prefect server per test
process: the fixture starts it on first use and stops it at exit.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}`: the environment's value, else the default."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), str(value)
    )


def service_command(name: str) -> list[str]:
    """A service's command with `prefect`/`python` resolved to this interpreter's environment."""
    cmd = list(compose()["services"][name]["command"])
    if cmd[0] == "prefect":
        cmd[0] = str(BIN / "prefect")
    elif cmd[0] == "python":
        cmd[0] = sys.executable
    return cmd


def compose_env(name: str, **overrides: str) -> dict[str, str]:
    """os.environ + the service's compose environment (interpolated) + overrides."""
    env = dict(os.environ)
    env.update(
        {k: _interpolate(v) for k, v in (compose()["services"][name].get("environment") or {}).items()}
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(overrides)
    return env


@dataclass
class Background:
    """A service process in the background, its output in a log file."""

    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_service(name: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> Background:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            service_command(name),
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Background(process, log_path)


@dataclass
class PrefectServer(Background):
    url: str = ""
    home: Path = Path()

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def client_env(self, service: str = "worker", **overrides: str) -> dict[str, str]:
        """A compose client service's environment pointed at this server."""
        env = compose_env(service, PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home / "client"))
        env.update(overrides)
        return env


def start_prefect_server(home: Path, timeout_s: float = 120) -> PrefectServer:
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = compose_env(
        "prefect-server",
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )
    env.pop("PREFECT_API_URL", None)
    bg = start_service("prefect-server", env, home / "server.log")
    server = PrefectServer(bg.process, bg.log_path, url=f"http://127.0.0.1:{port}", home=home)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prefect server exited ({server.process.returncode}):\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"prefect server did not become healthy in {timeout_s}s:\n{server.log()}")


_SERVER: PrefectServer | None = None


@pytest.fixture(scope="session")
def prefect_server() -> PrefectServer:
    global _SERVER
    if _SERVER is None:
        _SERVER = start_prefect_server(Path(tempfile.mkdtemp(prefix="prefect-home-")))
        atexit.register(_SERVER.stop)
    return _SERVER


@pytest.fixture
def prefect_client(prefect_server, monkeypatch, tmp_path):
    """Point Prefect in this process (and processes it starts) at the server; results under tmp_path."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    with temporary_settings(
        {
            PREFECT_API_URL: prefect_server.api_url,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path / "results"),
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
        }
    ):
        yield prefect_server


def task_runs_of(flow_run_id) -> list:
    """Every task run under a flow run and its subflow runs (any depth), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": frontier}), limit=200
            )
            frontier = [c.id for c in children if c.id not in ids]
            ids.extend(frontier)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}), limit=200)
    return sorted(runs, key=lambda r: r.expected_start_time or r.created)


def wait_flow_run(flow_run_id, timeout_s: float = 300, poll_s: float = 1.0, worker: Background | None = None):
    """Poll until the flow run is in a final state; returns it."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll_s)
    raise TimeoutError(
        f"flow run {flow_run_id} not finished in {timeout_s}s" + (worker and worker.log() or "")
    )
