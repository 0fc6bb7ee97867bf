import json
import os

import numpy as np
import pyarrow as pa
import pytest

from streamtune import storage
from streamtune.shards import (
    RAW_SCHEMA,
    ShardError,
    ShardSetWriter,
    commit_index,
    decode_batch,
    read_index,
    read_shard_table,
    shard_name,
    write_shard,
)

FEATURE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("transcript", pa.string()),
        ("segments", pa.string()),
        ("language", pa.string()),
        ("clip_embedding", pa.list_(pa.float32(), 8)),
        ("tags", pa.list_(pa.string())),
    ]
)


def raw_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "sample_id": f"clips/{i:05d}",
            "audio": rng.bytes(int(rng.integers(0, 6000))) if i % 3 else None,
            "image": rng.bytes(int(rng.integers(100, 4000))),
            "text": "caption " * int(rng.integers(0, 40)),
            "meta": json.dumps({"i": i}),
            "sources": [f"clips/{i:05d}.wav", f"clips/{i:05d}.jpg"],
            "video": None,
            "refs": None,
        }
        for i in range(n)
    ]


def feature_table(n):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((n, 8), dtype=np.float32)
    return pa.table(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "transcript": ["hello world " * (i % 9) for i in range(n)],
            "segments": [json.dumps([{"start": 0.0, "end": 1.0 * i}]) for i in range(n)],
            "language": ["en"] * n,
            "clip_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8),
            "tags": [["a", "b"][: i % 3] for i in range(n)],
        },
        schema=FEATURE_SCHEMA,
    )


def test_shard_name():
    assert shard_name(12) == "shard-00012.arrow"


def test_writer_rolls_shards_and_round_trips_over_s3(bucket, s3opts):
    prefix = f"{bucket}/raw"
    rows = raw_rows(600)
    writer = ShardSetWriter(prefix, RAW_SCHEMA, s3opts, max_shard_bytes=300_000, batch_bytes=60_000)
    for row in rows[:250]:
        writer.write(row)
    assert not storage.exists(f"{prefix}/index.json", s3opts), "index must only appear on close"
    writer.write(pa.Table.from_pylist(rows[250:], schema=RAW_SCHEMA))
    index = writer.close(extra={"source": "unit"})

    assert index["rows"] == 600 and index["source"] == "unit"
    assert len(index["shards"]) > 3
    assert [e["path"] for e in index["shards"]] == [shard_name(i) for i in range(len(index["shards"]))]
    loaded = read_index(prefix, s3opts)
    assert loaded["schema"].equals(RAW_SCHEMA)
    assert loaded["bytes"] == sum(e["bytes"] for e in loaded["shards"])
    table = pa.concat_tables(read_shard_table(prefix, e, s3opts) for e in loaded["shards"])
    assert table.to_pylist() == rows
    for e in loaded["shards"]:
        assert e["bytes"] <= 300_000 * 1.2
        assert len(e["batches"]) >= 2
        assert e["compression"] == "zstd"  # text columns; media stored as is
        assert e["uncompressed_columns"] == ["audio", "image", "video"]


@pytest.mark.parametrize("compression", ["zstd", "lz4", None, "auto"])
def test_one_batch_from_one_ranged_get(bucket, s3opts, compression):
    table = feature_table(500)
    url = f"{bucket}/f/{shard_name(0)}"
    entry = write_shard(table, url, s3opts, batch_bytes=8_000, compression=compression)
    assert entry["compression"] == ("zstd" if compression == "auto" else compression)
    fs, path = storage.arrow_fs(url, s3opts)
    parts = []
    with fs.open_input_file(path) as f:
        for b in entry["batches"]:
            data = f.read_at(b["length"], b["offset"])
            batch = decode_batch(data, FEATURE_SCHEMA)
            assert batch.num_rows == b["rows"]
            parts.append(batch)
    assert pa.Table.from_batches(parts).equals(table)


def test_compressed_text_shard_is_smaller():
    from streamtune.shards import encode_shard

    table = feature_table(2000)
    plain, _ = encode_shard(table, compression=None)
    packed, entry = encode_shard(table, compression="auto")
    assert entry["compression"] == "zstd" and len(packed) < 0.7 * len(plain)


