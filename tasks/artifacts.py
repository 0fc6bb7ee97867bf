"""Artifacts the Prefect UI shows per stage: tables, markdown, progress and the loss curve picture."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from streamtune.quarantine import Reason


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def manifest_artifact(summary: dict[str, Any], manifest_url: str) -> UUID:
    rows = [{"field": k, "value": v} for k, v in summary.items()]
    body = f"# Manifest\n\n`{manifest_url}`\n\n" + markdown_table(rows)
    return create_markdown_artifact(body, key="manifest-summary", description="Objects found in the source")


def shard_table_artifact(entries: Sequence[dict[str, Any]], key: str = "shard-table") -> UUID:
    columns = ["path", "rows", "bytes", "checksum"]
    table = [{c: e.get(c) for c in columns} for e in entries]
    return create_table_artifact(table, key=key, description="Shards written by this run")


def decode_artifact(stats: dict[str, Any]) -> UUID:
    return create_markdown_artifact(
        "# Decode stats\n\n" + markdown_table([{"stat": k, "value": v} for k, v in stats.items()]),
        key="decode-stats",
        description="Samples decoded per modality, audio seconds, model time",
    )


def quarantine_artifact(records: Sequence[dict[str, Any]]) -> UUID:
    """Every input set aside by this run (manifest, shard or decode stage) with its reason."""
    columns = ("stage", "sample_id", "key", "error", "reason", "message")
    rows = [{c: r.get(c) for c in columns} | {"reason": _sentence(r.get("error"))} for r in records]
    return create_table_artifact(
        rows or [{c: "" for c in columns} | {"message": "nothing quarantined"}],
        key="quarantine",
        description=f"{len(records)} inputs set aside, with the reason",
    )


def _sentence(code: Any) -> str:
    try:
        return Reason(code).sentence
    except ValueError:  # a record persisted before the reasons were enumerated
        return ""


class ProgressArtifact:
    """A progress bar artifact in the UI, updated while a long stage runs (at most ~100 updates)."""

    def __init__(self, total: int, description: str):
        self.total = max(int(total), 1)
        self.last = -1.0
        self.id = create_progress_artifact(0.0, key="training-progress", description=description)

    def update(self, done: int) -> None:
        pct = min(100.0, 100.0 * done / self.total)
        if pct - self.last >= 1.0 or pct >= 100.0 and self.last < 100.0:
            update_progress_artifact(self.id, pct)
            self.last = pct


def loss_curve_png(losses: Sequence[float], title: str = "training loss") -> bytes:
    """The loss curve as PNG bytes (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    from matplotlib.ticker import MaxNLocator

    ax.plot(
        range(1, len(losses) + 1),
        list(losses),
        lw=1.5,
        color="#1f77b4",
        marker="." if len(losses) < 50 else "",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_curve_artifact(png: bytes, png_url: str, train: dict[str, Any]) -> UUID:
    """Embed the picture (data URI, so the UI shows it wherever the file lives) and link its location."""
    data = base64.b64encode(png).decode()
    rows = [
        {"metric": k, "value": train.get(k)} for k in ("steps", "loss_first", "loss_last", "tokens_per_s")
    ]
    body = (
        "# Loss curve\n\n"
        f"![loss curve](data:image/png;base64,{data})\n\n"
        f"Saved at `{png_url}`\n\n" + markdown_table(rows)
    )
    return create_markdown_artifact(body, key="loss-curve", description="Training loss per step")


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def throughput_artifact(rows: Sequence[dict[str, Any]]) -> UUID:
    return create_table_artifact(list(rows), key="throughput", description="Throughput per stage")


def adapter_artifact(adapter_url: str) -> UUID:
    return create_link_artifact(
        adapter_url, link_text=adapter_url, key="adapter", description="Trained adapter"
    )
