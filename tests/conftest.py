import os
import tempfile
import uuid

import pytest

import streamtune  # noqa: F401  (loads OpenBLAS before any test module imports mlx)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect state and persisted task results of this test session stay in a fresh folder, never ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="streamtune-prefect-")


@pytest.fixture(scope="session")
def s3server():
    """One real S3 server over HTTP on loopback for the whole test session."""
    from streamtune.testing.s3server import start_local_s3

    server = start_local_s3()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3server):
    """A fresh bucket URL (s3://name) on the loopback server."""
    return s3server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3opts(s3server):
    return s3server.storage_options


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_ephemeral_server():
    """Stop Prefect's ephemeral API server at the end of the session, while pytest still captures output. Left
    to its own atexit hook it logs into a stream pytest has closed, after the summary line."""
    yield
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=30)  # send pending events and logs while the server still answers
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()
