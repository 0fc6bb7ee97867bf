"""The Prefect UI shows a finished pipeline run: stages, artifacts and the loss curve picture.

Headless Chromium (Debian's) driven by Playwright; screenshots land in the test's output folder.
"""

import json
import os
import subprocess
import sys
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


def run_flow(name: str, params: dict, api_url: str, results: str, s3server) -> dict:
    """Run a pipeline flow in a fresh process against the server (no Prefect client state shared with
    earlier tests in this process) and return its JSON result."""
    code = (
        "import json, sys\n"
        "from flows import pipeline as p\n"
        "out = getattr(p, sys.argv[1])(p.PipelineParams(**json.loads(sys.argv[2])))\n"
        "print('RESULT ' + json.dumps(out, default=str))\n"
    )
    env = {
        **os.environ,
        **s3server.env(),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOCAL_STORAGE_PATH": results,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": results,
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def finished_run(prefect_server: PrefectServer, s3server, tmp_path_factory):
    """One whole pipeline run (text samples, 2 real training steps) against the server."""
    base = tmp_path_factory.mktemp("ui")
    bucket = s3server.create_bucket(f"ui-{uuid.uuid4().hex[:8]}")
    fs = s3fs.S3FileSystem(**s3server.storage_options)
    for i in range(4):
        fs.pipe(f"{bucket[5:]}/raw/s{i}.txt", f"Sample {i} says hello to the model. ".encode() * 4)
    params = {
        "source_url": f"{bucket}/raw",
        "work_url": f"{bucket}/work",
        "shard": {"max_shard_bytes": 300},
        "skip": ["index"],  # the pages checked show manifest, shard, decode and train
        "train": {"adapter_path": str(base / "adapters"), "iters": 2, "batch_size": 2, "seq_len": 64},
    }
    results = str(base / "results")
    summary = run_flow("pipeline", params, prefect_server.api_url, results, s3server)
    summary["params"] = params
    summary["results"] = results
    return summary


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
        blocked: list[str] = []

        def only_loopback(route):
            if (
                route.request.url.split("/")[2] == prefect_server.url.split("/")[2]
                or "://" not in route.request.url[:10]
            ):
                return route.continue_()
            blocked.append(route.request.url)
            return route.abort()

        page.route("**/*", only_loopback)
        for path in ("/dashboard", "/runs", "/deployments", "/flows"):  # the pages the README sends people to
            page.goto(f"{prefect_server.url}{path}")
            page.wait_for_load_state("networkidle", timeout=30_000)

        page.goto(f"{prefect_server.url}/runs/flow-run/{summary['flow_run_id']}")
        expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
        page.get_by_text("Subflow Runs", exact=True).first.click()
        for stage in STAGES:  # subflow runs carry their pipeline run's name
            run_name = f"{summary['flow_run_name']}-{stage}"
            expect(page.get_by_text(run_name, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(tmp_path / "flow-run.png"), full_page=True)

        page.goto(f"{prefect_server.url}/artifacts")
        for key in (
            "loss-curve",
            "manifest-summary",
            "shard-set",
            "decode-stats",
            "training-progress",
            "run-summary",
        ):
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
    assert blocked == [], blocked  # and attempted nothing: no analytics, no promotional content
    for name in ("flow-run.png", "artifacts.png", "loss-curve.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_resume_from_latest_continues_from_the_trained_adapter(finished_run, prefect_server, s3server):
    """A scheduled run with `resume_from: latest` starts from the adapter the last run left."""
    first = finished_run
    params = {**first["params"], "resume_from": "latest"}
    params["train"] = {**params["train"], "iters": 1}
    resumed = run_flow("train_flow", params, prefect_server.api_url, first["results"], s3server)
    assert resumed["steps"] == 1 and resumed["global_step"] == first["train"]["steps"] + 1
    # the first step of the resumed run starts where the trained adapter left off, below a fresh start
    assert resumed["loss_first"] < first["train"]["loss_first"]
