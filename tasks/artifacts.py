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
from streamtune.report import duration, figure, megabytes


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def manifest_artifact(summary: dict[str, Any], manifest_url: str, incremental: bool = False) -> UUID:
    rows = [{"field": k, "value": v} for k, v in summary.items()]
    what = "new or changed objects (incremental run)" if incremental else "every object under the source"
    body = f"# Manifest of this run\n\nListed {what}: `{manifest_url}`\n\n" + markdown_table(rows)
    return create_markdown_artifact(body, key="manifest-summary", description=f"This run listed {what}")


def decode_artifact(stats: dict[str, Any], decoded: dict[str, int]) -> UUID:
    """What this run's decode did (published only when it decoded something)."""
    seconds = stats.get("seconds") or 0
    model = stats.get("model_seconds") or 0
    rows = [
        {"stat": "samples decoded", "value": figure(stats.get("samples", 0))},
        {"stat": "features written", "value": figure(stats.get("features", 0))},
        {"stat": "quarantined", "value": figure(stats.get("quarantined", 0))},
        {"stat": "audio files transcribed", "value": f"{decoded['audio']} of {stats.get('audio_files', 0)}"},
        {"stat": "audio transcribed", "value": duration(stats.get("audio_seconds", 0))},
        {"stat": "audio real-time factor", "value": f"{stats['audio_seconds'] / model:.1f}x" if model and stats.get("audio_seconds") else "-"},
        {"stat": "images embedded", "value": figure(stats.get("images", 0))},
        {"stat": "videos decoded", "value": figure(stats.get("videos", 0))},
        {"stat": "video segments", "value": figure(stats.get("segments", 0))},
        {"stat": "video minutes decoded", "value": f"{stats.get('video_seconds', 0) / 60:.1f}"},
        {"stat": "video frames sampled", "value": figure(stats.get("frames_sampled", 0))},
        {"stat": "images/s", "value": figure(stats["images"] / seconds) if seconds and stats.get("images") else "-"},
        {"stat": "raw shards read", "value": f"{megabytes(stats.get('raw_bytes'))} at {megabytes(stats.get('raw_bytes', 0) / seconds) if seconds else '-'}/s"},
        {"stat": "wall time", "value": duration(seconds)},
        {"stat": "model time", "value": duration(model)},
    ]  # fmt: skip
    return create_markdown_artifact(
        "# Decode (this run)\n\n" + markdown_table(rows),
        key="decode-stats",
        description="What this run decoded: counts, audio real-time factor, images/s, video segments, MB/s",
    )


def index_artifact(result: dict[str, Any]) -> UUID:
    """The search index: counts, what this build redid, and a few sample queries' top hits."""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted((result.get("modalities") or {}).items())) or "-"
    rows = [
        {"stat": "segments indexed", "value": f"{figure(result['rows'])} ({kinds})"},
        {"stat": "transcripts embedded / reused", "value": f"{result['embedded']} / {result['reused']}"},
        {"stat": "feature shards read / unchanged", "value": f"{result['shards']} / {result['shards_reused']}"},
        {"stat": "rows removed", "value": figure(result["removed"])},
        {"stat": "index size", "value": megabytes(result["bytes"])},
        {"stat": "signals", "value": ", ".join(result.get("signals") or [])},
        {"stat": "build time", "value": duration(result["seconds"])},
    ]  # fmt: skip
    lines = ["# Search index", "", f"`{result['url']}`", "", markdown_table(rows), "## Sample queries", ""]
    for sample in result.get("samples") or []:
        lines.append(f"**{sample['query']}**")
        lines.append("")
        hits = [
            {"source": h.get("source"), "time": f"{h.get('t0', 0):.1f}-{h.get('t1') or 0:.1f} s",
             "said": h.get("snippet_marked") or h.get("error"), "matched": ", ".join(h.get("matched") or [])}
            for h in sample["hits"]
        ]  # fmt: skip
        lines += [markdown_table(hits) if hits else "no hits", ""]
    return create_markdown_artifact(
        "\n".join(lines), key="search-index", description=f"Search index: {result['rows']} segments"
    )


