"""Reusable range buffers.

Every fetched range used to be a fresh multi-MB allocation. glibc hands such memory back to the OS (or
keeps it in per-thread arenas, letting RSS drift past the prefetch budget until trimmed), so each range
paid for page faults and zeroing again: about 0.5 CPU-s per GB here, a third of what the GETs cost.
Ranges are instead read into buffers that come back to this pool when their last sample is yielded.
"""

from __future__ import annotations

import threading

_ALIGN = 1 << 20


class BufferPool:
    """Hands out writable views of at least the asked size; keeps returned buffers up to `limit_bytes`."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self._free: list[bytearray] = []
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created, for stats and tests
        self.reused = 0

    def take(self, nbytes: int) -> memoryview:
        with self._lock:
            fits = [b for b in self._free if len(b) >= nbytes]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                self._free_bytes -= len(buf)
                self.reused += 1
                return memoryview(buf)[:nbytes]
            self.allocated += 1
        return memoryview(bytearray(-(-max(nbytes, 1) // _ALIGN) * _ALIGN))[:nbytes]

    def give(self, view: memoryview) -> None:
        """Return a buffer from `take`. Nothing may read it afterwards: it will be overwritten."""
        buf = view.obj
        try:
            view.release()
        except BufferError:  # something still looks at it: let it go rather than overwrite it later
            return
        if not isinstance(buf, bytearray):
            return
        with self._lock:
            while self._free and self._free_bytes + len(buf) > self.limit_bytes:
                self._free_bytes -= len(self._free.pop(0))  # oldest out: keeps sizes in current use
            if len(buf) <= self.limit_bytes:
                self._free.append(buf)
                self._free_bytes += len(buf)
