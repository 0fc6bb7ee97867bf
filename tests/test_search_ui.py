"""The contact sheet (`streamtune search --html`) and the local search page (`streamtune serve-search`) in
headless Chromium: a query, the first hit, escaping of hostile transcripts and queries, a screenshot."""

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import cli_outputs
from PIL import Image, ImageDraw

import streamtune  # noqa: F401
from streamtune.config import IndexConfig
from streamtune.decode.features import features_schema
from streamtune.search import build_index
from streamtune.search.sheet import marked_html, media_link, timecode
from streamtune.shards.writer import ShardSetWriter

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
DIM = 8
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
SAID = [
    "the harbour budget will double next spring, as the council agreed",
    "the library opening hours are cut by a third from next month",
    f"our museum roof repair is delayed again {HOSTILE}",
    "the stadium parking fees have been approved by the council",
    "thanks for coming in today, let me check my notes first",
    "the airport solar panels will be reviewed next month",
]
ROOT = Path(__file__).resolve().parent.parent


def jpeg(colour: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (96, 54), (235, 235, 235))
    ImageDraw.Draw(img).rectangle([30, 10, 64, 44], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def schema() -> pa.Schema:
    return features_schema(DIM)


@pytest.fixture(scope="module")
def index_url(s3server):
    bucket = s3server.create_bucket("search-ui")
    opts = s3server.storage_options
    rng = np.random.default_rng(0)
    rows = []
    for i, said in enumerate(SAID):
        sid = f"interviews/take{i // 2}"
        v = rng.standard_normal(DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        t0 = 12.0 * (i % 2) + 61.0
        rows.append({
            "sample_id": sid, "meta": json.dumps({"speaker": "ana" if i % 2 else "ben"}), "sources": [f"{sid}.mp4"],
            "transcript": said, "segments": json.dumps([{"start": t0, "end": t0 + 11, "text": said}]),
            "language": "en", "clip_embedding": v.tolist(), "tags": ["square"], "tag_scores": [0.9],
            "segment_index": i % 2, "t0": t0, "t1": t0 + 11.5, "frame_times": [t0 + 5], "frame_embeddings": [v.tolist()],
            "thumbnails": [jpeg((30 * i, 70, 220))],
        })  # fmt: skip
    w = ShardSetWriter(f"{bucket}/work/features", schema(), opts)
    w.write(pa.Table.from_pylist(rows, schema=schema()))
    w.close(extra={"kind": "features"})
    build_index(f"{bucket}/work/features", None, IndexConfig(), opts)
    s3 = __import__("s3fs").S3FileSystem(**opts)
    s3.pipe(f"{bucket[5:]}/src/interviews/take0.mp4", b"not really a video")
    return f"{bucket}/work/index", bucket, opts


def launch(pw):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium")
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_sheet_pieces():
    assert timecode(61.0) == "1:01.0" and timecode(3725.25) == "1:02:05.2" and timecode(None) == "–"
    assert marked_html("a <b> budget", [(6, 12)]) == "a &lt;b&gt; <mark>budget</mark>"
    assert media_link("file:///x/a.mp4", 1.5, 3.0) == "file:///x/a.mp4#t=1.50,3.00"


def test_contact_sheet_in_chromium(index_url, s3server, tmp_path, monkeypatch, capsys):
    from playwright.sync_api import sync_playwright

    url, bucket, opts = index_url
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    common = ["--index", url, "--endpoint-url", opts["endpoint_url"], "--json"]
    sheet = tmp_path / "results.html"
    args = ["search", "harbour budget", *common, "--html", str(sheet), "--source-url", f"{bucket}/src"]
    code, _, err = cli_outputs(monkeypatch, capsys, *args)
    assert code == 0, err
    code, _, err = cli_outputs(
        monkeypatch, capsys, "search", HOSTILE, *common, "--html", str(tmp_path / "museum.html")
    )
    assert code == 0, err
    text, museum = sheet.read_text(), (tmp_path / "museum.html").read_text()
    assert "<script>" not in text and "<script>" not in museum and "&lt;script&gt;" in museum
    assert "http" not in text.split("<body>")[0].replace("http-equiv", "")  # nothing loaded from elsewhere
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(120_000)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "results.html").as_uri())
        first = page.locator("li.hit").first
        assert first.get_attribute("data-sample") == "interviews/take0"
        assert first.locator(".tc").inner_text() == "1:01.0–1:12.5"
        assert first.locator("mark").all_inner_texts()[:2] == ["harbour", "budget"]
        href = first.locator("a.src").get_attribute("href")
        assert "take0.mp4" in href and href.endswith("#t=61.00,72.50") and href.startswith("http")
        assert (
            urllib.request.urlopen(href.split("#")[0], timeout=10).read() == b"not really a video"
        )  # presigned
        width = first.locator(".thumb img").evaluate("e => e.naturalWidth")
        assert width == 96
        page.screenshot(path=str(tmp_path / "contact-sheet.png"), full_page=True)
        page.emulate_media(media="print")
        page.pdf(path=str(tmp_path / "contact-sheet.pdf")) if hasattr(page, "pdf") else None
        page.goto((tmp_path / "museum.html").as_uri())
        assert page.title() != "pwned" and HOSTILE.split(">")[0] in page.locator("li.hit").first.inner_text()
        assert all(r.startswith(("file:", "data:")) for r in requests)
        browser.close()
    assert (tmp_path / "contact-sheet.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def server(index_url, s3server):
    url, bucket, _ = index_url
    cmd = [sys.executable, "-m", "app", "serve-search", "--index", url, "--port", "0",
           "--endpoint-url", s3server.endpoint_url, "--source-url", f"{bucket}/src"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **s3server.env()})  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        yield json.loads(line)["url"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_search_page_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert server.startswith("http://127.0.0.1:")
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)  # the shared test machine can be slow
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server)
        page.fill("input[name=q]", "what did they say about the harbour budget")
        page.click("button[type=submit]")
        page.wait_for_selector("li.hit")
        first = page.locator("li.hit").first
        assert first.get_attribute("data-sample") == "interviews/take0"
        assert "harbour" in first.locator("mark").all_inner_texts()
        page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)
        page.fill("input[name=q]", HOSTILE)  # an injection-looking query: shown as text, never run
        page.click("button[type=submit]")
        page.wait_for_load_state()
        assert page.title() == "streamtune search" and page.input_value("input[name=q]") == HOSTILE
        page.fill("input[name=q]", "   ")
        page.click("button[type=submit]")
        assert "empty query" in page.locator(".error").inner_text()
        assert all(r.startswith(server) or r.startswith("data:") for r in requests)
        browser.close()
    assert (tmp_path / "search-page.png").stat().st_size > 5000


