"""Read one shard as a stream of tables: ranged GETs in file order, one range fetched ahead.

For stages that consume a shard front to back (decode): memory holds at most two ranges of about
`range_bytes` (a single record batch larger than that is its own range), whatever the shard's size. Every
record batch is checked against its checksum as it arrives (refetched like CloudStreamingDataset does), and
every byte of the file goes through an incremental hash, so a shard whose whole-file checksum or size does
not match its index entry raises `ShardError`, after the last table: callers that must not commit a
partly read shard keep what they made from it until the iterator ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from streamtune.shards.format import ShardError, hasher
from streamtune.shards.index import decode_batch
from streamtune.stream.fetch import RangeFetcher, RetryPolicy, Stats

_MAGIC = 8  # "ARROW1" + padding; the schema message follows


def file_ranges(entry: dict, range_bytes: int) -> list[tuple[int, int, list[dict]]]:
    """(start, stop, batches) covering the whole file [0, bytes): runs of batches of about `range_bytes`;
    the first range also holds the schema, the last the footer."""
    batches = sorted(entry.get("batches") or [], key=lambda b: b["offset"])
    ranges: list[tuple[int, int, list[dict]]] = []
    start, run = 0, []
    for b in batches:
        end = b["offset"] + b["length"]
        if run and end - start > range_bytes:
            ranges.append((start, b["offset"], run))
            start, run = b["offset"], []
        run.append(b)
    ranges.append((start, int(entry["bytes"]), run))
    return ranges


def iter_shard_tables(
    prefix_url: str,
    entry: dict,
    storage_options: dict[str, Any] | None = None,
    *,
    range_bytes: int = 8 << 20,
    policy: RetryPolicy | None = None,
    stats: Stats | None = None,
    fetcher: RangeFetcher | None = None,
) -> Iterator[pa.Table]:
    """Tables of the record batches of shard `entry` (an index entry) in file order (one per range)."""
    name = entry["path"]
    fetcher = fetcher or RangeFetcher(prefix_url, storage_options, policy=policy, stats=stats)
    size = fetcher.size(name)
    if size != entry["bytes"]:
        raise ShardError(f"shard {name} is corrupt: {size} bytes, index says {entry['bytes']}")
    digest = hasher(entry["checksum"])
    ranges = file_ranges(entry, range_bytes)

    def fetch(i: int) -> memoryview:
        start, stop, batches = ranges[i]
        checks = [(b["offset"] - start, b["length"], b["checksum"]) for b in batches if b.get("checksum")]
        return fetcher.read_range(name, start, stop - start, checks, use_cache=False)

    schema = None
    with ThreadPoolExecutor(1, thread_name_prefix="streamtune-shard") as ahead:
        pending = ahead.submit(fetch, 0)
        for i, (start, _, batches) in enumerate(ranges):
            data = pending.result()
            pending = ahead.submit(fetch, i + 1) if i + 1 < len(ranges) else None
            digest.update(data)
            buf = pa.py_buffer(data)
            if schema is None:
                schema = _schema(buf, name)
            decoded = []
            for b in batches:
                try:
                    batch = decode_batch(buf.slice(b["offset"] - start, b["length"]), schema)
                except (pa.ArrowInvalid, OSError) as e:
                    raise ShardError(f"shard {name}: batch at {b['offset']} does not decode: {e}") from e
                if batch.num_rows != b["rows"]:
                    raise ShardError(
                        f"shard {name}: batch at {b['offset']} has {batch.num_rows} rows, index says {b['rows']}"
                    )
                decoded.append(batch)
            del data, buf
            if decoded:
                yield pa.Table.from_batches(decoded, schema)
    got = f"{entry['checksum'].partition(':')[0]}:{digest.hexdigest()}"
    if got != entry["checksum"]:
        raise ShardError(f"shard {name} is corrupt: checksum {got}, index says {entry['checksum']}")


def _schema(buf: pa.Buffer, name: str) -> pa.Schema:
    try:
        return pa.ipc.read_schema(pa.ipc.read_message(buf.slice(_MAGIC)))
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise ShardError(f"shard {name}: the schema at its start does not read: {e}") from e
