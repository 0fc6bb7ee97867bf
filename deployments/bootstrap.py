"""One-shot setup jobs (the `minio-init` and `deploy` services of docker-compose.yml, or by hand).

python deployments/bootstrap.py buckets   create the buckets named in STREAMTUNE_BUCKETS (comma list)
python deployments/bootstrap.py deploy    create the work pool and the training concurrency limit, then
                                          prefect deploy --prefect-file deployments/prefect.yaml --all
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOL = os.environ.get("STREAMTUNE_WORK_POOL", "streamtune")


def create_buckets(names: list[str], attempts: int = 30) -> None:
    """Create buckets through the S3 API (AWS env: endpoint, keys), waiting for the store to come up."""
    import s3fs

    from streamtune.storage import s3_env_options

    opts = s3_env_options()
    if (opts.get("client_kwargs") or {}).get("region_name") == "us-east-1":
        opts.pop("client_kwargs")  # S3 rejects a LocationConstraint naming the default region
    fs = s3fs.S3FileSystem(**opts)
    for attempt in range(attempts):
        try:
            for name in names:
                if not fs.exists(name):
                    fs.mkdir(name)
                print(f"bucket s3://{name} ready", flush=True)
            return
        except OSError as e:  # the object store may still be starting
            if attempt == attempts - 1:
                raise
            print(f"waiting for the object store: {e}", flush=True)
            time.sleep(2)
            fs.invalidate_cache()


def wait_for_api(attempts: int = 60) -> None:
    from prefect.client.orchestration import get_client

    for attempt in range(attempts):
        try:
            with get_client(sync_client=True) as client:
                client.api_healthcheck()
                if client.hello().status_code == 200:
                    return
        except Exception as e:  # noqa: BLE001 - the server may still be starting
            if attempt == attempts - 1:
                raise
            print(f"waiting for the Prefect API: {e}", flush=True)
            time.sleep(2)


def deploy() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from tasks.policy import TRAIN_TAG, ensure_concurrency_limits
    from tasks.settings import RESULT_STORAGE_ENV, save_result_storage_block

    wait_for_api()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            print(f"work pool {POOL} created", flush=True)
        except ObjectAlreadyExists:
            print(f"work pool {POOL} exists", flush=True)
    ensure_concurrency_limits({TRAIN_TAG: 1})
    block = save_result_storage_block()
    if block:
        print(f"result storage block {block} -> {os.environ[RESULT_STORAGE_ENV]}", flush=True)
    env = {**os.environ, "STREAMTUNE_APP_DIR": os.environ.get("STREAMTUNE_APP_DIR", str(HERE.parent))}
    cmd = [
        prefect_executable(),
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(HERE / "prefect.yaml"),
        "--all",
    ]
    subprocess.run(cmd, check=True, cwd=HERE.parent, env=env)


def prefect_executable() -> str:
    """The `prefect` CLI of this interpreter's environment (it need not be on PATH), else PATH's."""
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else "prefect"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", choices=["buckets", "deploy"])
    args = parser.parse_args(argv)
    if args.job == "buckets":
        names = [n for n in os.environ.get("STREAMTUNE_BUCKETS", "streamtune").split(",") if n]
        create_buckets(names)
    else:
        deploy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
