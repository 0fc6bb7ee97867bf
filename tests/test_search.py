"""Search index and hybrid ranking over a loopback S3 server, with ground truth from generated transcripts."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from helpers import cli_outputs

from streamtune import storage
from streamtune.config import IndexConfig
from streamtune.decode.features import features_schema
from streamtune.search import SearchError, build_index, open_index
from streamtune.search.index import read_manifest
from streamtune.shards.index import read_index
from streamtune.shards.writer import ShardSetWriter

CLIP_DIM = 16
PLACES = ["harbour", "airport", "library", "hospital", "stadium", "railway station", "museum", "school",
          "bridge", "swimming pool"]  # fmt: skip
SUBJECTS = ["budget", "opening hours", "staff numbers", "safety inspection", "roof repair", "parking fees",
            "ticket prices", "cleaning contract", "solar panels", "flood defences"]  # fmt: skip
# words a user may type instead of the spoken ones (semantic queries share no content word with the speech)
PARAPHRASE = {"harbour": "port", "airport": "airfield", "library": "book lending centre", "hospital": "clinic",
              "stadium": "football ground", "railway station": "train terminal", "museum": "gallery",
              "school": "classroom", "bridge": "river crossing", "swimming pool": "lido",
              "budget": "spending", "opening hours": "closing time", "staff numbers": "employees",
              "safety inspection": "security check", "roof repair": "fixing the ceiling", "parking fees":
              "car park charges", "ticket prices": "admission cost", "cleaning contract": "janitorial deal",
              "solar panels": "photovoltaic power", "flood defences": "barriers against rising water"}  # fmt: skip
CHANGES = ["will double next spring", "was cut by a third", "is delayed until the winter",
           "has been approved by the council", "will be reviewed next month"]  # fmt: skip
FILLER = ["thanks for coming in today", "let me just check my notes", "as I said before", "to be honest",
          "we talked about this last week", "that is a good question", "I think most people agree"]  # fmt: skip
SPEAKERS = ["ana", "ben", "chloe"]


def video_schema() -> pa.Schema:
    base = features_schema(CLIP_DIM)
    extra = [
        pa.field("segment_index", pa.int32()),
        pa.field("t0", pa.float64()),
        pa.field("t1", pa.float64()),
        pa.field("frame_times", pa.list_(pa.float32())),
        pa.field("frame_embeddings", pa.list_(pa.list_(pa.float32(), CLIP_DIM))),
        pa.field("thumbnails", pa.list_(pa.binary())),
    ]
    return pa.schema(list(base) + [f for f in extra if f.name not in base.names])  # decode may have them


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, CLIP_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def corpus(seed: int = 0, clips: int = 25, per_clip: int = 4) -> tuple[list[dict], list[dict]]:
    """Feature rows of `clips` videos x `per_clip` segments, each segment saying one (place, subject) fact,
    plus the ground truth: which clip says what when."""
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    facts = [(p, s) for p in PLACES for s in SUBJECTS]
    rnd.shuffle(facts)
    rows, truth = [], []
    for c in range(clips):
        sid = f"interviews/clip{c:03d}"
        speaker = SPEAKERS[c % len(SPEAKERS)]
        for k in range(per_clip):
            place, subject = facts[(c * per_clip + k) % len(facts)]
            said = f"{rnd.choice(FILLER)}, the {place} {subject} {rnd.choice(CHANGES)}. {rnd.choice(FILLER)}."
            t0, t1 = 10.0 * k, 10.0 * k + 9.5
            frames = unit(rng, 3)
            rows.append({
                "sample_id": sid, "text": None, "meta": json.dumps({"speaker": speaker, "project": "city"}),
                "sources": [f"{sid}.mp4"], "transcript": said,
                "segments": json.dumps([{"start": t0, "end": t1, "text": said}]), "language": "en",
                "audio_seconds": None, "clip_embedding": frames.mean(0).tolist(), "tags": ["person"],
                "tag_scores": [0.9], "segment_index": k, "t0": t0, "t1": t1, "frame_times": [t0, t0 + 4, t0 + 8],
                "frame_embeddings": frames.tolist(), "thumbnails": [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c"],
            })  # fmt: skip
            truth.append({"sample_id": sid, "segment_index": k, "place": place, "subject": subject})
    return rows, truth


def write_features(url: str, rows: list[dict], opts: dict, rows_per_shard: int = 40) -> dict:
    w = ShardSetWriter(url, video_schema(), opts, max_shard_rows=rows_per_shard)
    for i in range(0, len(rows), rows_per_shard):
        w.write(pa.Table.from_pylist(rows[i : i + rows_per_shard], schema=video_schema()))
    return w.close(extra={"kind": "features"})


@pytest.fixture(scope="module")
def built(s3server):
    """One corpus indexed on the loopback S3 server: (features url, index url, options, truth)."""
    bucket = s3server.create_bucket("search-ground-truth")
    opts = s3server.storage_options
    rows, truth = corpus(seed=7)
    write_features(f"{bucket}/work/features", rows, opts)
    manifest = build_index(f"{bucket}/work/features", None, IndexConfig(), opts)
    return f"{bucket}/work/features", f"{bucket}/work/index", opts, truth, manifest


def recall_at(index, queries: list[tuple[str, tuple[str, int]]], k: int = 5, **kw) -> float:
    found = 0
    for q, want in queries:
        hits = index.search(q, top=k, **kw)
        found += any((h.sample_id, h.segment_index) == want for h in hits)
    return found / len(queries)


def test_recall_hybrid_and_ablations(built):
    _, index_url, opts, truth, manifest = built
    assert manifest["rows"] == len(truth) and manifest["stats"]["embedded"] == len(truth)
    assert manifest["modalities"] == {"video": len(truth)}
    rnd = random.Random(123)  # held-out queries: the ranking constants were never set on this corpus
    said, natural, paraphrased = [], [], []
    for t in truth:
        want = (t["sample_id"], t["segment_index"])
        said.append((f"the {t['place']} {t['subject']}", want))
        mixed = (
            [t["place"], PARAPHRASE[t["subject"]]]
            if rnd.random() < 0.5
            else [PARAPHRASE[t["place"]], t["subject"]]
        )
        natural.append((f"what did they say about the {mixed[0]} {mixed[1]}", want))
        paraphrased.append((f"{PARAPHRASE[t['place']]} {PARAPHRASE[t['subject']]}", want))
    with open_index(index_url, storage_options=opts) as index:
        index.prepare([q for q, _ in said + natural + paraphrased])
        report = {}
        for name, queries in (("said", said), ("natural", natural), ("paraphrased", paraphrased)):
            report[name] = {
                "hybrid": recall_at(index, queries),
                "lexical": recall_at(index, queries, weights={"semantic": 0}),
                "semantic": recall_at(index, queries, weights={"lexical": 0}),
            }
        print(json.dumps(report))
        # seed 7 was never used to tune the fusion (tuned on seeds 1-3): said 1.0, natural 0.95, paraphrased 0.94
        assert report["said"]["hybrid"] >= 0.9 and report["natural"]["hybrid"] >= 0.9
        assert report["paraphrased"]["hybrid"] >= 0.9  # a reworded query's incidental word matches are damped
        assert report["natural"]["hybrid"] > report["natural"]["lexical"]
        assert report["paraphrased"]["semantic"] > report["paraphrased"]["lexical"]


def test_hit_fields_filters_and_snippet(built):
    _, index_url, opts, truth, _ = built
    t = truth[5]
    with open_index(index_url, storage_options=opts) as index:
        hits = index.search(f"{t['place']} {t['subject']}", top=3)
        h = hits[0]
        assert (h.sample_id, h.segment_index) == (t["sample_id"], t["segment_index"])
        assert (
            h.source == f"{t['sample_id']}.mp4" and h.t0 == 10.0 * t["segment_index"] and h.t1 == h.t0 + 9.5
        )
        assert "lexical" in h.matched and "semantic" in h.matched and h.signals["lexical"]["rank"] == 1
        marked = h.marked()
        for word in t["place"].split():
            assert f"[{word}]" in marked
        assert index.thumbnail(h) == b"\xff\xd8b"
        d = json.loads(json.dumps(h.to_dict()))
        assert d["snippet_marked"] == marked and d["meta"]["speaker"] in SPEAKERS
        speaker = SPEAKERS[0]
        filtered = index.search(t["place"], top=50, where=[f"speaker={speaker}"])
        assert filtered and all(x.meta["speaker"] == speaker for x in filtered)
        assert all(
            x.sample_id == t["sample_id"]
            for x in index.search(t["place"], where={"sample_id": t["sample_id"]})
        )
        assert index.search("harbour", where=["speaker=nobody"]) == []
        with pytest.raises(SearchError, match="unknown filter field"):
            index.search("harbour", where=["colour=blue"])


@pytest.mark.parametrize(
    "query",
    ['"a" OR NEAR(', "*", "harbour*", "NEAR(harbour budget, 2)", "text: budget", "'; DROP TABLE seg; --",
     "budget AND", "^harbour", "ＨＡＲＢＯＵＲ　ｂｕｄｇｅｔ", "harbour\x00budget", "e\u0301cole \u202e budget",
     "🚢 💰", "港口预算", "x" * 1999],
)  # fmt: skip
def test_odd_queries_give_results_not_crashes(built, query):
    _, index_url, opts, _, manifest = built
    with open_index(index_url, storage_options=opts) as index:
        hits = index.search(query, top=5)
        assert isinstance(hits, list) and len(hits) <= 5
        if "harbour" in query.lower() or "ＨＡＲＢＯＵＲ" in query:
            assert hits
    assert read_manifest(index_url, opts) == manifest


@pytest.mark.parametrize("query,message", [("", "empty"), ("   \t\n ", "empty"), ("\u200b\u200d", "empty"),
                                           ("x" * 50_000, "limit")])  # fmt: skip
def test_bad_queries_are_clear_errors(built, query, message):
    _, index_url, opts, _, _ = built
    with open_index(index_url, storage_options=opts) as index:
        with pytest.raises(SearchError, match=message):
            index.search(query)


def test_incremental_rebuild_embeds_only_changes_and_drops_removed(s3server):
    bucket = s3server.create_bucket("search-incremental")
    opts = s3server.storage_options
    features, out = f"{bucket}/work/features", f"{bucket}/work/idx"
    rows, _ = corpus(seed=3, clips=10)
    write_features(features, rows, opts, rows_per_shard=8)
    first = build_index(features, out, IndexConfig(), opts)
    assert first["stats"]["embedded"] == 40 and len(first["parts"]) == 5

    again = build_index(features, out, IndexConfig(), opts)  # nothing changed: nothing read or embedded
    assert again["stats"]["embedded"] == 0 and again["stats"]["shards_reused"] == 5
    assert again["parts"] == first["parts"]

    # one segment says something new, clip 9 (the last shard) is removed, a new clip 10 appears in its place
    changed = [dict(r) for r in rows if r["sample_id"] != "interviews/clip009"]
    changed[1]["transcript"] = "the lighthouse keeper retired after forty years"
    new_rows, _ = corpus(seed=99, clips=11)
    changed += [r for r in new_rows if r["sample_id"] == "interviews/clip010"]
    for e in read_index(features, opts)["shards"]:
        fs, path = storage.get_fs(storage.join(features, e["path"]), opts)
        fs.rm_file(path)
    write_features(features, changed, opts, rows_per_shard=8)
    third = build_index(features, out, IndexConfig(), opts)
    s = third["stats"]
    assert s["shards_reused"] == 3 and s["shards"] == 2
    # embedded: the changed segment + the new clip's four; reused: the other rows of those two shards
    assert s["embedded"] == 1 + 4 and s["reused"] == 7 + 4
    assert third["rows"] == 40
    # FTS5: the two replaced parts' rows deleted, the two new parts' rows added (no rebuild)
    assert (
        third["lexical"]["updated"] == {"deleted_parts": 2, "added_parts": 2}
        and third["lexical"]["rows"] == 40
    )
    fs, root = storage.get_fs(out, opts)
    listed = {p["path"] for p in third["parts"]} | {third["lexical"]["path"]}
    stored = {f.removeprefix(root.rstrip("/") + "/") for f in fs.find(root)} - {"index.json"}
    assert stored == listed  # parts and the FTS file of earlier builds are gone
    with open_index(out, storage_options=opts) as index:
        hits = index.search("lighthouse keeper retired", top=1)
        assert (hits[0].sample_id, hits[0].segment_index) == ("interviews/clip000", 1)
        assert not any(h.sample_id == "interviews/clip009" for h in index.search("the", top=100))
        assert any(h.sample_id == "interviews/clip010" for h in index.search("the", top=100))


def test_cli_index_and_search(built, s3server, monkeypatch, capsys):
    features, _, opts, truth, _ = built
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "240")  # the table's width when not on a terminal
    endpoint = ["--endpoint-url", opts["endpoint_url"]]
    out = features.rsplit("/", 1)[0] + "/cli-index"
    code, stdout, err = cli_outputs(monkeypatch, capsys, "index", features, "--out", out, *endpoint)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(truth) and summary["embedded"] + summary["reused"] == len(truth)
    t = truth[0]
    args = ["search", f"{t['place']} {t['subject']}", "--index", out, "--top", "3", *endpoint]
    code, stdout, err = cli_outputs(monkeypatch, capsys, *args, "--json", "--where", "project=city")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    found = json.loads(lines[0])
    assert found["count"] == 3 and found["hits"][0]["sample_id"] == t["sample_id"]
    assert found["hits"][0]["snippet_marked"].count("[") >= 2
    code, stdout, err = cli_outputs(monkeypatch, capsys, *args, "--semantic-weight", "0")
    assert code == 0, err
    assert t["sample_id"] in stdout and json.loads(stdout.strip().splitlines()[-1])["count"] == 3
    code, stdout, err = cli_outputs(monkeypatch, capsys, "search", "  ", "--index", out, *endpoint)
    assert code == 2 and err.startswith("error:") and "empty query" in err and "Traceback" not in err
    code, _, err = cli_outputs(monkeypatch, capsys, "search", "x", "--index", out + "-none", *endpoint)
    assert code == 2 and "no search index" in err


@pytest.mark.slow  # ~100 s on the shared 2-core machine, most of it Prefect's ephemeral API starting
def test_index_flow_is_cached_and_incremental(s3server, monkeypatch):
    """The pipeline's index subflow (real Prefect, ephemeral API): builds, is cached while the features stand,
    and redoes only the changed shard's changed row after the features change."""
    from flows.params import PipelineParams
    from flows.pipeline import index_flow

    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3server.create_bucket("search-flow")
    opts = s3server.storage_options
    rows, _ = corpus(seed=11, clips=6)
    write_features(f"{bucket}/st/features", rows, opts, rows_per_shard=8)
    params = PipelineParams(source_url=f"{bucket}/raw", work_url=f"{bucket}/st",
                            index={"sample_queries": ["what about the harbour"]})  # fmt: skip
    first = index_flow(params)
    assert first["rows"] == 24 and first["embedded"] == 24 and not first["cached"]
    assert first["samples"][0]["query"] == "what about the harbour" and first["samples"][0]["hits"]
    assert read_manifest(f"{bucket}/st/index", opts)["rows"] == 24
    again = index_flow(params)
    assert again["cached"] and again["rows"] == 24

    rows[-1] = dict(rows[-1], transcript="the lighthouse keeper retired after forty years")
    write_features(f"{bucket}/st/features", rows, opts, rows_per_shard=8)
    third = index_flow(params)
    assert not third["cached"] and third["embedded"] == 1 and third["shards_reused"] == 2
    with open_index(f"{bucket}/st/index", storage_options=opts) as index:
        assert index.search("lighthouse keeper", top=1)[0].sample_id == rows[-1]["sample_id"]


