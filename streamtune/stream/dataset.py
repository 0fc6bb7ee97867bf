"""CloudStreamingDataset: rows of a shard set, streamed from object storage with exact resume."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from streamtune.records.inplace import build_index, decode_parquet, file_url
from streamtune.shards.format import INDEX_NAME, ShardError
from streamtune.shards.index import decode_batch, parse_index
from streamtune.stream.buffers import BufferPool
from streamtune.stream.cache import RangeCache
from streamtune.stream.fetch import RangeFetcher, RetryPolicy, Stats
from streamtune.stream.plan import build_ranges, epoch_order, need_order, partition_bounds
from streamtune.stream.prefetch import Prefetcher
from streamtune.stream.rows import RangeRows

STATE_FORMAT = "streamtune-stream-state"


class CloudStreamingDataset:
    """Iterate the rows of a shard set (see streamtune/shards/README.md) as dicts.

    Order is a pure function of the index and (seed, epoch, shuffle, partition, range_bytes,
    shuffle_shards, shuffle_block_bytes); `state_dict()` is the position in that order, so a fresh
    process resumes with exactly the samples not yet yielded. `rank`/`world_size` and
    `worker_id`/`num_workers` cut the epoch's sample sequence into disjoint contiguous partitions.
    Memory: fetched-but-unconsumed bytes stay under `prefetch_bytes` (the shuffle block is capped at
    half of it so the next block can load while the current one is consumed). Binary values are `bytes`
    copies; `zero_copy=True` yields read-only memoryviews into the fetched range instead (faster, but a
    kept value keeps its whole range in memory, outside the budget).
    See README.md in this folder for the order, the state_dict format and the cache.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch_bytes: int = 256 << 20,
        max_concurrency: int = 16,
        columns: list[str] | None = None,
        *,
        range_bytes: int = 8 << 20,
        shuffle_shards: int = 8,
        shuffle_block_bytes: int = 64 << 20,
        worker_id: int | None = None,
        num_workers: int | None = None,
        cache_dir: str | None = None,
        cache_limit_bytes: int = 10 << 30,
        retries: int = 8,
        checksum_retries: int = 5,
        backoff_s: float = 0.05,
        timeout_s: float = 60.0,
        zero_copy: bool = False,
    ):
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if prefetch_bytes <= 0 or max_concurrency <= 0 or range_bytes <= 0:
            raise ValueError("prefetch_bytes, max_concurrency and range_bytes must be positive")
        self.url = url.rstrip("/")
        # a Parquet/Arrow file (or a folder of them without index.json) is streamed in place
        self._one_file = file_url(self.url)
        self._storage_options = storage_options
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self._auto_workers = worker_id is None and num_workers is None
        self.worker_id, self.num_workers = int(worker_id or 0), int(num_workers or 1)
        self.zero_copy = bool(zero_copy)
        self.prefetch_bytes = int(prefetch_bytes)
        self.max_concurrency = int(max_concurrency)
        self.range_bytes = int(range_bytes)
        self.shuffle_shards = int(shuffle_shards)
        self.block_bytes = max(1, min(int(shuffle_block_bytes), self.prefetch_bytes // 2))
        self._stats = Stats()
        # A zero-copy row is a view into its range's buffer: that buffer is reused only once no row of it
        # is alive any more (BufferPool.give checks).
        self._buffers = BufferPool(self.prefetch_bytes)
        cache = RangeCache(cache_dir, cache_limit_bytes) if cache_dir else None
        policy = RetryPolicy(retries=retries, backoff_s=backoff_s, checksum_retries=checksum_retries)
        self._fetcher = RangeFetcher(
            self._one_file[0] if self._one_file else self.url,
            storage_options,
            policy=policy,
            timeout_s=timeout_s,
            cache=cache,
            stats=self._stats,
        )
        self.index = self._read_index(policy.checksum_retries)
        schema: pa.Schema = self.index["schema"]
        self.schema = schema
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ValueError(f"columns {missing} are not in the shard set (it has {schema.names})")
        self.columns = list(columns) if columns is not None else list(schema.names)
        self._shards = self.index["shards"]
        self._ranges = build_ranges(self._shards, self.range_bytes)
        self._set_workers(self.worker_id, self.num_workers)
        self.epoch = int(epoch)
        self._position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._generation = 0

    def _set_workers(self, worker_id: int, num_workers: int) -> None:
        self.worker_id, self.num_workers = worker_id, num_workers
        self._parts = [(self.rank, self.world_size), (worker_id, num_workers)]
        lo, hi = partition_bounds(self._ranges.total_rows, self._parts)
        self._len = hi - lo
        self._order_cache = None

    def __getstate__(self) -> dict:
        """Pickles as its arguments and position (threads and connections are rebuilt on unpickling)."""
        return {"args": self._init_args, "epoch": self.epoch, "position": self._position}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["args"])
        self.epoch, self._position = state["epoch"], state["position"]

    def _read_index(self, refetches: int) -> dict:
        if self._one_file:
            return build_index(self._one_file[0], self._storage_options, only=self._one_file[1])
        # index.json has no checksum of its own: a damaged read shows up as a parse error, so re-read.
        for attempt in range(refetches + 1):
            try:
                return parse_index(self._fetcher.read_object(INDEX_NAME), f"{self.url}/{INDEX_NAME}")
            except ShardError as e:
                if "object not found" in str(e):
                    try:
                        return build_index(self.url, self._storage_options)  # Parquet/Arrow files in place
                    except FileNotFoundError:
                        raise e from None
                if "not valid JSON" not in str(e) or attempt == refetches:
                    raise
                self._stats.add(retries=1)
        raise AssertionError("unreachable")

    # --- order and state -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch starts at its beginning."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(
                self._ranges,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                parts=self._parts,
                shuffle_shards=self.shuffle_shards,
                block_bytes=self.block_bytes,
            )
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _order_key(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([e["checksum"] for e in self._shards]).encode()).hexdigest()[:16]
        return {
            "index": digest,
            "rows": self._ranges.total_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker_id": self.worker_id,
            "num_workers": self.num_workers,
            "range_bytes": self.range_bytes,
            "shuffle_shards": self.shuffle_shards,
            "block_bytes": self.block_bytes if self.shuffle else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: samples yielded so far in `epoch`, plus what fixes the order."""
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "epoch": self.epoch,
            "position": self._position,
            "order": self._order_key(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("version") != 1:
            raise ValueError("not a CloudStreamingDataset state_dict")
        mine = self._order_key()
        theirs = state.get("order", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
            raise ValueError(f"state_dict was saved with a different sample order ({detail})")
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise ValueError(f"state position {position} is outside this partition of {self._len} samples")
        self.epoch = int(state["epoch"])
        self._position = position
        self._generation += 1  # an iterator started before the load stops counting

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    # --- iteration --------------------------------------------------------------------------------

    def _load_range(self, r: int) -> RangeRows:
        ranges = self._ranges
        entry = self._shards[int(ranges.shard[r])]
        base = int(ranges.offset[r])
        batches = ranges.batches[r]
        checks = [(b["offset"] - base, b["length"], b["checksum"]) for b in batches if b["checksum"]]
        data = self._fetcher.read_range(
            entry["path"], base, int(ranges.length[r]), checks, pool=self._buffers
        )
        buf = pa.py_buffer(data)
        decoded = []
        if entry.get("format") == "parquet":  # row groups of a Parquet file streamed in place
            decoded = decode_parquet(entry, data, base, batches)
            batches = []
        for b in batches:
            try:
                batch = decode_batch(buf.slice(b["offset"] - base, b["length"]), self.schema)
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"shard {entry['path']}: batch at {b['offset']} does not decode: {e}") from e
            if batch.num_rows != b["rows"]:
                raise ShardError(
                    f"shard {entry['path']}: batch at {b['offset']} has {batch.num_rows} rows, "
                    f"index says {b['rows']}"
                )
            decoded.append(batch)
        return RangeRows(
            decoded, self.columns, zero_copy=self.zero_copy, release=lambda: self._buffers.give(data)
        )

    def __iter__(self) -> Iterator[dict]:
        if self._auto_workers:  # inside a torch DataLoader worker: take this worker's share
            worker = _torch_worker()
            if worker != (self.worker_id, self.num_workers):
                self._set_workers(*worker)
        self._generation += 1
        generation = self._generation
        epoch, start = self.epoch, self._position
        order = self._order(epoch)
        if self._stats.started is None:
            self._stats.started = time.perf_counter()
        rest = order[start:]
        need, uses, rid = need_order(self._ranges, rest)
        first = self._ranges.first.tolist()
        prefetcher = Prefetcher(
            need.tolist(),
            self._ranges.memory.tolist().__getitem__,
            self._load_range,
            budget_bytes=self.prefetch_bytes,
            max_concurrency=self.max_concurrency,
            stats=self._stats,
            trim=self.zero_copy,
        )
        try:
            loaded: dict[int, RangeRows] = {}
            for g, r in zip(rest.tolist(), rid.tolist(), strict=True):
                rows = loaded.get(r)
                if rows is None:
                    rows = loaded[r] = prefetcher.get(r)
                sample = rows.row(g - first[r])
                left = uses[r] - 1
                uses[r] = left
                if left == 0:
                    del loaded[r]
                    rows.close()  # its buffer goes back to the pool unless zero-copy rows still use it
                    prefetcher.release(r)
                if generation == self._generation:
                    self._position += 1
                self._stats.add(samples=1)
                yield sample
            if generation == self._generation:
                self.epoch, self._position = epoch + 1, 0
        finally:
            prefetcher.close()

    def __repr__(self) -> str:
        return (
            f"CloudStreamingDataset({self.url!r}, rows={self._ranges.total_rows}, partition={self._len}, "
            f"shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch}, position={self._position})"
        )


def _torch_worker() -> tuple[int, int]:
    """Inside a torch DataLoader worker, split by worker like `num_workers`/`worker_id` would."""
    torch_data = sys.modules.get("torch.utils.data")
    if torch_data is None:
        return 0, 1
    info = torch_data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)
