"""Reusable range buffers.

Every fetched range used to be a fresh multi-MB allocation. glibc hands such memory back to the OS (or
keeps it in per-thread arenas, letting RSS drift past the prefetch budget until trimmed), so each range
paid for page faults and zeroing again: about 0.5 CPU-s per GB here, a third of what the GETs cost.
Ranges are instead read into buffers that come back to this pool when their last sample is yielded.
"""

from __future__ import annotations

import threading
from collections import deque

_MAX_PENDING = 64


class BufferPool:
    """Hands out writable views of at least the asked size; keeps returned buffers up to `limit_bytes`.

    A buffer given back while views of it are still alive (zero-copy rows the consumer holds) waits in a
    short pending list and is reused once they are gone; it is never overwritten under a live view.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self._free: list[bytearray] = []
        self._free_bytes = 0
        self._pending: deque[tuple[memoryview, bytearray]] = deque(maxlen=_MAX_PENDING)
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created, for stats and tests
        self.reused = 0

    def take(self, nbytes: int) -> memoryview:
        with self._lock:
            self._collect_pending()
            fits = [b for b in self._free if len(b) >= nbytes]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                self._free_bytes -= len(buf)
                self.reused += 1
                return memoryview(buf)[:nbytes]
            self.allocated += 1
        align = 1 << 20 if nbytes >= 4 << 20 else 64 << 10  # a little slack lets one buffer serve many ranges
        return memoryview(bytearray(-(-max(nbytes, 1) // align) * align))[:nbytes]

    def give(self, view: memoryview) -> None:
        """Return a view from `take`."""
        buf = view.obj
        if not isinstance(buf, bytearray):
            return
        with self._lock:
            if _unused(view, buf):
                self._keep(buf)
            else:
                self._pending.append((view, buf))

    def _collect_pending(self) -> None:
        for entry in [e for e in self._pending if _unused(*e)]:
            self._pending.remove(entry)
            self._keep(entry[1])

    def _keep(self, buf: bytearray) -> None:
        while self._free and self._free_bytes + len(buf) > self.limit_bytes:
            self._free_bytes -= len(self._free.pop(0))  # oldest out: keeps sizes in current use
        if len(buf) <= self.limit_bytes:
            self._free.append(buf)
            self._free_bytes += len(buf)


def _unused(view: memoryview, buf: bytearray) -> bool:
    """Whether nothing looks at `buf` any more. Releasing `view` fails while something wraps it (an Arrow
    buffer); a bytearray with other live views cannot be resized."""
    try:
        view.release()  # a no-op once released
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True
