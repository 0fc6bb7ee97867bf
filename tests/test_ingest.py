import json

import pytest

from streamtune import shards, storage
from streamtune.demo.data import generate_demo_source, upload_dir
from streamtune.ingest import (
    commit_raw_shards,
    ingested_sources,
    next_shard_index,
    plan_rewrites,
    plan_shards,
    rewrite_raw_shard,
    superseded_samples,
    unusable_objects,
    write_raw_shard,
)
from streamtune.manifest import build_manifest
from streamtune.quarantine import read_quarantine
from streamtune.shards.gc import collect_garbage


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
    assert [(r["key"], r["error"]) for r in q] == [("clips/s00.txt", "encoding")]
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


def _sync(source, out, so):
    """One incremental run, as the shard flow does it: new shards for new or changed samples, committed shards
    holding superseded samples written again without them, one commit."""
    held = ingested_sources(out, so)
    table, problems = build_manifest(source, so, exclude=held)
    start = next_shard_index(out, so)
    plans = plan_shards(table, max_shard_bytes=64 << 10, start_index=start)
    results = [write_raw_shard(source, table, p, out, source_options=so, out_options=so) for p in plans]
    committed = {e["path"]: e for e in shards.read_index(out, so)["shards"]}
    rewrites = plan_rewrites(
        list(committed.values()), superseded_samples(table), start_index=start + len(plans)
    )
    results += [rewrite_raw_shard(out, committed[r["replaces"]], r, so) for r in rewrites]
    index = commit_raw_shards(out, results, so, problems=problems)
    rows = [r for e in index["shards"] for r in shards.read_shard_table(out, e, so).to_pylist()]
    return table, rewrites, {r["sample_id"]: r for r in rows}, len(rows)


