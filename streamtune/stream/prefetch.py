"""Fetch ranges ahead of the consumer, in the order it will need them, under a byte budget."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from streamtune.stream.fetch import Stats


class Prefetcher:
    """Keeps up to `max_concurrency` range fetches in flight, never holding more than `budget_bytes`.

    A range's bytes are reserved when its fetch starts and released when the consumer has taken its last
    sample. Ranges are started strictly in `need` order (first use), which makes the budget safe: the
    consumer only ever waits for ranges of the current shuffle block, and a block fits in the budget.
    A range bigger than the whole budget is still fetched, alone.
    """

    def __init__(
        self,
        need: list[int],
        sizes: Callable[[int], int],
        load: Callable[[int], object],
        *,
        budget_bytes: int,
        max_concurrency: int,
        stats: Stats,
        trim: bool = True,
    ):
        self._need = need
        self._sizes = sizes
        self._load = load
        self._budget = budget_bytes
        self._max = max(1, max_concurrency)
        self._stats = stats
        self._next = 0
        self._live = 0  # reserved bytes: in flight + fetched and not yet released
        self._reserved: dict[int, int] = {}
        self._futures: dict[int, Future] = {}
        self._inflight = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=self._max, thread_name_prefix="streamtune-fetch")
        self._freed = 0
        self._trim_every = max(1, min(budget_bytes // 4, 64 << 20))
        self._trimmer = _Trimmer(enabled=trim)
        self._pump()

    @property
    def live_bytes(self) -> int:
        return self._live

    def _pump(self) -> None:
        started = []
        with self._lock:
            while not self._closed and self._next < len(self._need) and self._inflight < self._max:
                r = self._need[self._next]
                size = self._sizes(r)
                if self._live and self._live + size > self._budget:
                    break
                self._next += 1
                self._live += size
                self._stats.peak(self._live)
                self._reserved[r] = size
                self._inflight += 1
                future = self._pool.submit(self._run, r)
                self._futures[r] = future
                started.append(future)
        for future in started:  # outside the lock: a finished future runs its callback right here
            future.add_done_callback(self._done)

    def _run(self, r: int) -> object:
        result = self._load(r)
        nbytes = getattr(result, "nbytes", 0)
        if nbytes > self._reserved.get(r, nbytes):
            self.resize(r, nbytes)
        return result

    def _done(self, _future: Future) -> None:
        with self._lock:
            self._inflight -= 1
        self._pump()

    def get(self, r: int) -> object:
        """The loaded range `r`, waiting (and counting the wait) if it is not there yet."""
        future = self._futures.get(r)
        if future is None or not future.done():
            start = time.perf_counter()
            while future is None:
                self._pump()
                future = self._futures.get(r)
                if future is None:
                    time.sleep(0.001)
            result = future.result()
            self._stats.add(wait_s=time.perf_counter() - start)
            return result
        return future.result()

    def resize(self, r: int, nbytes: int) -> None:
        """Account a loaded range at its in-memory size (decompressed shards grow)."""
        with self._lock:
            if r in self._reserved:
                self._live += nbytes - self._reserved[r]
                self._reserved[r] = nbytes
                self._stats.peak(self._live)

    def release(self, r: int) -> None:
        with self._lock:
            size = self._reserved.pop(r, 0)
            self._live -= size
            self._futures.pop(r, None)
        self._freed += size
        if self._freed >= self._trim_every:
            self._freed = 0
            self._trimmer.request()
        self._pump()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            futures = list(self._futures.values())
            self._futures.clear()
        for f in futures:
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._trimmer.stop()


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


class _Trimmer:
    """Gives freed range buffers back to the OS from a background thread.

    glibc raises its mmap threshold after large frees, so later multi-MB buffers come from per-thread
    arenas that keep their pages: without a trim RSS drifts well above the prefetch budget. A trim costs
    milliseconds, so it runs off the consumer's path, once per quarter budget (at most 64 MiB) released.
    """

    def __init__(self, enabled: bool = True):
        self._wake = threading.Event()
        self._stopped = False
        self._thread = None
        if enabled and _malloc_trim is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="streamtune-trim")
            self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            _malloc_trim(0)