def test_per_column_compression_keeps_media_raw():
    from streamtune.shards import encode_shard

    rows = raw_rows(300)
    for row in rows:
        row["text"] = "a long caption that compresses well " * 20
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    plain, _ = encode_shard(table, compression=None)
    data, entry = encode_shard(table, batch_bytes=100_000, compression="auto")
    assert entry["compression"] == "zstd" and entry["uncompressed_columns"] == ["audio", "image", "video"]
    media = sum(len(r["audio"] or b"") + len(r["image"]) for r in rows)
    text = sum(len(r["text"]) for r in rows)
    assert len(data) < len(plain) - 0.8 * text  # text shrank
    assert len(data) > media  # media kept, not recompressed
    assert pa.ipc.open_file(pa.py_buffer(data)).read_all().equals(table)
    for b in entry["batches"]:
        batch = decode_batch(data[b["offset"] : b["offset"] + b["length"]], RAW_SCHEMA)
        assert batch.num_rows == b["rows"]

    _, entry = encode_shard(table, compression={"text": "zstd", "meta": "zstd", "sources": "lz4"})
    assert entry["compression"] == "zstd"
    assert entry["uncompressed_columns"] == ["sample_id", "audio", "image", "video"]
    _, entry = encode_shard(table.select(["sample_id", "text", "meta"]), compression={"text": "lz4"})
    assert entry["compression"] == "lz4" and entry["uncompressed_columns"] == ["sample_id", "meta"]
    with pytest.raises(ValueError, match="unknown columns"):
        encode_shard(table, compression={"nope": "zstd"})
    with pytest.raises(ValueError, match="unknown codecs"):
        encode_shard(table, compression={"text": "brotli9"})


def test_checksum_mismatch_names_the_shard(tmp_path):
    prefix = str(tmp_path)
    writer = ShardSetWriter(prefix, RAW_SCHEMA, max_shard_rows=20)
    writer.write(raw_rows(50))
    index = writer.close()
    victim = index["shards"][1]
    path = os.path.join(prefix, victim["path"])
    data = bytearray(open(path, "rb").read())
    data[victim["batches"][0]["offset"] + 100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    read_shard_table(prefix, index["shards"][0])
    with pytest.raises(ShardError, match=victim["path"]):
        read_shard_table(prefix, victim)
    os.remove(os.path.join(prefix, index["shards"][2]["path"]))
    with pytest.raises(ShardError, match="missing"):
        read_shard_table(prefix, index["shards"][2])


def test_missing_and_corrupt_index(tmp_path, bucket, s3opts):
    with pytest.raises(ShardError, match="no shard index"):
        read_index(f"{bucket}/nothing", s3opts)
    storage.write_bytes(f"{bucket}/bad/index.json", b"{not json", s3opts)
    with pytest.raises(ShardError, match="not valid JSON"):
        read_index(f"{bucket}/bad", s3opts)
    storage.write_json(f"{bucket}/other/index.json", {"format": "parquet"}, s3opts)
    with pytest.raises(ShardError, match="not a streamtune-shards index"):
        read_index(f"{bucket}/other", s3opts)
    entry = write_shard(feature_table(10), str(tmp_path / shard_name(0)))
    entry["batches"][0]["offset"] = entry["bytes"]
    commit_index(str(tmp_path), [entry], FEATURE_SCHEMA)
    with pytest.raises(ShardError, match="inconsistent"):
        read_index(str(tmp_path))


def test_append_keeps_existing_shards(tmp_path):
    prefix = str(tmp_path)
    first = ShardSetWriter(prefix, FEATURE_SCHEMA)
    first.write(feature_table(30))
    first.close()
    second = ShardSetWriter(prefix, FEATURE_SCHEMA, start_index=1, append=True)
    second.write(feature_table(20))
    index = second.close()
    assert [e["path"] for e in index["shards"]] == [shard_name(0), shard_name(1)]
    assert index["rows"] == 50
    with pytest.raises(ShardError, match="already in the index"):
        clash = ShardSetWriter(prefix, FEATURE_SCHEMA, start_index=1, append=True)
        clash.write(feature_table(5))
        clash.close()


def test_dictionary_columns_are_stored_plain(tmp_path):
    table = pa.table({"sample_id": pa.array(["a", "b", "a"]).dictionary_encode(), "x": [1, 2, 3]})
    entry = write_shard(table, str(tmp_path / shard_name(0)))
    schema = pa.schema([("sample_id", pa.string()), ("x", pa.int64())])
    commit_index(str(tmp_path), [entry], schema)
    assert read_shard_table(str(tmp_path), entry).column("sample_id").to_pylist() == ["a", "b", "a"]
