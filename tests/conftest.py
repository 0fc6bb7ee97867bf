import os
import tempfile
import uuid

import pytest

import streamtune  # noqa: F401  (loads OpenBLAS before any test module imports mlx)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect state and persisted task results of this test session stay in a fresh folder, never ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="streamtune-prefect-")
# Task retries back off from 0.1 s instead of 2 s (2 + 4 + 8 s of sleep per failed task); read when tasks/
# is imported, so it is set before any test module imports flows.
os.environ.setdefault("STREAMTUNE_RETRY_DELAY_S", "0.1")


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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One converted-model cache for the session: Whisper's offline files are converted once, not per module."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, model_cache):
    """A small random open_clip model: its config, two checkpoints (seeds 0 and 1), and the model cache."""
    from corpus import tiny_clip_config

    from streamtune.decode.clip import save_random_checkpoint

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = tiny_clip_config(folder)
    return {
        "config": config,
        "ckpt": save_random_checkpoint(config, str(folder / "a.safetensors"), seed=0),
        "ckpt2": save_random_checkpoint(config, str(folder / "b.safetensors"), seed=1),
        "cache": model_cache,
    }


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M as a float32 mlx-lm / transformers folder (export_base), written once for the session."""
    from streamtune.train.models import export_base

    return export_base("offline:smollm2", str(tmp_path_factory.mktemp("smollm2") / "base"))


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
