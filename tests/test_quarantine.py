import struct
from pathlib import Path

import numpy as np
import pytest

import streamtune
from streamtune import shards
from streamtune.decode import DecodeConfig, Decoder, MediaError, decode_shard
from streamtune.ingest import commit_raw_shards, plan_shards, unusable_objects, write_raw_shard
from streamtune.manifest import build_manifest
from streamtune.quarantine import Reason, read_quarantine, record

DOC = Path(streamtune.__file__).parent / "QUARANTINE.md"
CODES = {r.value for r in Reason}


def documented() -> dict[str, str]:
    """{code: sentence} from the rows of the table in QUARANTINE.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_every_reason_has_a_sentence_and_a_row_in_the_table():
    assert len(CODES) == len(Reason)
    for reason in Reason:
        assert reason.sentence.strip() and reason.value.isidentifier()
    assert documented() == {r.value: r.sentence for r in Reason}


def test_record_takes_only_a_reason():
    q = record("s", "s.wav", "decode", Reason.TOO_LONG, "301 s", modality="audio")
    assert q["error"] == "too_long" and q["message"] == "301 s" and q["modality"] == "audio"
    for bad in ("too_long", "SomethingNew", ValueError("x"), None):
        with pytest.raises(TypeError):
            record("s", "s.wav", "decode", bad)
    with pytest.raises(TypeError):
        MediaError("truncated", "free-form kind")


def _truncated_wav() -> bytes:
    """A 44-byte WAV header that declares a second of 16-bit 16 kHz audio, and no samples."""
    fmt = (1, 1, 16000, 32000, 2, 16)  # PCM, mono, rate, bytes/s, block align, bits
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 32000, b"WAVE", b"fmt ", 16, *fmt, b"data", 32000)


def test_every_record_from_a_bad_source_is_an_enumerated_reason(tmp_path):
    src, raw, out = tmp_path / "src", str(tmp_path / "raw"), str(tmp_path / "features")
    src.mkdir()
    (src / "good.txt").write_text("a fine caption")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "cut.wav").write_bytes(_truncated_wav())
    (src / "noise.bin").write_bytes(np.random.RandomState(0).bytes(512))
    (src / "metadata.jsonl").write_text(
        '{"file_name": "good.txt", "speaker": "ann"}\n{not json\n{"speaker": "nobody"}\n'
    )

    table, problems = build_manifest(str(src))
    plans = plan_shards(table)
    results = [write_raw_shard(str(src), table, p, raw) for p in plans]
    commit_raw_shards(raw, results, problems=problems + unusable_objects(table))
    shard_records = read_quarantine(f"{raw}/quarantine/quarantine-shard-00000.parquet").to_pylist()

    decoder = Decoder(DecodeConfig(cache_dir=str(tmp_path / "cache")))
    decoded = [
        decode_shard(raw, e, out, decoder.cfg, decoder=decoder) for e in shards.read_index(raw)["shards"]
    ]
    assert decoder._transcriber is None and decoder._clip is None  # bad media fails before any model loads
    decode_records = [q for r in decoded for q in r["quarantine"]]

    seen = {(q["key"], q["error"]) for q in shard_records + decode_records}
    assert all(code in CODES for _, code in seen), seen
    assert {
        ("metadata.jsonl", "broken_sidecar"),
        ("metadata.jsonl", "sidecar_row"),
        ("noise.bin", "unsupported"),
        ("latin1.txt", "encoding"),
        ("cut.wav", "truncated"),
    } <= seen
    assert sum(r["stats"]["features"] for r in decoded) == 1  # the good caption
