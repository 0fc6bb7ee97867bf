"""A fault-injecting HTTP/1.1 proxy to put in front of an S3 endpoint.

Clients talk to the proxy as if it were the S3 server (path-style, plain HTTP). Per request it may add
latency, answer `503 SlowDown`, reset the connection, or send only part of the response body and close.
Faults are drawn from a seeded RNG, and only for the methods in `methods` (GET by default), so writes
through the proxy stay reliable unless asked otherwise.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Faults:
    slowdown: float = 0.0  # probability of answering 503 SlowDown
    reset: float = 0.0  # probability of resetting the connection before answering
    truncate: float = 0.0  # probability of cutting the response body short and closing
    short: float = 0.0  # probability of a well-formed 206 answer holding only the first half of the range
    latency_s: float = 0.0  # added before every request is forwarded
    methods: tuple[str, ...] = ("GET",)


@dataclass
class FaultCounts:
    requests: int = 0
    slowdown: int = 0
    reset: int = 0
    truncate: int = 0
    short: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "slowdown": self.slowdown,
            "reset": self.reset,
            "truncate": self.truncate,
            "short": self.short,
        }


class _Closed(Exception):
    pass


class _Conn:
    """A socket with a read buffer, enough to parse HTTP/1.1 heads and relay bodies."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def read_head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[: end + 2])
                del self.buf[: end + 2]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk

    def relay(self, n: int | None, dst: socket.socket, scratch: bytearray) -> int:
        """Copy n bytes (None: until EOF) to dst; returns bytes copied."""
        done = 0
        if self.buf:
            take = len(self.buf) if n is None else min(n, len(self.buf))
            dst.sendall(self.buf[:take])
            del self.buf[:take]
            done += take
        view = memoryview(scratch)
        while n is None or done < n:
            want = len(scratch) if n is None else min(len(scratch), n - done)
            got = self.sock.recv_into(view[:want])
            if not got:
                if n is None:
                    return done
                raise _Closed
            dst.sendall(view[:got])
            done += got
        return done

    def relay_chunked(self, dst: socket.socket, scratch: bytearray) -> None:
        while True:
            line = self.read_line()
            dst.sendall(line)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers end with an empty line
                    trailer = self.read_line()
                    dst.sendall(trailer)
                    if trailer == b"\r\n":
                        return
            self.relay(size + 2, dst, scratch)


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


def _shorten(head: bytes, keep: int) -> bytes:
    """A 206 head rewritten to announce only the first `keep` bytes of its range."""
    lines = head.decode("latin-1").split("\r\n")
    out = []
    for line in lines:
        key = line.split(":", 1)[0].strip().lower()
        if key == "content-length":
            line = f"Content-Length: {keep}"
        elif key == "content-range":
            unit_start, _, total = line.split(":", 1)[1].strip().partition("/")
            start = int(unit_start.split()[-1].split("-")[0])
            line = f"Content-Range: bytes {start}-{start + keep - 1}/{total}"
        out.append(line)
    return "\r\n".join(out).encode("latin-1")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """Listen on 127.0.0.1 and forward to `upstream` ("http://host:port"), injecting `faults`."""

    def __init__(self, upstream: str, faults: Faults | None = None, seed: int = 0):
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream = (host, int(port or 80))
        self.faults = faults or Faults()
        self.counts = FaultCounts()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._accept = threading.Thread(target=self._serve, daemon=True, name="faultproxy-accept")
        self._accept.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def storage_options(self, base: dict) -> dict:
        """`base` storage options pointed at this proxy."""
        return {**base, "endpoint_url": self.endpoint_url}

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in list(self._socks):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _draw(self) -> str | None:
        f = self.faults
        with self._rng_lock:
            x = self._rng.random()
        for name, p in (
            ("slowdown", f.slowdown),
            ("reset", f.reset),
            ("truncate", f.truncate),
            ("short", f.short),
        ):
            if x < p:
                return name
            x -= p
        return None

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks.add(client)
            t = threading.Thread(target=self._handle, args=(client,), daemon=True, name="faultproxy-conn")
            t.start()

    def _handle(self, client_sock: socket.socket) -> None:
        client = _Conn(client_sock)
        upstream: _Conn | None = None
        scratch = bytearray(1 << 20)
        try:
            while True:
                head = client.read_head()
                request_line, fields = _headers(head)
                method = request_line.split(" ", 1)[0]
                self.counts.add("requests")
                fault = self._draw() if method in self.faults.methods else None
                if self.faults.latency_s:
                    time.sleep(self.faults.latency_s)
                if fault == "reset":
                    self.counts.add("reset")
                    _reset(client_sock)
                    return
                if fault == "slowdown":
                    self.counts.add("slowdown")
                    self._drain_body(client, fields)
                    client_sock.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(_SLOWDOWN)}\r\n\r\n".encode()
                        + _SLOWDOWN
                    )
                    continue
                if upstream is None:
                    up = socket.create_connection(self.upstream)
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._socks.add(up)
                    upstream = _Conn(up)
                upstream.sock.sendall(head)
                self._relay_body(client, fields, upstream.sock, scratch)
                resp_head = upstream.read_head()
                status_line, rfields = _headers(resp_head)
                status = int(status_line.split(" ")[1])
                length = rfields.get("content-length")
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                if fault == "truncate" and length and not no_body and int(length) > 1:
                    self.counts.add("truncate")
                    client_sock.sendall(resp_head)
                    upstream.relay(int(length) // 2, client_sock, scratch)
                    _reset(client_sock)
                    return
                if fault == "short" and status == 206 and length and int(length) > 1:
                    self.counts.add("short")
                    client_sock.sendall(_shorten(resp_head, int(length) // 2))
                    upstream.relay(int(length) // 2, client_sock, scratch)
                    upstream.relay(int(length) - int(length) // 2, _Sink(), scratch)  # type: ignore[arg-type]
                    continue
                client_sock.sendall(resp_head)
                if no_body:
                    pass
                elif length is not None:
                    upstream.relay(int(length), client_sock, scratch)
                elif "chunked" in rfields.get("transfer-encoding", "").lower():
                    upstream.relay_chunked(client_sock, scratch)
                else:
                    upstream.relay(None, client_sock, scratch)
                    return
                if "close" in rfields.get("connection", "").lower():
                    return
        except (_Closed, OSError):
            return
        finally:
            for s in (client_sock, upstream.sock if upstream else None):
                if s is not None:
                    self._socks.discard(s)
                    try:
                        s.close()
                    except OSError:
                        pass

    def _relay_body(self, client: _Conn, fields: dict, dst: socket.socket, scratch: bytearray) -> None:
        if "content-length" in fields:
            client.relay(int(fields["content-length"]), dst, scratch)
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            client.relay_chunked(dst, scratch)

    def _drain_body(self, client: _Conn, fields: dict) -> None:
        sink = _Sink()
        self._relay_body(client, fields, sink, bytearray(1 << 16))  # type: ignore[arg-type]


class _Sink:
    def sendall(self, _data) -> None:
        pass


def start_fault_proxy(upstream: str, seed: int = 0, **faults) -> FaultProxy:
    """FaultProxy(upstream, Faults(**faults), seed)."""
    return FaultProxy(upstream, Faults(**faults), seed=seed)
