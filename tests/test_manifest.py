import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from streamtune import storage
from streamtune.manifest import (
    build_manifest,
    manifest_hash,
    read_manifest,
    summarize_manifest,
    versions,
    write_manifest,
)


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _put(prefix: str, files: dict[str, bytes], so) -> None:
    for key, data in files.items():
        storage.write_bytes(storage.join(prefix, key), data, so)


@pytest.fixture
def source(bucket, s3opts):
    prefix = f"{bucket}/raw"
    _put(
        prefix,
        {
            "interviews/a01.wav": _wav(),
            "interviews/a01.jpg": _png(),  # PNG content under a .jpg name: content wins, still an image
            "interviews/a01.txt": b"hello there",
            "interviews/b02.mp3": _png(),  # wrong content for its extension: sniffed as image
            "interviews/odd name \u00e9.wav": _wav(),
            "interviews/metadata.jsonl": b'{"file_name": "a01.wav", "speaker": "ann"}\n{not json}\n'
            b'{"file_name": "../escape.wav"}\n{"speaker": "x"}\n',
            "images/metadata.csv": b"file_name,label\nc03.png,cat\n",
            "images/c03.png": _png(),
            "images/readme.xyz": b"???",
        },
        s3opts,
    )
    return prefix


def test_manifest_classifies_and_joins_sidecars(source, s3opts):
    table, problems = build_manifest(source, s3opts)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["interviews/a01.wav"]["modality"] == "audio"
    assert rows["interviews/a01.wav"]["detected_by"] == "content"
    assert json.loads(rows["interviews/a01.wav"]["sidecar"]) == {"speaker": "ann"}
    assert rows["interviews/a01.jpg"]["modality"] == "image"
    assert rows["interviews/b02.mp3"]["modality"] == "image"
    assert rows["interviews/a01.txt"]["modality"] == "text"
    assert rows["interviews/odd name \u00e9.wav"]["sample_id"] == "interviews/odd name \u00e9"
    assert json.loads(rows["images/c03.png"]["sidecar"]) == {"label": "cat"}
    assert rows["images/readme.xyz"]["modality"] == "unknown"
    assert all(r["etag"] for r in rows.values())
    assert {r["sample_id"] for r in rows.values() if r["key"].startswith("interviews/a01")} == {
        "interviews/a01"
    }
    reasons = " | ".join(p["message"] for p in problems)
    assert len(problems) == 3, (
        reasons
    )  # bad JSON line, a file_name leaving its folder, a row without file_name
    assert "leaves folder" in reasons and "no file_name" in reasons
    summary = summarize_manifest(table)
    assert summary["objects"] == 9 and summary["by_modality"]["audio"] == 2


def test_manifest_exclude_and_hash(source, s3opts, tmp_path):
    table, _ = build_manifest(source, s3opts)
    seen = versions(table)
    again, _ = build_manifest(source, s3opts, exclude=seen)
    assert again.num_rows == 0
    storage.write_bytes(storage.join(source, "images/d04.png"), _png(), s3opts)
    new, _ = build_manifest(source, s3opts, exclude=seen)
    assert [r["key"] for r in new.to_pylist()] == ["images/d04.png"]
    url = str(tmp_path / "manifest.parquet")
    write_manifest(table, url)
    assert manifest_hash(read_manifest(url)) == manifest_hash(table)
    assert manifest_hash(new) != manifest_hash(table)


def test_missing_source_is_a_clear_error(bucket, s3opts):
    with pytest.raises(FileNotFoundError, match="source not found"):
        build_manifest(f"{bucket}/nothing-here", s3opts)
