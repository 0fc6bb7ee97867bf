"""A seekable, read-only file over ranged GETs of one object, pinned to the version the manifest saw.

`open_ref(ref, storage_options)` opens a raw shard's reference (`refs` column: url, version, size) as a
`RemoteFile` that PyAV, Pillow or any reader of binary files can use. Reads go through the project's
`RangeFetcher` (retries with backoff, short-body completion) in aligned blocks: a small LRU of blocks
absorbs the back-and-forth seeks of demuxers near an index, and the block after a sequential read is
fetched ahead in the background. Nothing is written to disk and at most `cache_blocks + 1` blocks are
held, whatever the object's size.

Version pinning: the object's etag and size are checked on open, again every `check_every` block
fetches and by `verify()` (decode calls it when a sample is done), so an object replaced at the source
raises `ObjectChanged` instead of mixing bytes of two versions. pyarrow's S3 client sends no If-Match
and exposes no response etags, hence the HEAD checks.
"""

from __future__ import annotations

import io
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from streamtune import storage
from streamtune.shards.format import ShardError
from streamtune.stream.fetch import RangeFetcher, RetryPolicy

# 512 KiB: under two seconds of 2.5 Mbit/s video, so keyframe sampling every few seconds fetches little
# more than it decodes (4 MiB blocks cover ~13 s: sampling every 5 s read the whole file).
BLOCK_BYTES = 512 << 10
CACHE_BLOCKS = 16
READ_AHEAD = 8  # at most this many blocks fetched ahead (two at a time) while reads stay sequential
_AVSEEK_SIZE = 0x10000  # FFmpeg asks a custom IO for the stream size with this whence
_AVSEEK_FORCE = 0x20000


_totals_lock = threading.Lock()
_totals = {"files": 0, "bytes": 0, "requests": 0, "largest_request": 0}


def totals(reset: bool = False) -> dict[str, int]:
    """Counters over every RemoteFile closed in this process: files, bytes, requests, largest_request
    (bytes of the largest single GET). For benchmarks and tests of stages that open references."""
    with _totals_lock:
        out = dict(_totals)
        if reset:
            _totals.update(files=0, bytes=0, requests=0, largest_request=0)
    return out


class ObjectChanged(ValueError):
    """The object at a reference's URL is not the version the manifest recorded (replaced or removed)."""


def object_version(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, int]:
    """(etag as the manifest records it, size) of the object at `url`, asked of the server now."""
    from streamtune.manifest import etag_of

    fs, path = storage.get_fs(url, storage_options)
    fs.invalidate_cache(path)  # listings cached since the manifest stage would hide a replacement
    info = fs.info(path)
    return etag_of(info), int(info.get("size") or 0)