def data_state_artifacts(state: dict[str, Any]) -> None:
    """The data as it stands (not what one run did): shard set, feature set, and every input left out."""
    for key, part, what in (
        ("shard-set", "shards", "raw shard set"),
        ("feature-set", "features", "feature set"),
    ):
        s = state[part]
        if not s["committed"]:
            create_markdown_artifact(
                f"# The {what}\n\nNothing committed yet.\n", key=key, description=f"The {what}: empty"
            )
            continue
        rows = [
            {"shard": e["path"], "rows": figure(e["rows"]), "size": megabytes(e["bytes"])}
            for e in s.get("entries") or []
        ]
        head = f"{figure(s['shards'])} shards, {figure(s['rows'])} rows, {megabytes(s['bytes'])}"
        create_markdown_artifact(
            f"# The {what} now\n\n{head}\n\n" + markdown_table(rows),
            key=key,
            description=f"The {what} now: {head}",
        )
    records = state["quarantine"]
    columns = ("stage", "key", "error", "reason", "message")
    rows = [{c: r.get(c) for c in columns} | {"reason": _sentence(r.get("error"))} for r in records]
    counts = ", ".join(f"{n} {code}" for code, n in state["by_reason"].items()) or "none"
    create_table_artifact(
        rows or [{c: "" for c in columns} | {"message": "nothing is quarantined"}],
        key="quarantine",
        description=f"Inputs the data leaves out now: {len(records)} ({counts})",
    )  # fmt: skip


def run_summary_artifact(summary: dict[str, Any], decode_stats: dict, train: dict, state: dict) -> UUID:
    """The run page's story: what this run did, then the numbers that matter, rounded for people."""
    run = summary["run"]
    lines = [
        f"# {summary.get('flow_run_name', 'Pipeline run')}",
        "",
        f"**{run['headline']}**",
        "",
        "| stage | this run |",
        "|---|---|",
        f"| manifest | {run['samples_listed']} samples listed |",
        f"| shard | {run['shards_written']} shards written ({megabytes(summary['bytes_streamed'])}) |",
        f"| decode | {run['decode']} |",
        f"| train | {run['training']} |",
        "",
        "| the data now | |",
        "|---|---|",
        f"| raw shards | {figure(state['shards']['shards'])} ({figure(state['shards']['rows'])} samples, {megabytes(state['shards']['bytes'])}) |",
        f"| features | {figure(state['features']['rows'])} rows |",
        f"| quarantined | {len(state['quarantine'])} ({', '.join(f'{n} {c}' for c, n in state['by_reason'].items()) or 'none'}) |",
    ]  # fmt: skip
    if decode_stats.get("audio_seconds") or decode_stats.get("images"):
        lines += [
            f"| audio transcribed this run | {duration(decode_stats.get('audio_seconds'))} |",
            f"| images embedded this run | {figure(decode_stats.get('images', 0))} |",
        ]
    if train:
        t = train
        lines += [
            "",
            "| training | |",
            "|---|---|",
            f"| steps | {figure(t.get('steps'))}{' (cached: nothing trained this run)' if t.get('cached') else ''} |",
            f"| loss | {figure(t.get('loss_first'))} → {figure(t.get('loss_last'))} |",
            f"| validation loss | {figure(t.get('val_loss'))} |",
            f"| tokens/s | {figure(t.get('tokens_per_s'))} |",
            f"| adapter | `{t.get('adapter_path')}` ({megabytes(t.get('adapter_bytes'))}, sha256 {str(t.get('adapter_sha256') or '-')[:12]}) |",
            f"| base model | {summary.get('model')}; LoRA {t.get('lora') or '-'} |",
        ]  # fmt: skip
    return create_markdown_artifact("\n".join(lines) + "\n", key="run-summary", description=run["headline"])


