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
from streamtune.shards.format import ShardError, checksum
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
    checksum_retries: int = 2  # refetches of a range whose bytes fail their checksum

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
        self._files: dict[str, pa.NativeFile] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def _file(self, name: str) -> pa.NativeFile:
        with self._lock:
            f = self._files.get(name)
        if f is None:
            f = self.fs.open_input_file(self._path(name))
            with self._lock:
                self._files[name] = f
        return f

    def _drop(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)

    def read_object(self, name: str) -> bytes:
        """A whole small object (index.json), with the same retry policy."""

        def attempt() -> bytes:
            self.stats.add(requests=1)
            with self.fs.open_input_stream(self._path(name)) as f:
                data = f.read()
            self.stats.add(bytes=len(data))
            return data

        return self._with_retries(name, attempt, verify=None)

    def read_range(self, name: str, offset: int, length: int, checks: list[tuple[int, int, str]]) -> bytes:
        """Bytes [offset, offset+length) of `name`, verified against (relative offset, length, checksum)s."""
        key = (name, offset, length, checks[0][2] if checks else "")
        if self.cache is not None:
            data = self.cache.get(key)
            if data is not None and _verify(data, checks) is None:
                self.stats.add(cache_hits=1)
                return data
            if data is not None:
                self.cache.discard(key)

        def attempt() -> bytes:
            f = self._file(name)
            self.stats.add(requests=1)
            data = f.read_at(length, offset)
            self.stats.add(bytes=len(data))
            # A short body: fetch only what is missing instead of starting over.
            while len(data) < length:
                more = f.read_at(length - len(data), offset + len(data))
                self.stats.add(requests=1, bytes=len(more), refetched_bytes=len(more))
                if not more:
                    raise TransientError(f"{name}: body ended at {len(data)} of {length} bytes")
                data += more
            return data

        data = self._with_retries(f"{name} bytes {offset}+{length}", attempt, verify=checks, name=name)
        if self.cache is not None:
            self.cache.put(key, data)
        return data

    def _with_retries(self, what: str, attempt, verify, name: str | None = None) -> bytes:
        errors, corrupt = 0, 0
        while True:
            try:
                data = attempt()
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
                continue
            bad = _verify(data, verify) if verify else None
            if bad is None:
                return data
            corrupt += 1
            self.stats.add(checksum_failures=1)
            if corrupt > self.policy.checksum_retries:
                raise ShardError(f"{what} under {self.prefix_url} failed its checksum {corrupt} times: {bad}")
            self.stats.add(retries=1)
            self.policy.sleep(corrupt - 1)


def _verify(data: bytes, checks: list[tuple[int, int, str]]) -> str | None:
    view = memoryview(data)
    for off, length, expected in checks:
        got = checksum(view[off : off + length])
        if got != expected:
            return f"batch at +{off} ({length} bytes) has {got}, index says {expected}"
    return None
