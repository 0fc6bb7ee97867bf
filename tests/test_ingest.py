import json

import pytest

from streamtune import shards, storage
from streamtune.demo.data import generate_demo_source, upload_dir
from streamtune.ingest import (
    commit_raw_shards,
    ingested_sources,
    next_shard_index,
    plan_shards,
    unusable_objects,
    write_raw_shard,
)
from streamtune.manifest import build_manifest
from streamtune.quarantine import read_quarantine


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-src")
    generate_demo_source(str(out), n=8)
    return str(out)


def _ingest(source, out, so, exclude=None, start=None):
    table, problems = build_manifest(source, so, exclude=exclude)
    plans = plan_shards(table, max_shard_bytes=64 << 10, start_index=start or 0)
    results = [write_raw_shard(source, table, p, out, source_options=so, out_options=so) for p in plans]
    index = commit_raw_shards(out, results, so, problems=problems + unusable_objects(table))
    return table, plans, index


def test_ingest_packs_samples_into_shards(demo_dir, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    upload_dir(demo_dir, source, s3opts)
    storage.write_bytes(f"{source}/clips/s00.txt", b"\xff\xfe not utf-8", s3opts)
    table, plans, index = _ingest(source, out, s3opts)
    assert len(plans) > 1 and len(index["shards"]) == len(plans)
    rows = [r for e in index["shards"] for r in shards.read_shard_table(out, e, s3opts).to_pylist()]
    by_id = {r["sample_id"]: r for r in rows}
    assert len(rows) == 10  # 8 samples + 2 broken ones (decode quarantines those)
    s01 = by_id["clips/s01"]
    assert s01["audio"][:4] == b"fLaC" and s01["image"][:3] == b"\xff\xd8\xff"
    assert s01["text"].startswith("A ") and json.loads(s01["meta"])["shape"]
    assert sorted(s01["sources"]) == ["clips/s01.flac", "clips/s01.jpg"]
    q = read_quarantine(f"{out}/quarantine/quarantine-shard-00000.parquet", s3opts).to_pylist()
    assert [(r["key"], r["error"]) for r in q] == [("clips/s00.txt", "UnicodeDecodeError")]
    assert by_id["clips/s00"]["audio"] is not None  # the bad text file does not lose the rest of the sample


def test_incremental_ingest_appends_only_new_objects(demo_dir, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    upload_dir(demo_dir, source, s3opts)
    _, _, first = _ingest(source, out, s3opts)
    seen = ingested_sources(out, s3opts)
    assert "clips/s03.wav" in seen
    storage.write_bytes(f"{source}/clips/extra.txt", b"a new caption", s3opts)
    table, plans, second = _ingest(source, out, s3opts, exclude=seen, start=next_shard_index(out, s3opts))
    assert [r["key"] for r in table.to_pylist() if r["modality"] != "sidecar"] == ["clips/extra.txt"]
    assert len(plans) == 1
    assert len(second["shards"]) == len(first["shards"]) + 1
    new = shards.read_shard_table(out, second["shards"][-1], s3opts).to_pylist()
    assert [(r["sample_id"], r["text"]) for r in new] == [("clips/extra", "a new caption")]
