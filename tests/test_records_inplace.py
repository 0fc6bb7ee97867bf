"""Parquet and Arrow files streamed in place by CloudStreamingDataset: row groups / record batches as
ranges, the same shuffle, partitions and exact resume as a shard set."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamtune import CloudStreamingDataset, storage

N = 100_000


def table(n: int = N, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": ids,
            "prompt": [f"question {i}" for i in ids],
            "completion": [f"answer {i}" * (1 + i % 3) for i in ids],
            "blob": [bytes([i % 256]) * (i % 7) for i in ids],
        }
    )


def put_parquet(url: str, t: pa.Table, so: dict, row_group_size: int = 4_000) -> None:
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=row_group_size, compression="zstd")
    storage.write_bytes(url, buf.getvalue(), so)


def put_arrow(url: str, t: pa.Table, so: dict, stream: bool, chunk: int = 3_000) -> None:
    sink = pa.BufferOutputStream()
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with opener(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=chunk):
            w.write_batch(b)
    storage.write_bytes(url, sink.getvalue().to_pybytes(), so)


def test_parquet_streams_in_place_with_shuffle_partitions_and_exact_resume(bucket, s3opts):
    url = f"{bucket}/data/train.parquet"
    put_parquet(url, table(), s3opts)
    kw = dict(shuffle=True, seed=5, range_bytes=1 << 20, prefetch_bytes=16 << 20)
    ds = CloudStreamingDataset(url, s3opts, **kw)
    assert len(ds) == N and ds.index["shards"][0]["format"] == "parquet"
    rows = list(ds)
    assert sorted(r["id"] for r in rows) == list(range(N))
    assert rows[0] == {k: v[0] for k, v in table().slice(rows[0]["id"], 1).to_pydict().items()}
    assert [r["id"] for r in rows[:50]] != list(range(50))  # shuffled
    assert [r["id"] for r in CloudStreamingDataset(url, s3opts, **kw)] == [r["id"] for r in rows]
    first = CloudStreamingDataset(url, s3opts, **kw, columns=["id"])
    it = iter(first)
    head = [next(it)["id"] for _ in range(42_017)]
    state = json.loads(json.dumps(first.state_dict()))
    rest = CloudStreamingDataset(url, s3opts, **kw, columns=["id"])
    rest.load_state_dict(state)
    assert head + [r["id"] for r in rest] == [r["id"] for r in rows]
    parts = [
        [r["id"] for r in CloudStreamingDataset(url, s3opts, **kw, columns=["id"], rank=k, world_size=3)]
        for k in range(3)
    ]
    assert sorted(sum(parts, [])) == list(range(N))
    # the file changes: an old position names other rows, so it is refused
    put_parquet(url, table(N - 1), s3opts)
    with pytest.raises(ValueError, match="different sample order"):
        CloudStreamingDataset(url, s3opts, **kw, columns=["id"]).load_state_dict(state)


def test_folder_of_arrow_files_and_a_save_to_disk_folder_stream_in_place(bucket, s3opts, tmp_path):
    put_arrow(f"{bucket}/arrow/a.arrow", table(10_000), s3opts, stream=False)
    put_arrow(f"{bucket}/arrow/b.arrow", table(5_000, start=10_000), s3opts, stream=True)
    storage.write_bytes(f"{bucket}/arrow/README.md", b"not data", s3opts)
    ds = CloudStreamingDataset(f"{bucket}/arrow", s3opts, shuffle=True, seed=0)
    assert sorted(r["id"] for r in ds) == list(range(15_000))
    datasets = pytest.importorskip("datasets")
    from streamtune.demo.data import upload_dir

    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(2_500)]}).save_to_disk(str(tmp_path / "hf"))
    upload_dir(str(tmp_path / "hf"), f"{bucket}/hf", s3opts)
    hf = CloudStreamingDataset(f"{bucket}/hf", s3opts)
    assert [r["text"] for r in hf] == [f"t{i}" for i in range(2_500)]


def test_dictionary_arrow_and_empty_folders_are_clear_errors(bucket, s3opts):
    t = pa.table({"x": pa.array(["a", "b", "a"]).dictionary_encode()})
    put_arrow(f"{bucket}/d/x.arrow", t, s3opts, stream=True)
    with pytest.raises(ValueError, match="dictionary batches"):
        CloudStreamingDataset(f"{bucket}/d", s3opts)
    storage.write_bytes(f"{bucket}/e/notes.txt", b"x", s3opts)
    with pytest.raises(Exception, match="not found"):
        CloudStreamingDataset(f"{bucket}/e", s3opts)