def _sentence(code: Any) -> str:
    try:
        return Reason(code).sentence
    except ValueError:  # a record persisted before the reasons were enumerated
        return ""


class TrainingMetricsArtifact:
    """What a TensorBoard user watches, as one markdown artifact refreshed about ten times while training
    runs: loss, validation loss, learning rate, tokens and samples seen, peak memory, step time, ETA."""

    def __init__(self, total: int, updates: int = 10):
        self.total, self.every = max(int(total), 1), max(int(total) // updates, 1)
        self.tokens = self.samples = 0
        self.val: float | None = None
        self.start = None

    def update(self, m: dict[str, Any]) -> None:
        import time

        self.start = self.start or time.perf_counter() - m["seconds"]
        self.tokens += m["tokens"]
        self.samples += m["samples"]
        self.val = m.get("val_loss", self.val)
        if m["step"] % self.every == 0 or m["step"] == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / m["step"] * (self.total - m["step"]) if m["step"] else None
            self._publish(m, elapsed, eta)

    def finish(self, result: dict[str, Any]) -> None:
        self.val = result.get("val_loss", self.val)

    def _publish(self, m: dict[str, Any], elapsed: float, eta: float | None) -> None:
        rows = [
            {
                "metric": "step",
                "value": f"{m['step']} / {self.total} (global {m.get('global_step', m['step'])})",
            },
            {"metric": "loss", "value": figure(m["loss"], 4)},
            {"metric": "validation loss", "value": figure(self.val, 4)},
            {"metric": "learning rate", "value": f"{m['lr']:.2e}"},
            {"metric": "tokens seen", "value": figure(self.tokens)},
            {"metric": "samples seen", "value": figure(self.samples)},
            {"metric": "tokens/s (this step)", "value": figure(m["tokens_per_s"])},
            {"metric": "step time", "value": f"{m['seconds']:.2f} s"},
            {"metric": "peak memory", "value": megabytes(m["peak_mem_mb"] * 1e6)},
            {"metric": "elapsed", "value": duration(elapsed)},
            {"metric": "ETA", "value": duration(eta)},
        ]
        create_markdown_artifact(
            "# Training\n\n" + markdown_table(rows), key="training-metrics",
            description=f"step {m['step']}/{self.total}, loss {figure(m['loss'], 4)}",
        )  # fmt: skip


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


def loss_curve_png(
    losses: Sequence[float], title: str = "training loss", val: Sequence[tuple[int, float]] = ()
) -> bytes:
    """The loss curve (and validation loss points) as PNG bytes (matplotlib, Agg backend: no display)."""
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
    if val:
        ax.plot(
            [s for s, _ in val], [v for _, v in val], "o-", color="#d62728", lw=1.2, ms=3, label="validation"
        )
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_curve_artifact(png: bytes, png_url: str, train: dict[str, Any], key: str = "loss-curve") -> UUID:
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
    return create_markdown_artifact(body, key=key, description="Training loss per step")


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def adapter_artifact(adapter: dict[str, Any]) -> UUID:
    """Where this run's adapter lives: the storage URL (a link only when a browser can open it) and text."""
    url = adapter["path"]
    body = (
        f"# Adapter {adapter.get('version', '')}\n\n"
        f"- location: `{url}`\n- latest pointer: `{adapter.get('latest')}`\n"
        f"- size: {megabytes(adapter.get('bytes'))}, sha256 `{adapter.get('sha256')}`\n"
        f"- base model: {adapter.get('base_model')}; {adapter.get('lora')}\n"
        f"- steps this run: {adapter.get('steps')}; global step: {adapter.get('global_step')}\n"
    )
    if url.startswith(("http://", "https://")):
        return create_link_artifact(url, link_text=url, key="adapter", description="Trained adapter")
    return create_markdown_artifact(body, key="adapter", description=f"Trained adapter at {url}")
