"""An optional local cache of fetched ranges: one file per range, LRU eviction under a byte limit."""

from __future__ import annotations

import hashlib
import os
import threading


class RangeCache:
    """Files are named by a hash of (shard, offset, length, checksum); mtime is the LRU clock.

    Several datasets or processes may share a directory: writes go to a temp name and are renamed,
    and a vanished file is just a miss.
    """

    def __init__(self, directory: str, limit_bytes: int):
        self.directory = directory
        self.limit_bytes = limit_bytes
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._clock: dict[str, float] = {}
        for entry in os.scandir(directory):
            if entry.is_file() and entry.name.endswith(".range"):
                st = entry.stat()
                self._sizes[entry.name] = st.st_size
                self._clock[entry.name] = st.st_mtime
        self._total = sum(self._sizes.values())

    @staticmethod
    def _name(key: tuple) -> str:
        return hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".range"

    @property
    def total_bytes(self) -> int:
        return self._total

    def get(self, key: tuple) -> bytes | None:
        name = self._name(key)
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)
        except FileNotFoundError:
            return None
        with self._lock:
            self._clock[name] = os.path.getmtime(path) if os.path.exists(path) else 0.0
        return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.limit_bytes:
            return
        name = self._name(key)
        path = os.path.join(self.directory, name)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self._total += len(data) - self._sizes.get(name, 0)
            self._sizes[name] = len(data)
            self._clock[name] = os.path.getmtime(path)
            self._evict()

    def discard(self, key: tuple) -> None:
        name = self._name(key)
        with self._lock:
            self._remove(name)

    def _evict(self) -> None:
        if self._total <= self.limit_bytes:
            return
        for name in sorted(self._clock, key=self._clock.__getitem__):
            if self._total <= self.limit_bytes:
                break
            self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            os.remove(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass
        self._total -= self._sizes.pop(name, 0)
        self._clock.pop(name, None)
