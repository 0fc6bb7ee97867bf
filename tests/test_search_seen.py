"""What is said + what is seen: "where the narrator talks about the harbour budget while a blue square is on
screen", where the shape is never spoken. Each topic is said in six segments, each over a different
coloured shape, so the words alone cannot pick the moment; the picture must come from the trained CLIP's
frame embeddings (generated footage decoded through the real video path), never from generation data.

Transcripts come from the narration script (Whisper is exercised by tests/test_video.py); the frames, their
embeddings and the index are the real decode and index stages.
"""

import json
import random

import pyarrow as pa
import pytest

import streamtune  # noqa: F401
from streamtune.config import DecodeConfig, IndexConfig
from streamtune.decode.clip_train import trained_clip
from streamtune.decode.features import Decoder
from streamtune.demo.data import COLOURS, SHAPES
from streamtune.demo.footage import Shot, make_video
from streamtune.search import build_index, open_index
from streamtune.shards import RAW_SCHEMA
from streamtune.shards.writer import ShardSetWriter

TOPICS = [
    ("harbour", "budget"),
    ("library", "opening hours"),
    ("stadium", "parking fees"),
    ("museum", "roof repair"),
]
CHANGES = [
    "will double next spring",
    "was cut by a third",
    "is delayed until the winter",
    "was approved today",
]
OPENERS = ["so", "well, as I said", "right, next item", "and now", "to be honest", "let me add that"]
SEGMENT = 5.0
CLIPS, PER_CLIP = 8, 3


def footage(seed: int = 2024):
    """CLIPS videos of PER_CLIP shots of SEGMENT s, the script of each segment and its ground truth."""
    rnd = random.Random(seed)
    looks = [(c, s) for c in COLOURS for s in SHAPES]
    plan = []  # per segment: (topic, look); within a topic every look differs
    for topic in TOPICS:
        plan += [(topic, look) for look in rnd.sample(looks, CLIPS * PER_CLIP // len(TOPICS))]
    rnd.shuffle(plan)
    videos, truth = [], []
    for c in range(CLIPS):
        sid = f"footage/clip{c:02d}"
        shots = []
        for k in range(PER_CLIP):
            (place, subject), (colour, shape) = plan[c * PER_CLIP + k]
            bg = (235, 235, 235) if rnd.random() < 0.7 else (60, 60, 70)
            shots.append(Shot(SEGMENT * k, colour, shape, bg))
            said = f"{rnd.choice(OPENERS)}, the {place} {subject} {rnd.choice(CHANGES)}."
            truth.append({"sample_id": sid, "segment_index": k, "place": place, "subject": subject,
                          "colour": colour, "shape": shape, "said": said})  # fmt: skip
        video = make_video(shots, SEGMENT * PER_CLIP, fps=5, audio=False, size=(160, 96))
        videos.append({"sample_id": sid, "video": video, "sources": [f"{sid}.mp4"]})
    return videos, truth


@pytest.fixture(scope="module")
def index(s3server):
    config, checkpoint = trained_clip()
    videos, truth = footage()
    cfg = DecodeConfig(clip_model=config, clip_pretrained=checkpoint, transcribe=False, labels=list(SHAPES),
                       segment_seconds=SEGMENT, keyframe_every=1.0)  # fmt: skip
    cols = {f.name: [v.get(f.name) for v in videos] for f in RAW_SCHEMA}
    table, quarantine = Decoder(cfg).decode_table(pa.Table.from_pydict(cols, schema=RAW_SCHEMA))
    assert not quarantine and table.num_rows == len(truth)
    script = {(t["sample_id"], t["segment_index"]): t["said"] for t in truth}
    rows = table.to_pylist()
    for r in rows:
        said = script[(r["sample_id"], r["segment_index"])]
        r["transcript"], r["language"] = said, "en"
        r["segments"] = json.dumps([{"start": r["t0"] + 0.3, "end": r["t1"] - 0.3, "text": said}])
    bucket = s3server.create_bucket("search-said-seen")
    opts = s3server.storage_options
    w = ShardSetWriter(f"{bucket}/work/features", table.schema, opts)
    w.write(pa.Table.from_pylist(rows, schema=table.schema))
    w.close(extra={"kind": "features"})
    icfg = IndexConfig(clip_model=config, clip_pretrained=checkpoint)
    build_index(f"{bucket}/work/features", f"{bucket}/work/index", icfg, opts)
    with open_index(f"{bucket}/work/index", icfg, opts) as idx:
        yield idx, truth


def test_said_and_seen_needs_both_signals(index):
    idx, truth = index
    queries = [(f"where the narrator talks about the {t['place']} {t['subject']} while a {t['colour']} "
                f"{t['shape']} is on screen", (t["sample_id"], t["segment_index"])) for t in truth]  # fmt: skip
    report = {}
    for name, weights in (
        ("hybrid", None),
        ("words only", {"clip": 0}),
        ("picture only", {"lexical": 0, "semantic": 0}),
    ):
        first = at5 = 0
        for q, want in queries:
            got = [(h.sample_id, h.segment_index) for h in idx.search(q, top=5, weights=weights)]
            first += bool(got) and got[0] == want
            at5 += want in got
        report[name] = {"top1": round(first / len(queries), 3), "recall@5": round(at5 / len(queries), 3)}
    print(json.dumps(report))
    assert "clip" in idx.signals
    assert report["hybrid"]["recall@5"] >= 0.9
    assert report["hybrid"]["top1"] > report["words only"]["top1"] + 0.3  # six segments say each topic
    assert report["hybrid"]["top1"] > report["picture only"]["top1"]  # each look is on screen under topics