@pytest.mark.slow  # Whisper + CLIP decode of two 12 s videos: ~200 s on the shared 2-core machine
def test_generated_footage_end_to_end(s3server, tmp_path):
    """Narrated videos (PyAV + espeak) -> decode (Whisper, CLIP) -> feature shards on S3 -> index -> the moment
    a phrase is said, with its timecodes and thumbnail."""
    from corpus import tiny_clip_config

    from streamtune.decode import DecodeConfig
    from streamtune.decode.clip import save_random_checkpoint
    from streamtune.decode.features import Decoder
    from streamtune.demo.footage import Shot, make_video
    from streamtune.shards import RAW_SCHEMA, commit_index, write_shard

    bucket = s3server.create_bucket("search-footage")
    opts = s3server.storage_options
    shots = [Shot(0.0, "red", "circle"), Shot(4.3, "blue", "square"), Shot(9.1, "green", "triangle")]
    said = {
        "tapes/a": [
            (0.5, "the airport budget will double"),
            (4.8, "the weather is cold"),
            (9.4, "our team won"),
        ],
        "tapes/b": [(0.5, "the library is closed"), (4.8, "the hospital needs nurses"), (9.4, "it was late")],
    }
    rows = [{"sample_id": sid, "video": make_video(shots, 12.0, lines, fps=10), "sources": [f"{sid}.mp4"],
             "meta": json.dumps({"speaker": sid[-1]})} for sid, lines in said.items()]  # fmt: skip
    cols = {f.name: [r.get(f.name) for r in rows] for f in RAW_SCHEMA}
    config = tiny_clip_config(tmp_path)
    cfg = DecodeConfig(whisper_model="offline:tiny.en", clip_model=config, segment_seconds=5.0,
                       clip_pretrained=save_random_checkpoint(config, str(tmp_path / "c.safetensors")),
                       labels=["red", "blue", "green"], cache_dir=str(tmp_path / "cache"))  # fmt: skip
    decoder = Decoder(cfg)
    table, quarantine = decoder.decode_table(pa.Table.from_pydict(cols, schema=RAW_SCHEMA))
    assert not quarantine and table.num_rows >= 4
    features = f"{bucket}/work/features"
    entry = write_shard(table, f"{features}/shard-00000.arrow", opts)
    commit_index(features, [entry], decoder.schema(), opts, extra={"kind": "features"})

    m = build_index(features, None, IndexConfig(), opts)
    assert m["modalities"] == {"video": table.num_rows}
    with open_index(f"{bucket}/work/index", storage_options=opts) as index:
        hit = index.search("hospital nurses", top=3)[0]
        assert hit.sample_id == "tapes/b" and hit.source == "tapes/b.mp4"
        assert hit.t0 <= 5.0 and hit.t1 >= 5.5 and "nurses" in hit.marked().lower()
        assert index.thumbnail(hit)[:2] == b"\xff\xd8"  # a JPEG
        hit = index.search("airport spending", top=3, where=["speaker=a"])[0]
        assert hit.sample_id == "tapes/a" and hit.t0 == 0.0 and hit.t1 <= 5.5