class RemoteFile(io.RawIOBase):
    """Read-only binary file over one object (see the module docstring). Counters: `bytes_fetched`,
    `requests` (GETs, retries included), `largest_request` (bytes), `version_checks` (HEADs after the
    first); `totals()` sums them over closed files."""

    def __init__(
        self,
        url: str,
        version: str | None,
        size: int | None,
        storage_options: dict[str, Any] | None = None,
        *,
        block_bytes: int | None = None,
        cache_blocks: int | None = None,
        read_ahead: bool = True,
        check_every: int = 16,
        policy: RetryPolicy | None = None,
        timeout_s: float = 60.0,
    ):
        super().__init__()
        block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes  # module defaults, read per file
        cache_blocks = CACHE_BLOCKS if cache_blocks is None else cache_blocks
        if block_bytes <= 0 or cache_blocks <= 0:
            raise ValueError("block_bytes and cache_blocks must be positive")
        self.url = url
        self.version = version
        self._options = storage_options
        self._check_every = max(0, int(check_every))
        etag, found_size = self._current()
        if version is not None and etag != version:
            raise ObjectChanged(f"{url} changed at the source: version {etag!r}, expected {version!r}")
        if size is not None and found_size != int(size):
            raise ObjectChanged(f"{url} changed at the source: {found_size} bytes, expected {size}")
        self.version = etag
        self._size = found_size
        prefix, self._name = posixpath.split(url.rstrip("/"))
        self._fetcher = RangeFetcher(prefix, storage_options, policy=policy, timeout_s=timeout_s)
        self._block = int(block_bytes)
        self._cache_blocks = int(cache_blocks)
        self._blocks: OrderedDict[int, memoryview] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ahead = ThreadPoolExecutor(2, thread_name_prefix="streamtune-remote") if read_ahead else None
        self._last_block = -2
        self._run = 0  # consecutive sequential block reads: read-ahead deepens with it
        self._fetches = 0
        self.largest_request = 0
        self._pos = 0
        self.version_checks = 0

    # --- counters and version ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def bytes_fetched(self) -> int:
        return self._fetcher.stats.bytes

    @property
    def requests(self) -> int:
        return self._fetcher.stats.requests

    def _current(self) -> tuple[str, int]:
        try:
            return object_version(self.url, self._options)
        except FileNotFoundError:
            raise ObjectChanged(f"{self.url} changed at the source: the object is gone") from None

    def verify(self) -> None:
        """Raise `ObjectChanged` if the object is no longer the version opened."""
        self.version_checks += 1
        etag, size = self._current()
        if etag != self.version or size != self._size:
            raise ObjectChanged(
                f"{self.url} changed at the source while being read: version {etag!r} ({size} bytes), "
                f"opened as {self.version!r} ({self._size} bytes)"
            )

    # --- blocks -----------------------------------------------------------------------------------

    def _fetch(self, i: int) -> memoryview:
        start = i * self._block
        length = min(self._block, self._size - start)
        try:
            data = self._fetcher.read_range(self._name, start, length, [], use_cache=False)
        except ShardError as e:
            self.verify()  # a short or failing read of a replaced object is a change, not a network error
            raise OSError(f"{self.url}: bytes {start}+{length}: {e}") from e
        with self._lock:
            self._fetches += 1
            self.largest_request = max(self.largest_request, length)
            due = self._check_every and self._fetches % self._check_every == 0
        if due:
            self.verify()
        return data

    def _get_block(self, i: int) -> memoryview:
        with self._lock:
            data = self._blocks.get(i)
            if data is not None:
                self._blocks.move_to_end(i)
            future = self._pending.pop(i, None) if data is None else None
        if data is None:
            data = future.result() if future is not None else self._fetch(i)
            with self._lock:
                self._blocks[i] = data
                while len(self._blocks) > self._cache_blocks:
                    self._blocks.popitem(last=False)
        if i == self._last_block + 1:
            self._run += 1
        elif i != self._last_block:
            self._run = 0
        if self._ahead is not None and self._run > 1:  # one block boundary crossed is no stream yet
            for j in range(i + 1, i + min(self._run, READ_AHEAD + 1)):
                self._read_ahead(j)
        self._last_block = i
        return data

    def _read_ahead(self, i: int) -> None:
        if i * self._block >= self._size:
            return
        with self._lock:
            self._settle()
            if i in self._blocks or i in self._pending or len(self._pending) >= READ_AHEAD:
                return
            self._pending[i] = self._ahead.submit(self._fetch, i)

    def _settle(self) -> None:
        """Move finished read-ahead blocks into the LRU (a failed one is fetched again when needed)."""
        for i, future in list(self._pending.items()):
            if future.done():
                del self._pending[i]
                if future.exception() is None:
                    self._blocks[i] = future.result()
        while len(self._blocks) > self._cache_blocks:
            self._blocks.popitem(last=False)

    # --- file API ---------------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek on a closed RemoteFile")
        whence &= ~_AVSEEK_FORCE
        if whence == _AVSEEK_SIZE:
            return self._size
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read from a closed RemoteFile")
        out = memoryview(b).cast("B")
        want = min(len(out), max(0, self._size - self._pos))
        done = 0
        while done < want:
            i, off = divmod(self._pos + done, self._block)
            block = self._get_block(i)
            n = min(want - done, len(block) - off)
            out[done : done + n] = block[off : off + n]
            done += n
        self._pos += done
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buf = bytearray(min(size, max(0, self._size - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            if self._ahead is not None:
                self._ahead.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                self._blocks.clear()
                self._pending.clear()
            with _totals_lock:
                _totals["files"] += 1
                _totals["bytes"] += self.bytes_fetched
                _totals["requests"] += self.requests
                _totals["largest_request"] = max(_totals["largest_request"], self.largest_request)
        super().close()

    def __repr__(self) -> str:
        return f"RemoteFile({self.url!r}, size={self._size}, version={self.version!r})"


def open_ref(ref: dict, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> RemoteFile:
    """Open a raw shard's reference ({modality, key, url, version, size}) pinned to its version.

    Raises `ObjectChanged` (a ValueError naming the URL) when the object was replaced or removed."""
    return RemoteFile(ref["url"], ref.get("version"), ref.get("size"), storage_options, **kwargs)
