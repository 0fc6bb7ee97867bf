"""`streamtune serve-search`: a local search page over one index (stdlib http.server, loopback default).

GET /?q=QUERY[&top=N][&where=FIELD=VALUE...]  the page: a query box and contact-sheet cards
GET /api/search?q=...                         the same hits as JSON
GET /thumb?row=N                              one hit's JPEG thumbnail
Nothing is loaded from elsewhere and nothing is sent anywhere; all text is escaped. Requests are served one
at a time (the index's SQLite connection belongs to one thread).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from streamtune.search import sheet
from streamtune.search.index import SearchError

MAX_TOP = 200


def _params(query: str) -> tuple[str, int, list[str]]:
    qs = parse_qs(query, keep_blank_values=True)
    q = (qs.get("q") or [""])[0]
    try:
        top = min(MAX_TOP, max(1, int((qs.get("top") or ["20"])[0])))
    except ValueError as e:
        raise SearchError("top must be a whole number") from e
    return q, top, qs.get("where") or []


def _host_allowed(host: str, address: tuple) -> bool:
    """A page on another site may resolve its own name to 127.0.0.1 (DNS rebinding); on loopback only
    requests naming the loopback address or localhost are answered."""
    bound, port = str(address[0]), int(address[1])
    if bound not in ("127.0.0.1", "::1", "localhost"):
        return True
    return host in {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}


def make_server(
    index: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    source_root: str | None = None,
    storage_options: dict | None = None,
    rerank: Callable[[str, list], list] | None = None,
) -> HTTPServer:
    """An HTTPServer (not yet serving) for `index`; port 0 picks a free port (server.server_address)."""

    def run_query(q: str, top: int, where: list[str]) -> list:
        hits = index.search(q, top=top, where=where)
        return rerank(q, hits) if rerank else hits

    class Handler(BaseHTTPRequestHandler):
        server_version = "streamtune-search"

        def log_message(self, fmt, *args):  # quiet: queries stay on this machine, not in a log
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            if not _host_allowed(self.headers.get("Host", ""), self.server.server_address):
                self._send(421, b"unknown host", "text/plain; charset=utf-8")  # DNS rebinding
                return
            try:
                if url.path == "/":
                    self._page(url.query)
                elif url.path == "/api/search":
                    self._api(url.query)
                elif url.path == "/thumb":
                    self._thumb(url.query)
                else:
                    self._send(404, b"not found", "text/plain; charset=utf-8")
            except BrokenPipeError:
                pass

        def _page(self, query: str) -> None:
            q, hits, error = "", [], None
            try:
                q, top, where = _params(query)
                if q:
                    hits = run_query(q, top, where)
            except SearchError as e:
                error = str(e)
            cards = sheet.render_hits(hits, index.thumbnail, source_root, storage_options)
            note = f"{len(index)} segments indexed" + (f" · {len(hits)} moments" if q and not error else "")
            text = sheet.page("streamtune search", cards, q, error=error, form_action="/", note=note)
            self._send(400 if error else 200, text.encode(), "text/html; charset=utf-8")

        def _api(self, query: str) -> None:
            try:
                q, top, where = _params(query)
                hits = run_query(q, top, where)
            except SearchError as e:
                self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")
                return
            out = []
            for h in hits:
                d = h.to_dict()
                url = sheet.source_url(h.source, source_root)
                d["link"] = sheet.media_link(url, h.t0, h.t1, storage_options)
                d["thumbnail_url"] = f"/thumb?row={h.row}" if h.thumbnail else None
                out.append(d)
            body = json.dumps({"query": q, "hits": out}, default=str).encode()
            self._send(200, body, "application/json")

        def _thumb(self, query: str) -> None:
            try:
                row = int((parse_qs(query).get("row") or ["-1"])[0])
            except ValueError:
                row = -1
            data = index.thumbnail(row) if 0 <= row < len(index) else None
            if not data:
                self._send(404, b"no thumbnail", "text/plain; charset=utf-8")
            else:
                self._send(200, data, "image/jpeg")

    return HTTPServer((host, port), Handler)
