"""The Prefect UI shows a finished pipeline run: stages, artifacts and the loss curve picture.

Headless Chromium (Debian's) driven by Playwright; screenshots land in the test's output folder.
"""

import os
import uuid
from pathlib import Path

import pytest
import s3fs
from prefect_server import PrefectServer

pytest_plugins = ["prefect_server"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STAGES = ("manifest", "shard", "decode", "train")


@pytest.fixture(scope="module")
def finished_run(prefect_server: PrefectServer, s3server, tmp_path_factory):
    """One whole pipeline run (text samples, 2 real training steps) in this process against the server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    base = tmp_path_factory.mktemp("ui")
    bucket = s3server.create_bucket(f"ui-{uuid.uuid4().hex[:8]}")
    fs = s3fs.S3FileSystem(**s3server.storage_options)
    for i in range(4):
        fs.pipe(f"{bucket[5:]}/raw/s{i}.txt", f"Sample {i} says hello to the model. ".encode() * 4)
    saved = {k: os.environ.get(k) for k in s3server.env()}
    os.environ.update(s3server.env())
    try:
        with temporary_settings(
            {
                PREFECT_API_URL: prefect_server.api_url,
                PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(base / "results"),
            }
        ):
            from flows.pipeline import PipelineParams, pipeline

            release_leaked_slots()
            params = PipelineParams(
                source_url=f"{bucket}/raw",
                work_url=f"{bucket}/work",
                adapter_path=str(base / "adapters"),
                max_shard_bytes=300,
                iters=2,
                batch_size=2,
                seq_len=64,
            )
            summary = pipeline(params)
            summary["params"] = params
            summary["results"] = str(base / "results")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return summary


def release_leaked_slots() -> None:
    """Earlier tests on this shared server (Dask workers torn down with the cluster) can leave tag
    concurrency slots held until their leases expire; this run must not wait on them."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for limit in client.read_concurrency_limits(limit=200, offset=0):
            client.reset_concurrency_limit_by_tag(limit.tag, slot_override=[])


def launch(pw):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium")
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.mark.slow
def test_flow_run_and_artifact_pages_show_stages_and_loss_curve(finished_run, prefect_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from prefect.artifacts import Artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    summary = finished_run
    assert summary["train"]["steps"] == 2
    png = Path(summary["adapter_path"]) / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # saved next to the adapter
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        loss = Artifact.get("loss-curve")
    assert loss is not None and "data:image/png;base64," in loss.data

    hosts = set()
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: hosts.add(r.url.split("/")[2]) if "://" in r.url[:10] else None)

        page.goto(f"{prefect_server.url}/runs/flow-run/{summary['flow_run_id']}")
        expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
        page.get_by_text("Subflow Runs", exact=True).first.click()
        for stage in STAGES:
            expect(page.get_by_text(stage, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(tmp_path / "flow-run.png"), full_page=True)

        page.goto(f"{prefect_server.url}/artifacts")
        for key in ("loss-curve", "manifest-summary", "shard-table", "decode-stats", "training-progress"):
            expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(tmp_path / "artifacts.png"), full_page=True)

        page.goto(f"{prefect_server.url}/artifacts/artifact/{loss.id}")
        image = page.locator("img[alt='loss curve']")
        expect(image).to_be_visible(timeout=30_000)
        width = image.evaluate("img => img.naturalWidth")
        page.screenshot(path=str(tmp_path / "loss-curve.png"), full_page=True)
        browser.close()

    assert width > 100  # the PNG decoded in the browser
    assert hosts <= {prefect_server.url.split("/")[2]}  # the UI fetched nothing from outside
    for name in ("flow-run.png", "artifacts.png", "loss-curve.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_resume_from_latest_continues_from_the_trained_adapter(finished_run, prefect_server, s3server):
    """A scheduled run with `resume_from: latest` starts from the adapter the last run left."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import train_flow

    first = finished_run
    params = first["params"].model_copy(update={"resume_from": "latest", "iters": 1})
    saved = {k: os.environ.get(k) for k in s3server.env()}
    os.environ.update(s3server.env())
    try:
        with temporary_settings(
            {PREFECT_API_URL: prefect_server.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: first["results"]}
        ):
            resumed = train_flow(params)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert resumed["steps"] == 1
    # the first step of the resumed run starts where the trained adapter left off, below a fresh start
    assert resumed["loss_first"] < first["train"]["loss_first"]
