"""Contact sheet: search hits as one self-contained HTML page (inline CSS, thumbnails as data: URIs).

Every piece of text from the index or the query is escaped; the page loads nothing from anywhere. Each hit
links to its source object with a `#t=t0,t1` media fragment: a presigned https URL for s3 when the
credentials allow it, else the plain URL. The same card markup serves `streamtune serve-search`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable
from typing import Any

from streamtune import storage

CSS = """
*{box-sizing:border-box}
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:16px 24px;color:#1b1b1b;
background:#f6f6f4}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:0 0 12px;color:#555}
form.q{display:flex;gap:8px;margin:0 0 14px}
form.q input[type=text]{flex:1;font-size:16px;padding:8px 10px;border:1px solid #aaa;border-radius:6px}
form.q button{font-size:16px;padding:8px 16px;border-radius:6px;border:1px solid #333;background:#222;
color:#fff}
.error{color:#a00;font-weight:600}
ol.hits{list-style:none;margin:0;padding:0;display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(420px,1fr))}
li.hit{display:flex;gap:12px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px;
break-inside:avoid;page-break-inside:avoid}
.thumb{flex:0 0 160px}
.thumb img{width:160px;height:auto;border-radius:4px;display:block;background:#ccc}
.thumb .none{width:160px;height:90px;border-radius:4px;background:#ddd;display:flex;align-items:center;
justify-content:center;color:#777;font-size:12px}
.body{min-width:0;flex:1}
.top{display:flex;justify-content:space-between;gap:8px;align-items:baseline}
.rank{font-weight:700;color:#777;margin-right:6px}
.tc{font:600 15px ui-monospace,"SF Mono",Menlo,monospace}
.score{color:#555;font-size:12px;white-space:nowrap}
.src{font-size:13px;word-break:break-all}
.snippet{margin:6px 0}
mark{background:#ffe26a;padding:0 1px}
.signals{font-size:12px;color:#555}
.signals b{color:#1b1b1b}
.tags{font-size:12px;color:#555}
@media print{
body{background:#fff;padding:0;font-size:11pt}
form.q{display:none}
ol.hits{display:block}
li.hit{border:0;border-bottom:1px solid #bbb;border-radius:0;padding:6px 0;margin:0}
a{color:#000;text-decoration:none}
a.src::after{content:" (" attr(data-url) ")";font-size:8pt;color:#444}
mark{background:none;font-weight:700;text-decoration:underline}
}
"""


def timecode(seconds: float | None) -> str:
    """H:MM:SS.s (or M:SS.s under an hour)."""
    if seconds is None:
        return "–"
    s = max(0.0, float(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{sec:04.1f}" if h else f"{int(m)}:{sec:04.1f}"


def source_url(source: str, root: str | None = None) -> str:
    """The object URL of a hit's source: itself when already a URL, else `root` joined with the key."""
    if "://" in source or not root:
        return source
    return storage.join(root, source)


def media_link(url: str, t0: float | None, t1: float | None, storage_options: dict | None = None,
               expires: int = 3600) -> str:  # fmt: skip
    """An openable link with a `#t=t0,t1` media fragment; s3:// URLs are presigned when possible."""
    href = url
    if url.startswith(("s3://", "s3a://")):
        try:
            fs, path = storage.get_fs(url, storage_options)
            href = fs.sign(path, expiration=expires)
        except Exception:  # no credentials or a store that cannot sign: the plain URL still names the object
            href = url
    if t0 is None:
        return href
    frag = f"#t={float(t0):.2f}" + (f",{float(t1):.2f}" if t1 is not None else "")
    return href + frag


def marked_html(snippet: str, marks: Iterable[tuple[int, int]]) -> str:
    """The snippet escaped, with matched spans in <mark>."""
    out, pos = [], 0
    for a, b in sorted(marks):
        if a < pos or b > len(snippet):
            continue
        out += [html.escape(snippet[pos:a]), "<mark>", html.escape(snippet[a:b]), "</mark>"]
        pos = b
    return "".join(out) + html.escape(snippet[pos:])


def _get(hit: Any, name: str, default=None):
    return hit.get(name, default) if isinstance(hit, dict) else getattr(hit, name, default)


def card(hit: Any, rank: int, thumbnail: bytes | None = None, link: str | None = None) -> str:
    """One hit (a search Hit or its to_dict()) as an <li>."""
    e = html.escape
    t0, t1 = _get(hit, "t0"), _get(hit, "t1")
    source = str(_get(hit, "source", ""))
    link = link or source
    if thumbnail:
        src = "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode()
        thumb = f'<img src="{src}" alt="frame at {e(timecode(t0))}">'
    else:
        thumb = '<div class="none">no picture</div>'
    signals = _get(hit, "signals", {}) or {}
    matched = set(_get(hit, "matched", []) or [])
    sig = " · ".join(
        (f"<b>{e(n)}</b>" if n in matched else e(n))
        + f" #{int(s.get('rank', 0))} ({float(s.get('score', 0)):.3f})"
        for n, s in signals.items()
    )
    tags = _get(hit, "tags", []) or []
    segment = _get(hit, "segment_index", -1)
    seg = f" · segment {int(segment)}" if segment is not None and int(segment) >= 0 else ""
    return (
        f'<li class="hit" data-rank="{rank}" data-sample="{e(str(_get(hit, "sample_id", "")))}">'
        f'<a class="thumb" href="{e(link)}">{thumb}</a><div class="body">'
        f'<div class="top"><span><span class="rank">{rank}</span>'
        f'<span class="tc">{e(timecode(t0))}–{e(timecode(t1))}</span></span>'
        f'<span class="score">score {float(_get(hit, "score", 0.0)):.4f}</span></div>'
        f'<a class="src" href="{e(link)}" data-url="{e(link)}">{e(source)}</a>'
        f'<span class="score">{e(str(_get(hit, "modality", "")))}{e(seg)}</span>'
        f'<p class="snippet">{marked_html(str(_get(hit, "snippet", "") or ""), _get(hit, "marks", []) or [])}</p>'
        f'<div class="signals">{sig}</div>'
        + (f'<div class="tags">tags: {e(", ".join(map(str, tags)))}</div>' if tags else "")
        + "</div></li>"
    )


def page(
    title: str,
    cards: list[str],
    query: str = "",
    error: str | None = None,
    form_action: str | None = None,
    note: str = "",
) -> str:
    """A whole page: header, optional query form (for the served page), the hit list."""
    e = html.escape
    form = (
        f'<form class="q" method="get" action="{e(form_action)}"><input type="text" name="q" value="{e(query)}" '
        f'placeholder="what is said or seen" autofocus><button type="submit">Search</button></form>'
        if form_action is not None
        else ""
    )
    body = f'<p class="error">{e(error)}</p>' if error else ""
    if cards:
        body += f'<ol class="hits">{"".join(cards)}</ol>'
    elif query and not error:
        body += "<p>No moments found.</p>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; form-action 'self'\">"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{e(title)}</h1><p>{e(note)}</p></header>{form}{body}</body></html>"
    )


def render_hits(
    hits: list[Any],
    thumbnail: Callable[[Any], bytes | None] | None = None,
    source_root: str | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """Cards for hits; `thumbnail(hit)` gives JPEG bytes (e.g. Index.thumbnail)."""
    cards = []
    for i, hit in enumerate(hits, 1):
        url = source_url(str(_get(hit, "source", "")), source_root)
        link = media_link(url, _get(hit, "t0"), _get(hit, "t1"), storage_options)
        thumb = None
        if thumbnail is not None:
            try:
                thumb = thumbnail(hit)
            except Exception:  # a missing thumbnail leaves a grey box, not a failed page
                thumb = None
        cards.append(card(hit, i, thumb, link))
    return cards


def write_sheet(
    path: str,
    query: str,
    hits: list[Any],
    thumbnail: Callable[[Any], bytes | None] | None = None,
    source_root: str | None = None,
    storage_options: dict | None = None,
    index_url: str = "",
) -> str:
    """Write the contact sheet for `query` to a local path or any fsspec URL; returns the HTML."""
    note = f"{len(hits)} moments" + (f" · index {index_url}" if index_url else "")
    text = page(f"“{query}”", render_hits(hits, thumbnail, source_root, storage_options), query, note=note)
    if "://" in path:
        storage.write_bytes(path, text.encode(), storage_options)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text
