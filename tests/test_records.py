"""Record files (JSONL, JSON arrays, CSV/TSV, Parquet, Arrow) through manifest and shard, over a real S3
server: one sample per record, stable ids, line-numbered quarantine, incremental runs per record."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from streamtune import CloudStreamingDataset, shards, storage
from streamtune.ingest import (
    commit_raw_shards,
    ingested_sources,
    next_shard_index,
    plan_rewrites,
    plan_shards,
    rewrite_raw_shard,
    superseded_samples,
    write_raw_shard,
)
from streamtune.manifest import build_manifest, sample_id_of, summarize_manifest
from streamtune.shards.gc import collect_garbage

N = 100_000
BROKEN = 4_242  # 0-based record index of the broken line; it is line BROKEN + 1


def chat(i: int) -> dict:
    # every 1000th record repeats an earlier one: the shards must hold the multiset, not a set
    j = i - 500 if i % 1000 == 999 else i
    return {"messages": [{"role": "user", "content": f"q{j}"}, {"role": "assistant", "content": f"a{j}"}]}


def ingest(source: str, out: str, so: dict, *, exclude=None, start: int = 0, max_shard_bytes=1 << 20, **kw):
    table, problems = build_manifest(source, so, exclude=exclude, **kw)
    plans = plan_shards(table, max_shard_bytes=max_shard_bytes, start_index=start)
    results = [write_raw_shard(source, table, p, out, source_options=so, out_options=so) for p in plans]
    index = commit_raw_shards(out, results, so, problems=problems)
    return table, problems + [q for r in results for q in r["quarantine"]], index


def all_rows(out: str, so: dict) -> list[dict]:
    index = shards.read_index(out, so)
    return [r for e in index["shards"] for r in shards.read_shard_table(out, e, so).to_pylist()]


@pytest.fixture(scope="module")
def chat_lines() -> list[str]:
    lines = [json.dumps(chat(i)) for i in range(N)]
    lines[BROKEN] = '{"messages": [{"role": "user", "content": "cut off'
    return lines


def test_jsonl_100k_records_once_each_with_a_quarantined_line(chat_lines, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    storage.write_bytes(f"{source}/chat/train.jsonl", ("\n".join(chat_lines) + "\n").encode(), s3opts)
    table, problems, index = ingest(source, out, s3opts)
    summary = summarize_manifest(table)
    assert summary["records"] == N and summary["samples"] == N and summary["record_files"] == 1
    assert summary["objects"] == 1
    assert len(index["shards"]) > 5  # one file split across shards by records
    rows = all_rows(out, s3opts)
    expected = Counter(json.dumps(chat(i)) for i in range(N) if i != BROKEN)
    assert Counter(r["meta"] for r in rows) == expected
    assert sorted(r["sample_id"] for r in rows) == sorted(
        f"chat/train.jsonl#{i}" for i in range(N) if i != BROKEN
    )
    assert all(r["sources"] == [r["sample_id"]] for r in rows)
    [bad] = problems
    assert bad["key"] == f"chat/train.jsonl#{BROKEN}" and bad["error"] == "broken_record"
    assert bad["message"].startswith(f"line {BROKEN + 1}")
    # resume mid-epoch in a fresh dataset: exactly the samples not yet yielded
    ds = CloudStreamingDataset(out, s3opts, shuffle=True, seed=3, columns=["sample_id"])
    full = [r["sample_id"] for r in ds]
    ds = CloudStreamingDataset(out, s3opts, shuffle=True, seed=3, columns=["sample_id"])
    it = iter(ds)
    head = [next(it)["sample_id"] for _ in range(37_123)]
    state = json.loads(json.dumps(ds.state_dict()))
    again = CloudStreamingDataset(out, s3opts, shuffle=True, seed=3, columns=["sample_id"])
    again.load_state_dict(state)
    assert head + [r["sample_id"] for r in again] == full
    assert sorted(full) == sorted(r["sample_id"] for r in rows)


def test_parquet_100k_records_once_each_and_resume(chat_lines, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    records = [chat(i) | {"id": f"r{i:06d}"} for i in range(N)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf, row_group_size=7_000)
    storage.write_bytes(f"{source}/train.parquet", buf.getvalue(), s3opts)
    table, problems, index = ingest(source, out, s3opts, id_column="id")
    assert not problems and summarize_manifest(table)["records"] == N
    rows = all_rows(out, s3opts)
    assert Counter(json.dumps(json.loads(r["meta"])["messages"]) for r in rows) == Counter(
        json.dumps(r["messages"]) for r in records
    )
    assert {r["sample_id"] for r in rows} == {f"train.parquet#r{i:06d}" for i in range(N)}
    ds = CloudStreamingDataset(out, s3opts, shuffle=True, seed=1, columns=["sample_id"])
    full = [r["sample_id"] for r in ds]
    first = CloudStreamingDataset(out, s3opts, shuffle=True, seed=1, columns=["sample_id"])
    it = iter(first)
    head = [next(it)["sample_id"] for _ in range(61_001)]
    rest = CloudStreamingDataset(out, s3opts, shuffle=True, seed=1, columns=["sample_id"])
    rest.load_state_dict(first.state_dict())
    assert head + [r["sample_id"] for r in rest] == full


def test_every_text_format_one_sample_per_record(bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    put = lambda key, data: storage.write_bytes(f"{source}/{key}", data, s3opts)  # noqa: E731
    jsonl = "".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(5))
    put("a/train.jsonl.gz", gzip.compress(jsonl.encode()))
    put("a/arr.json", json.dumps([{"text": f"é{i}"} for i in range(4)] + [7], indent=1).encode())
    put("a/one.json", b'{"text": "a single sample, as before"}')
    put("b/t.csv", b'instruction,input,output\nsay hi,,"hi\nthere"\nadd,1 2,3\nshort row\n')
    put("b/t.tsv", b"text\tlabel\nhello\t1\n\nworld\t0\n")
    put("b/metadata.jsonl", b'{"file_name": "x.txt", "note": "sidecar, not records"}\n')
    put("b/x.txt", b"plain text sample")
    table, problems, _ = ingest(source, out, s3opts)
    rows = {r["sample_id"]: r for r in all_rows(out, s3opts)}
    assert set(rows) == {
        *(f"a/train.jsonl.gz#{i}" for i in range(5)),
        *(f"a/arr.json#{i}" for i in range(4)),
        "a/one", "b/t.csv#0", "b/t.csv#1", "b/t.tsv#0", "b/t.tsv#1", "b/x",
    }  # fmt: skip
    assert json.loads(rows["b/t.csv#0"]["meta"]) == {
        "instruction": "say hi",
        "input": "",
        "output": "hi\nthere",
    }
    assert rows["a/arr.json#1"]["text"] == "é1" and rows["b/t.tsv#1"]["text"] == "world"
    assert json.loads(rows["b/x"]["meta"]) == {"note": "sidecar, not records"}
    messages = sorted((q["key"], q["message"].split(":")[0]) for q in problems)
    assert messages == [("a/arr.json#4", "element 4"), ("b/t.csv#2", "line 5")]
    assert summarize_manifest(table)["records"] == 5 + 5 + 3 + 2
    from streamtune.report import current_quarantine

    assert {q["key"] for q in current_quarantine(bucket, s3opts)} == {"a/arr.json#4", "b/t.csv#2"}
    put("b/t.csv", b'instruction,input,output\nsay hi,,"hi\nthere"\nadd,1 2,3\nshort,row,fixed\n')
    _, problems, _ = ingest(
        source, out, s3opts, exclude=ingested_sources(out, s3opts), start=next_shard_index(out, s3opts)
    )
    assert [q["key"] for q in problems] == ["a/arr.json#4"]  # the array is read again; the csv row is fixed
    assert {q["key"] for q in current_quarantine(bucket, s3opts)} == {"a/arr.json#4"}


def test_id_column_and_incremental_runs_per_record(bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    url = f"{source}/data.jsonl"

    def write(records):
        storage.write_bytes(url, "".join(json.dumps(r) + "\n" for r in records).encode(), s3opts)

    recs = [{"id": f"u{i}", "text": f"t{i}"} for i in range(300)]
    write(recs + [{"text": "no id"}, {"id": "u5", "text": "again"}])
    _, problems, first = ingest(source, out, s3opts, id_column="id", max_shard_bytes=2_000)
    assert sorted(q["message"] for q in problems) == [
        "line 301: no usable 'id' field (the configured id column)",
        "line 302: id 'u5' repeats an earlier record of this file",
    ]
    # edit one record, delete one, append two, move the rest down by a line: only changes move
    recs[7]["text"] = "edited"
    del recs[100]
    write([{"id": "new0", "text": "n0"}] + recs + [{"id": "new1", "text": "n1"}])
    held = ingested_sources(out, s3opts)
    table, _ = build_manifest(source, s3opts, exclude=held, id_column="id")
    listed = [r["key"] for r in table.to_pylist() if r["modality"] == "record"]
    stale = superseded_samples(table)
    assert sorted(listed) == ["data.jsonl#new0", "data.jsonl#new1", "data.jsonl#u7"]
    assert stale == {"data.jsonl#u7", "data.jsonl#u100"}
    assert sample_id_of("data.jsonl#u7") == "data.jsonl#u7"
    start = next_shard_index(out, s3opts)
    assert all(not e["sources"] and e["record_sources"]["files"] == ["data.jsonl"] for e in first["shards"])
    assert len(held) == 300 and held["data.jsonl#u7"] == xxhash.xxh3_64_hexdigest(
        b'{"id": "u7", "text": "t7"}'
    )
    rough = plan_rewrites(first["shards"], stale, start_index=start)  # without the shard set: by file
    rewrites = plan_rewrites(first["shards"], stale, start_index=start, prefix=out, storage_options=s3opts)
    assert len(rough) == len(first["shards"]) > len(rewrites) == 2
    results = [
        rewrite_raw_shard(out, e, p, s3opts)
        for e, p in zip(
            [next(e for e in first["shards"] if e["path"] == p["replaces"]) for p in rewrites],
            rewrites,
            strict=True,
        )
    ]
    plans = plan_shards(table, max_shard_bytes=2_000, start_index=start + len(rewrites))
    results += [
        write_raw_shard(source, table, p, out, source_options=s3opts, out_options=s3opts) for p in plans
    ]
    commit_raw_shards(out, results, s3opts)
    rows = all_rows(out, s3opts)
    texts = Counter((r["sample_id"], r["text"]) for r in rows)
    assert len(texts) == len(rows) == 301 and texts[("data.jsonl#u7", "edited")] == 1
    assert ("data.jsonl#u100", "t100") not in texts
    assert ingested_sources(out, s3opts)["data.jsonl#u7"] != held["data.jsonl#u7"]
    # the line without an id is fixed: the quarantine report lets it go once a later shard holds it
    write([{"id": "fixed", "text": "now with an id"}])
    _, problems, _ = ingest(source, out, s3opts, id_column="id", exclude=ingested_sources(out, s3opts),
                            start=next_shard_index(out, s3opts))  # fmt: skip
    assert not problems
    old = collect_garbage(out, s3opts, older_than_s=0, dry_run=True)
    assert any(u.endswith(".records.parquet") for u in old) and any(u.endswith(".arrow") for u in old)


def test_cli_manifest_and_shard_count_records(tmp_path):
    import subprocess
    import sys

    (tmp_path / "src").mkdir()
    lines = [json.dumps({"id": f"k{i}", "prompt": f"p{i}", "completion": f"c{i}"}) for i in range(50)]
    (tmp_path / "src" / "train.jsonl").write_text("\n".join(lines[:20] + ["{oops"] + lines[20:]) + "\n")

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    m = cli("manifest", str(tmp_path / "src"), "--out", str(tmp_path / "m.parquet"), "--id-column", "id")
    assert (m["records"], m["samples"], m["objects"], m["quarantined"]) == (50, 50, 1, 1)
    s = cli(
        "shard", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "shards"), "--max-shard-bytes", "1000"
    )
    assert s["rows"] == 50 and s["shards"] > 1
    ids = {r["sample_id"] for r in CloudStreamingDataset(str(tmp_path / "shards"))}
    assert ids == {f"train.jsonl#k{i}" for i in range(50)}


def test_damaged_record_files_are_quarantined_and_the_rest_goes_on(bucket, s3opts):
    source = f"{bucket}/raw"
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(20_000)).encode()
    storage.write_bytes(f"{source}/cut.jsonl.gz", gzip.compress(lines)[:-5000], s3opts)
    storage.write_bytes(f"{source}/bad.parquet", b"PAR1 this is not a parquet file PAR1", s3opts)
    storage.write_bytes(f"{source}/good.jsonl", b'{"text": "fine"}\n', s3opts)
    table, problems = build_manifest(source, s3opts)
    by_key = {p["key"]: p for p in problems}
    assert set(by_key) == {"cut.jsonl.gz", "bad.parquet"} and by_key["bad.parquet"]["error"] == "corrupt"
    assert by_key["cut.jsonl.gz"]["message"].startswith("after ")
    keys = table["key"].to_pylist()
    assert "good.jsonl#0" in keys and sum(k.startswith("cut.jsonl.gz#") for k in keys) < 20_000
