"""The lexical index: SQLite FTS5 (stdlib sqlite3) with BM25 ranking over transcripts.

Query text is never passed to FTS5 as syntax: it is cut into words and each word becomes a quoted string
(`"word"`), OR-ed together, so `"a" OR NEAR(`, `*` or `col:x` are searched as the words they contain.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable

TOKENIZE = "porter unicode61 remove_diacritics 2"
MAX_TERMS = 64
WORD = re.compile(r"[^\W_]+")
# Left out of the FTS query (when other words remain): they match nearly every transcript, so a query's
# function words would pull random rows into the fused ranking.
STOPWORDS = frozenset(
    "a an and are as at be but by did do does for from had has have how i in is it its me my of on or our "
    "said say says so that the their them there they this to was we were what when where which who why "
    "will with you your about".split()
)


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits) of `text`, in order."""
    return [w.lower() for w in WORD.findall(text or "")]


def query_terms(query: str) -> list[str]:
    """The distinct words of `query` that are searched: stopwords left out unless nothing else remains."""
    terms = list(dict.fromkeys(words(query)))
    return ([t for t in terms if t not in STOPWORDS] or terms)[:MAX_TERMS]


def match_expression(query: str) -> str | None:
    """An FTS5 MATCH expression for the words of `query` (None when it has none)."""
    terms = query_terms(query)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def build(path: str, rows: Iterable[tuple[int, str]]) -> int:
    """Write a new FTS5 database at `path` from (rowid, text); returns the rows written."""
    if os.path.exists(path):
        os.remove(path)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        # contentless: the transcripts live in the Parquet parts; FTS keeps only the inverted index
        con.execute(f"CREATE VIRTUAL TABLE seg USING fts5(text, content='', tokenize='{TOKENIZE}')")
        n = 0
        batch: list[tuple[int, str]] = []
        for rowid, text in rows:
            batch.append((int(rowid), text or ""))
            if len(batch) >= 10_000:
                con.executemany("INSERT INTO seg(rowid, text) VALUES (?, ?)", batch)
                n += len(batch)
                batch.clear()
        con.executemany("INSERT INTO seg(rowid, text) VALUES (?, ?)", batch)
        n += len(batch)
        con.execute("INSERT INTO seg(seg) VALUES ('optimize')")
        con.commit()
        con.execute("VACUUM")
    finally:
        con.close()
    return n


def update(path: str, removed: Iterable[tuple[int, str]], added: Iterable[tuple[int, str]]) -> int:
    """Delete rows (rowid and the exact text they were added with: a contentless table needs it to find the
    terms) and add rows in the database at `path`; returns the rows it then holds."""
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executemany("INSERT INTO seg(seg, rowid, text) VALUES ('delete', ?, ?)", removed)
        con.executemany("INSERT INTO seg(rowid, text) VALUES (?, ?)", added)
        con.execute("INSERT INTO seg(seg, rank) VALUES ('merge', 64)")  # some merging, not a full optimize
        con.commit()
        n = int(con.execute("SELECT count(*) FROM seg").fetchone()[0])
    finally:
        con.close()
    return n


class Lexical:
    """A read-only FTS5 database (opened immutable: a search can never change it)."""

    def __init__(self, path: str):
        self.path = path
        self.con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)

    def search(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(rowid, score) best first; score = -bm25 (higher is better)."""
        expr = match_expression(query)
        if expr is None:
            return []
        cur = self.con.execute(
            "SELECT rowid, bm25(seg) AS s FROM seg WHERE seg MATCH ? ORDER BY s LIMIT ?", (expr, int(limit))
        )
        return [(int(r), -float(s)) for r, s in cur.fetchall()]

    def close(self) -> None:
        self.con.close()