def test_search_api_json(server):
    q = urllib.parse.quote("harbour budget")
    with urllib.request.urlopen(f"{server}api/search?q={q}&top=3", timeout=60) as r:
        out = json.loads(r.read())
    first = out["hits"][0]
    assert first["sample_id"] == "interviews/take0" and first["t0"] == 61.0 and "lexical" in first["matched"]
    assert first["link"].endswith("#t=61.00,72.50")
    with urllib.request.urlopen(server + first["thumbnail_url"].lstrip("/"), timeout=30) as r:
        assert r.headers["Content-Type"] == "image/jpeg" and r.read()[:2] == b"\xff\xd8"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server}api/search?q=", timeout=30)
    assert err.value.code == 400 and "empty" in json.loads(err.value.read())["error"]
    rebound = urllib.request.Request(
        f"{server}api/search?q={q}", headers={"Host": f"evil.example:{server.rsplit(':', 1)[1].strip('/')}"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(rebound, timeout=30)
    assert err.value.code == 421


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A multimodal adapter folder (image projector) from two real stage-1 steps on random tiny weights."""
    from corpus import tiny_clip_config

    from streamtune.config import DecodeConfig
    from streamtune.decode.clip import save_random_checkpoint
    from streamtune.train.data import ListSource, Template
    from streamtune.train.synthetic import write_random_model
    from streamtune.train.trainer import TrainArgs, train

    folder = tmp_path_factory.mktemp("rerank")
    clip = tiny_clip_config(folder)
    media = DecodeConfig(clip_model=clip, media_tokens=["image"],
                         clip_pretrained=save_random_checkpoint(clip, str(folder / "clip.safetensors")))  # fmt: skip
    model = write_random_model(str(folder / "tiny"), "tiny", seed=2)
    rows = [
        {"sample_id": f"s{i}", "image": jpeg((200, 40 * i, 30)), "text": "yes" if i % 2 else "no"}
        for i in range(4)
    ]
    args = TrainArgs(model=model, adapter_path=str(folder / "adapter"), stage="align", media_source="online",
                     template=Template(prompt="{image}\nDoes this clip match?", completion="{text}"),
                     iters=2, batch_size=2, seq_len=128, save_every=0)  # fmt: skip
    train(args, ListSource(rows), media=media)
    return model, folder / "adapter"


def test_rerank_rescores_top_hits_with_the_adapter(index_url, adapter, s3server, monkeypatch, capsys):
    from streamtune.search import open_index
    from streamtune.search.rerank import Reranker

    url, _, opts = index_url
    model, folder = adapter
    rr = Reranker(model, str(folder), candidates=4)
    with open_index(url, storage_options=opts) as index:
        hits = index.search("council budget", top=6)
        fused = {(h.sample_id, h.segment_index): h.score for h in hits}
        top = max(h.score for h in hits[:4])
        again = rr.rerank(index, "council budget", index.search("council budget", top=6))
        out = rr.rerank(index, "council budget", hits)
    assert [(h.sample_id, h.segment_index, h.score) for h in out] == [
        (h.sample_id, h.segment_index, h.score) for h in again
    ]  # deterministic
    scored = [h for h in out if "rerank" in h.signals]
    assert len(scored) == 4 and all(h.signals["rerank"]["rank"] in (1, 2, 3, 4) for h in scored)
    for h in scored:
        p = h.signals["rerank"]["score"]
        assert 0 < p < 1
        want = 0.5 * fused[(h.sample_id, h.segment_index)] / top + 0.5 * p
        assert h.score == pytest.approx(want, abs=1e-4)  # p is kept to 4 decimals
    assert [h.score for h in scored] == sorted((h.score for h in scored), reverse=True)
    assert len({h.signals["rerank"]["score"] for h in scored}) > 1  # frames and words change the judgement
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    args = ["search", "council budget", "--index", url, "--endpoint-url", opts["endpoint_url"], "--json",
            "--top", "3", "--rerank", str(folder), "--model", model]  # fmt: skip
    code, stdout, err = cli_outputs(monkeypatch, capsys, *args)
    assert code == 0, err
    found = json.loads(stdout.strip().splitlines()[-1])
    assert "rerank" in found["signals"] and all("rerank" in h["signals"] for h in found["hits"])
