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