def test_incremental_runs_follow_edits_replacements_and_deletions(demo_dir, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    upload_dir(demo_dir, source, s3opts)
    _ingest(source, out, s3opts)

    table, rewrites, rows, count = _sync(source, out, s3opts)
    assert [r["modality"] for r in table.to_pylist()] == ["sidecar"] and rewrites == []

    sidecar = f"{source}/clips/metadata.jsonl"
    lines = storage.read_bytes(sidecar, s3opts).decode().splitlines()
    edited = [
        json.dumps({**json.loads(x), "caption": "An edited caption."}) if '"s01.jpg"' in x else x
        for x in lines
    ]
    storage.write_bytes(sidecar, ("\n".join(edited) + "\n").encode(), s3opts)
    storage.write_bytes(f"{source}/clips/s02.png", open(f"{demo_dir}/clips/s00.png", "rb").read(), s3opts)
    fs, root = storage.get_fs(f"{source}/clips", s3opts)
    fs.rm(fs.glob(f"{root}/s03.*"))
    storage.write_bytes(f"{source}/clips/extra.txt", b"a new caption", s3opts)

    table, rewrites, rows, count = _sync(source, out, s3opts)
    previous = rewrites
    assert superseded_samples(table) == {"clips/s01", "clips/s02", "clips/s03"}
    listed = {r["key"] for r in table.to_pylist() if r["modality"] not in ("sidecar", "superseded")}
    assert {k.rsplit(".", 1)[0] for k in listed} == {"clips/s01", "clips/s02", "clips/extra"}
    assert rewrites and all(r["drop"] for r in rewrites)
    assert count == len(rows) == 10, "one removed, one added; no sample twice"
    assert "clips/s03" not in rows and rows["clips/extra"]["text"] == "a new caption"
    s01 = rows["clips/s01"]
    assert s01["text"] == "An edited caption." and s01["audio"] and s01["image"], "rebuilt whole"
    assert rows["clips/s02"]["image"] == open(f"{demo_dir}/clips/s00.png", "rb").read()

    table, rewrites, rows, count = _sync(source, out, s3opts)
    assert superseded_samples(table) == set() and rewrites == [] and count == 10

    # the replaced shards stay until collected; recent ones are kept by the grace period
    replaced = sorted(storage.join(out, r["replaces"]) for r in previous)
    assert collect_garbage(out, s3opts) == []
    assert collect_garbage(out, s3opts, older_than_s=0, dry_run=True) == replaced
    assert collect_garbage(out, s3opts, older_than_s=0) == replaced
    assert collect_garbage(out, s3opts, older_than_s=0) == []
    index = shards.read_index(out, s3opts)
    assert sum(len(shards.read_shard_table(out, e, s3opts)) for e in index["shards"]) == 10


def test_rewritten_shard_derives_its_features_without_model_work(tmp_path):
    """A shard written again minus some samples gets the old shard's features minus the same samples."""
    import pyarrow as pa

    from streamtune.decode.features import DecodeConfig, decode_shard

    raw, out = str(tmp_path / "shards"), str(tmp_path / "features")
    rows = [
        {
            "sample_id": s,
            "audio": None,
            "image": None,
            "text": f"text of {s}",
            "meta": None,
            "sources": [f"{s}.txt"],
        }
        for s in ("a", "b", "c")
    ]
    entry = shards.write_shard(
        pa.Table.from_pylist(rows, schema=shards.RAW_SCHEMA), f"{raw}/shard-00000.arrow"
    )
    entry["sources"] = {f"{s}.txt": "etag-" + s for s in ("a", "b", "c")}
    cfg = DecodeConfig()
    first = decode_shard(raw, entry, out, cfg)
    assert first["stats"]["features"] == 3 and not first["skipped"]

    plan = {"index": 1, "replaces": entry["path"], "drop": ["b"]}
    rewritten = rewrite_raw_shard(raw, entry, plan)["entry"]
    assert rewritten["path"] == "shard-00001.arrow" and rewritten["derived_from"]["dropped"] == ["b"]
    assert sorted(rewritten["sources"]) == ["a.txt", "c.txt"]
    derived = decode_shard(raw, rewritten, out, cfg)
    assert derived["stats"]["derived_shards"] == 1 and derived["stats"]["features"] == 2
    assert derived["stats"]["decode_seconds"] == 0 and derived["stats"]["model_seconds"] == 0
    old = shards.read_shard_table(out, first["entry"]).to_pylist()
    new = shards.read_shard_table(out, derived["entry"]).to_pylist()
    assert new == [r for r in old if r["sample_id"] != "b"]
    assert decode_shard(raw, rewritten, out, cfg)["skipped"], "the derived shard's marker holds"

    # without the old features (collected, or another config) the shard is decoded as usual
    again = decode_shard(raw, rewritten, str(tmp_path / "other-features"), cfg)
    assert again["stats"]["features"] == 2 and again["stats"]["derived_shards"] == 0


def test_a_sample_held_twice_is_rebuilt_once(demo_dir, bucket, s3opts):
    """Shard sets from before per-sample diffs could hold a sample twice; the next run leaves one row."""
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    upload_dir(demo_dir, source, s3opts)
    table, _, first = _ingest(source, out, s3opts)
    twice = plan_shards(table, max_shard_bytes=1 << 30, start_index=next_shard_index(out, s3opts))[0]
    twice["sample_ids"] = ["clips/s01"]
    commit_raw_shards(
        out, [write_raw_shard(source, table, twice, out, source_options=s3opts, out_options=s3opts)], s3opts
    )
    rows = [
        r
        for e in shards.read_index(out, s3opts)["shards"]
        for r in shards.read_shard_table(out, e, s3opts).to_pylist()
    ]
    assert [r["sample_id"] for r in rows].count("clips/s01") == 2

    table, rewrites, by_id, count = _sync(source, out, s3opts)
    assert superseded_samples(table) == {"clips/s01"}
    assert count == len(by_id) == first["rows"], "one row per sample again"
    assert by_id["clips/s01"]["audio"] and by_id["clips/s01"]["image"]
    assert _sync(source, out, s3opts)[1] == [], "and then nothing to do"
