"""Ranged reads of shard bytes with retries, integrity checks and an optional disk cache."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from streamtune import storage
from streamtune.shards.format import ShardError, checksum_matches
from streamtune.stream.buffers import BufferPool
from streamtune.stream.cache import RangeCache


@dataclass
class Stats:
    """Counters shared by the fetch threads and the consumer."""

    bytes: int = 0
    requests: int = 0
    retries: int = 0
    refetched_bytes: int = 0
    checksum_failures: int = 0
    cache_hits: int = 0
    samples: int = 0
    wait_s: float = 0.0
    peak_prefetch_bytes: int = 0
    started: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def peak(self, live_bytes: int) -> None:
        with self._lock:
            self.peak_prefetch_bytes = max(self.peak_prefetch_bytes, live_bytes)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.perf_counter() - self.started if self.started else 0.0
            return {
                "bytes": self.bytes,
                "requests": self.requests,
                "retries": self.retries,
                "refetched_bytes": self.refetched_bytes,
                "checksum_failures": self.checksum_failures,
                "cache_hits": self.cache_hits,
                "samples": self.samples,
                "wait_s": round(self.wait_s, 4),
                "peak_prefetch_bytes": self.peak_prefetch_bytes,
                "elapsed_s": round(elapsed, 4),
                "mb_s": round(self.bytes / elapsed / 1e6, 2) if elapsed > 0 else 0.0,
                "samples_s": round(self.samples / elapsed, 2) if elapsed > 0 else 0.0,
            }


class TransientError(OSError):
    """A read that may succeed when retried (short body, corrupt bytes)."""


@dataclass
class RetryPolicy:
    retries: int = 8  # attempts after the first, per range
    backoff_s: float = 0.05  # first backoff; doubles per attempt, full jitter
    max_backoff_s: float = 5.0
    checksum_retries: int = 5  # refetches of a range whose bytes fail their checksum

    def sleep(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt)))


class RangeFetcher:
    """Fetch byte ranges of objects under one prefix; thread-safe.

    s3:// goes through pyarrow's C++ S3 client (GIL released, its own retries off so every retry is
    ours and counted); other URLs through pyarrow's wrapper of the fsspec filesystem.
    """

    def __init__(
        self,
        prefix_url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        policy: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        cache: RangeCache | None = None,
        stats: Stats | None = None,
    ):
        self.prefix_url = prefix_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.cache = cache
        self.stats = stats or Stats()
        s3_kwargs = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            "connect_timeout": min(timeout_s, 10.0),
            "request_timeout": timeout_s,
        }
        self.fs, self.base = storage.arrow_fs(self.prefix_url, storage_options, **s3_kwargs)
        self._idle: dict[str, list[pa.NativeFile]] = {}  # open handles; a read (seek + readinto) owns one
        self._opened: dict[str, int] = {}  # generation of each name's handles; bumped by _drop
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def _drop(self, name: str) -> None:
        with self._lock:
            self._idle.pop(name, None)
            self._opened[name] = self._opened.get(name, 0) + 1

    def _take_handle(self, name: str) -> tuple[pa.NativeFile, int]:
        with self._lock:
            generation = self._opened.get(name, 0)
            idle = self._idle.get(name)
            if idle:
                return idle.pop(), generation
        return self.fs.open_input_file(self._path(name)), generation

    def _give_handle(self, name: str, f: pa.NativeFile, generation: int) -> None:
        with self._lock:
            if self._opened.get(name, 0) == generation:
                self._idle.setdefault(name, []).append(f)

    def read_object(self, name: str) -> bytes:
        """A whole small object (index.json), with the same retries and short-read handling."""
        size = self._with_retries(name, lambda: self._size(name), name=name)
        try:
            return bytes(self.read_range(name, 0, size, [], use_cache=False))
        finally:
            self._drop(name)  # the next open sees a rewritten index

    def size(self, name: str) -> int:
        """The object's size in bytes (one HEAD), with the same retries."""
        return self._with_retries(name, lambda: self._size(name), name=name)

    def read_range(
        self,
        name: str,
        offset: int,
        length: int,
        checks: list[tuple[int, int, str]],
        use_cache: bool = True,
        pool: BufferPool | None = None,
    ) -> memoryview:
        """Bytes [offset, offset+length) of `name`, verified against (relative offset, length, checksum)s.

        With `pool`, the bytes are read into a pooled buffer (a memoryview the caller gives back), else into
        a bytearray of their own."""
        key = (name, offset, length, checks[0][2] if checks else "")
        cache = self.cache if use_cache else None
        if cache is not None:
            cached = cache.get(key)
            if cached is not None and not _failures(memoryview(cached), checks):
                self.stats.add(cache_hits=1)
                return memoryview(cached)  # not pooled: BufferPool.give lets it go
            if cached is not None:
                cache.discard(key)

        what = f"shard {name} bytes {offset}+{length}"
        data = pool.take(length) if pool is not None else memoryview(bytearray(length))
        try:
            self._with_retries(what, lambda: self._read_into(name, offset, data), name=name)
        except BaseException:
            if pool is not None:
                pool.give(data)
            raise
        # Bad batches are fetched again on their own; good ones are kept. This also repairs short bodies:
        # pyarrow's S3 client reports the full length even when a server answers a shorter 206.
        bad = _failures(data, checks)
        rounds = 0
        while bad:
            rounds += 1
            self.stats.add(checksum_failures=1)
            if rounds > self.policy.checksum_retries:
                off, n, expected = checks[bad[0]]
                raise ShardError(
                    f"{what} under {self.prefix_url}: batch at +{off} ({n} bytes) failed its checksum "
                    f"{expected} {rounds} times"
                )
            self.stats.add(retries=1)
            self.policy.sleep(rounds - 1)
            for i in bad:
                off, n, _ = checks[i]
                part = data[off : off + n]
                self._with_retries(
                    what, lambda o=off, p=part: self._read_into(name, offset + o, p), name=name
                )
                self.stats.add(refetched_bytes=n)
            bad = _failures(data, checks)
        if cache is not None:
            cache.put(key, data)
        return data

    def _size(self, name: str) -> int:
        f, generation = self._take_handle(name)
        size = f.size()
        self._give_handle(name, f, generation)
        return size

    def _read_into(self, name: str, offset: int, out: memoryview) -> None:
        f, generation = self._take_handle(name)
        got = 0
        while got < len(out):  # a short body: fetch only what is missing
            f.seek(offset + got)
            self.stats.add(requests=1)
            n = f.readinto(out[got:])
            self.stats.add(bytes=n, refetched_bytes=n if got else 0)
            if not n:
                raise TransientError(f"{name}: body ended at {got} of {len(out)} bytes")
            got += n
        self._give_handle(name, f, generation)

    def _with_retries(self, what: str, attempt, name: str | None = None):
        errors = 0
        while True:
            try:
                return attempt()
            except FileNotFoundError as e:
                raise ShardError(f"{what}: object not found under {self.prefix_url}") from e
            except (OSError, pa.ArrowException) as e:
                if name:
                    self._drop(name)
                errors += 1
                if errors > self.policy.retries:
                    raise ShardError(f"{what}: gave up after {errors} attempts: {e}") from e
                self.stats.add(retries=1)
                self.policy.sleep(errors - 1)


def _failures(data: memoryview, checks: list[tuple[int, int, str]]) -> list[int]:
    view = memoryview(data)
    return [
        i
        for i, (off, n, expected) in enumerate(checks)
        if not checksum_matches(view[off : off + n], expected)
    ]
