"""`streamtune` command line. User errors print one line and exit non-zero; `--debug` shows tracebacks.

Commands that take settings (`run`, `shard`, `decode`, `train`) read them from `-c FILE.yaml` and a flag per
field (see docs/configuration.md): defaults < YAML < flags. Every command ends with a one-line JSON summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from app.settings_flags import flags_help, parse_flags
from streamtune.config import DEFAULT_MODEL, DecodeConfig, IndexConfig, ShardConfig, TrainArgs

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
SETTINGS = {"ignore_unknown_options": True, "allow_extra_args": True}
_state = {"debug": False}


class UserError(Exception):
    """An error caused by input the user gave; shown as one line."""


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _state["debug"] = debug


def _storage_options(endpoint_url: str | None) -> dict | None:
    return {"endpoint_url": endpoint_url} if endpoint_url else None


EndpointOpt = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (default: AWS env).")
ConfigOpt = typer.Option(None, "-c", "--config", help="YAML file of settings (flags override it).")


def _settings(cls, config: Path | None, flags: list[str], section: str | None = None, **given):
    """`cls` from defaults < YAML (`config`; a pipeline file's `section` also works) < `given` < flags."""
    from streamtune.config import build, load_yaml

    data = load_yaml(config) if config else {}
    if section and isinstance(data.get(section), dict) and section not in cls.model_fields:
        data = data[section]
    overrides = {k: v for k, v in given.items() if v is not None} | parse_flags(cls, flags)
    return build(cls, data, overrides=overrides)


def _help(cls, skip: tuple[str, ...] = ()) -> str:
    return "Settings (also in -c FILE.yaml):\n\n" + flags_help(cls, skip)


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("streamtune-demo"), "--workdir", help="Where outputs and summary.json go."
    ),
    samples: int = typer.Option(24, help="Samples in the generated source set."),
    iters: int | None = typer.Option(None, help="Training steps (default: the demo's)."),
    multimodal: bool = typer.Option(
        True, "--multimodal/--no-multimodal", help="Also train the model to see pictures and hear speech."
    ),
) -> None:
    """Run the whole pipeline on the embedded default: generated media on a loopback S3 server."""
    from app.demo import run_demo

    summary = run_demo(str(workdir), samples=samples, iters=iters, multimodal=multimodal)
    _print_summary(summary)


def _pipeline_params():
    from flows.params import PipelineParams

    return PipelineParams


@app.command(
    context_settings=SETTINGS,
    epilog="Every pipeline parameter is a flag: --source-url URL, --train.iters 5, --decode.clip-model RN50 (docs/configuration.md).",
)
def run(
    ctx: typer.Context,
    config_arg: Path | None = typer.Argument(
        None, metavar="[CONFIG]", help="YAML file of pipeline parameters."
    ),
    config: Path | None = ConfigOpt,
    summary_path: Path = typer.Option(Path("summary.json"), "--summary", help="Where to write summary.json."),
) -> None:
    """Run the pipeline flow on real sources (parameters from CONFIG, flags override)."""
    if config_arg and config:
        raise UserError("give the config once: CONFIG or -c CONFIG")
    params = _settings(_pipeline_params(), config or config_arg, ctx.args)
    from flows.pipeline import pipeline

    summary = pipeline(params)
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)


@app.command()
def retry(
    run: str = typer.Argument(..., metavar="RUN", help="Flow run id or name of a finished pipeline run."),
) -> None:
    """Run a failed pipeline run again as the same flow run: finished tasks come back from the cache, only
    what failed runs. A deployment's run is scheduled for its workers (the UI's Retry does the same)."""
    from app.retry import retry_run

    result = retry_run(run)
    if result.get("summary"):
        _print_summary(result["summary"])
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "summary"}))
    if result.get("state") not in (None, "Completed"):
        raise typer.Exit(1)


@app.command()
def manifest(
    source: str = typer.Argument(..., help="Source URL (s3://bucket/prefix, a folder, any fsspec URL)."),
    out: str = typer.Option(..., "--out", help="Where to write manifest.parquet."),
    id_column: str | None = typer.Option(
        None, "--id-column", help="Field naming each record of record files (default: file + row)."
    ),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """List and classify a source (record files: one row per record); write the manifest."""
    from streamtune.manifest import build_manifest, summarize_manifest, write_manifest

    so = _storage_options(endpoint_url)
    table, problems = build_manifest(source, so, id_column=id_column)
    write_manifest(table, out, so)
    typer.echo(json.dumps({**summarize_manifest(table), "quarantined": len(problems), "out": out}))


@app.command(context_settings=SETTINGS, epilog=_help(ShardConfig))
def shard(
    ctx: typer.Context,
    manifest_url: str = typer.Argument(
        ..., metavar="MANIFEST", help="manifest.parquet written by `manifest`."
    ),
    out: str = typer.Option(..., "--out", help="Shard set prefix."),
    source: str | None = typer.Option(
        None, "--source", help="Read objects from here instead of the manifest's source."
    ),
    config: Path | None = ConfigOpt,
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Pack a manifest's samples into Arrow shards + index.json (settings: --max-shard-bytes N)."""
    from streamtune.ingest import commit_raw_shards, plan_shards, unusable_objects, write_raw_shard
    from streamtune.manifest import manifest_source, read_manifest

    cfg = _settings(ShardConfig, config, ctx.args, section="shard")
    so = _storage_options(endpoint_url)
    table = read_manifest(manifest_url, so)
    source_options = so
    if source is None:
        source, recorded = manifest_source(table)
        source_options = {**(recorded or {}), **(so or {})} or None
    plans = plan_shards(table, max_shard_bytes=cfg.max_shard_bytes, inline_max_bytes=cfg.inline_max_bytes)
    with _progress() as progress:
        task = progress.add_task("shard", total=len(plans))
        results = []
        for plan in plans:
            results.append(
                write_raw_shard(source, table, plan, out, source_options=source_options, out_options=so)
            )
            progress.advance(task)
    index = commit_raw_shards(out, results, so, append=False, problems=unusable_objects(table))
    quarantined = len(unusable_objects(table)) + sum(len(r["quarantine"]) for r in results)
    typer.echo(
        json.dumps({"shards": len(index["shards"]), "rows": index.get("rows"), "bytes": index.get("bytes"),
                    "quarantined": quarantined, "source": source, "out": out})
    )  # fmt: skip


@app.command(context_settings=SETTINGS, epilog=_help(DecodeConfig))
def decode(
    ctx: typer.Context,
    shards_url: str = typer.Argument(..., metavar="SHARDS", help="Raw shard set prefix."),
    out: str = typer.Option(..., "--out", help="Feature shard set prefix."),
    config: Path | None = ConfigOpt,
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Decode raw shards into feature shards (transcripts, CLIP embeddings, tags). Settings: --whisper-model,
    --clip-model, --clip-pretrained, --labels '[a, b]' ... (docs/configuration.md, `decode` section)."""
    from streamtune.decode.features import decode_shards

    cfg = _settings(DecodeConfig, config, ctx.args, section="decode")
    index = decode_shards(shards_url, out, cfg, _storage_options(endpoint_url))
    stats = index.get("stats") or {}
    keys = ("samples", "features", "quarantined", "audio_files", "audio_seconds", "images", "skipped_shards")
    typer.echo(
        json.dumps({"shards": len(index["shards"]), "rows": index.get("rows"), "bytes": index.get("bytes"),
                    **{k: round(stats[k], 2) for k in keys if k in stats}, "out": out})
    )  # fmt: skip


@app.command("index", context_settings=SETTINGS, epilog=_help(IndexConfig))
def index_cmd(
    ctx: typer.Context,
    features_url: str = typer.Argument(..., metavar="FEATURES", help="Feature shard set prefix."),
    out: str | None = typer.Option(None, "--out", help="Index URL (default: index/ beside FEATURES)."),
    config: Path | None = ConfigOpt,
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Build or update the search index of a feature set (only changed shards and transcripts are redone).
    Settings: --text-model, --vector-dtype, --clip-model, --clip-pretrained ... (`index` section)."""
    from streamtune.search import build_index, default_index_url

    cfg = _settings(IndexConfig, config, ctx.args, section="index")
    out = out or default_index_url(features_url)
    if sys.stderr.isatty():
        with _progress() as bar:
            task = bar.add_task("index shards", total=None)
            m = build_index(features_url, out, cfg, _storage_options(endpoint_url),
                            progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    else:
        m = build_index(features_url, out, cfg, _storage_options(endpoint_url))
    s = m["stats"]
    keys = ("embedded", "reused", "shards", "shards_reused", "removed", "seconds")
    typer.echo(json.dumps({"rows": m["rows"], "parts": len(m["parts"]), "bytes": m["bytes"],
                           "modalities": m.get("modalities", {}), **{k: s[k] for k in keys}, "out": out}))  # fmt: skip


@app.command("search", context_settings=SETTINGS, epilog=_help(IndexConfig))
def search_cmd(
    ctx: typer.Context,
    query: str = typer.Argument(..., metavar="QUERY", help="What was said or seen."),
    index: str = typer.Option(..., "--index", help="Search index URL (from `streamtune index`)."),
    top: int = typer.Option(20, "--top", min=1, help="Moments to show."),
    where: list[str] = typer.Option([], "--where", help="FIELD=VALUE filter on sidecar fields (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as one JSON line."),
    html: Path | None = typer.Option(
        None, "--html", help="Also write a contact sheet (one self-contained page)."
    ),
    source_url: str | None = typer.Option(None, help="Root of the source objects, for links to keys."),
    rerank: Path | None = typer.Option(
        None, "--rerank", help="Multimodal adapter folder re-scoring top hits."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model of the --rerank adapter."),
    config: Path | None = ConfigOpt,
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Find moments: BM25 + transcript embeddings (+ CLIP text-to-frame with a trained CLIP), fused by rank."""
    import time

    from streamtune.search import open_index

    cfg = _settings(IndexConfig, config, ctx.args, section="index")
    t0 = time.perf_counter()
    with open_index(index, cfg, _storage_options(endpoint_url)) as idx:
        t1 = time.perf_counter()
        hits = idx.search(query, top=top, where=where)
        if rerank:
            hits = _reranker(idx, rerank, model)(query, hits)
        seconds = {"open_s": round(t1 - t0, 3), "query_s": round(time.perf_counter() - t1, 3)}
        signals = ["lexical", "semantic", *idx.signals] + (["rerank"] if rerank else [])
        if html:
            from streamtune.search.sheet import write_sheet

            write_sheet(
                str(html), query, hits, idx.thumbnail, source_url, _storage_options(endpoint_url), index
            )
    if as_json:
        typer.echo(json.dumps({"query": query, "hits": [h.to_dict() for h in hits], "count": len(hits),
                               "signals": signals, **seconds}))  # fmt: skip
        return
    _print_hits(hits)
    typer.echo(json.dumps({"query": query, "count": len(hits), "signals": signals, **seconds}))


def _print_hits(hits: list) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from streamtune.search.rank import timecode

    table = Table(show_lines=False)
    for name in ("#", "score", "source", "time", "matched", "said"):
        table.add_column(name, overflow="fold")
    for n, h in enumerate(hits, 1):
        said = Text(h.snippet)
        for a, b in h.marks:
            said.stylize("bold reverse", a, b)
        when = f"{timecode(h.t0)}-{timecode(h.t1)}" if h.modality in ("video", "audio") else ""
        table.add_row(str(n), f"{h.score:.4f}", h.source, when, ",".join(h.matched), said)
    Console().print(table)


@app.command(context_settings=SETTINGS, epilog=_help(TrainArgs))
def train(
    ctx: typer.Context,
    features: str = typer.Argument(..., help="Feature shard set prefix."),
    config: Path | None = ConfigOpt,
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """LoRA/QLoRA fine-tune a base model on a feature shard set, streamed. Every setting is a flag
    (--iters 200 --lr 2e-4 --batch-size 8 --qlora ...; docs/configuration.md). Checkpoints go next to the
    adapter every --save-every steps; --resume continues from the latest one. Multimodal: --stage align
    (then --stage instruct --init-adapter STAGE1_DIR) on features decoded with media_tokens; with
    --media-source online, FEATURES is a raw shard set and the encoders are the `decode:` section of -c."""
    from streamtune import CloudStreamingDataset
    from streamtune.train.trainer import train as run_train

    so = _storage_options(endpoint_url)
    args = _settings(TrainArgs, config, ctx.args, section="train")
    args = args.model_copy(update={"storage_options": so})
    ds = CloudStreamingDataset(features, storage_options=so, shuffle=True, seed=args.seed)
    result = run_train(args, ds, media=_online_encoders(config, args))
    if result.get("resumed_from_step") is not None:
        typer.echo(f"resumed from step {result['resumed_from_step']} ({args.checkpoint_dir})", err=True)
    keep = (
        "steps",
        "loss_first",
        "loss_last",
        "tokens",
        "tokens_per_s",
        "seconds",
        "val_loss",
        "resumed_from_step",
    )
    typer.echo(
        json.dumps({**{k: result.get(k) for k in keep}, "adapter_path": result["adapter_path"]}, default=str)
    )


def _online_encoders(config: Path | None, args: TrainArgs) -> DecodeConfig | None:
    """The encoders online multimodal training runs: the `decode:` section of a pipeline file, if any."""
    if args.stage == "text" or args.media_source != "online":
        return None
    from streamtune.config import build, load_yaml

    data = load_yaml(config) if config else {}
    cfg = build(DecodeConfig, data.get("decode") if isinstance(data.get("decode"), dict) else {})
    kinds = list(args.modalities or cfg.media_tokens or ["image", "audio"])
    return cfg.model_copy(update={"media_tokens": kinds})


@app.command()
def generate(
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    adapter_path: Path | None = typer.Option(None, help="Adapter folder."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_tokens: int = typer.Option(64),
    image: Path | None = typer.Option(None, "--image", help="Picture the model sees (multimodal adapter)."),
    audio: Path | None = typer.Option(None, "--audio", help="Sound the model hears (multimodal adapter)."),
) -> None:
    """Generate text with a base model and optional adapter. With --image / --audio the adapter folder must
    be a multimodal one (projector.safetensors + multimodal.json); the prompt may place them with <image> /
    <audio>, else they go first."""
    has_files = adapter_path is not None and any(
        (adapter_path / n).exists() for n in ("adapters.safetensors", "latest.json")
    )
    if adapter_path is not None and not has_files:
        raise UserError(f"no adapters.safetensors (or latest.json) in {adapter_path}")
    if image is not None or audio is not None:
        typer.echo(_generate_with_media(model, adapter_path, prompt, image, audio, max_tokens))
        return
    from streamtune.train.generate import generate as gen

    typer.echo(
        gen(model, prompt, adapter_path=str(adapter_path) if adapter_path else None, max_tokens=max_tokens)
    )


def _generate_with_media(model, adapter_path, prompt, image, audio, max_tokens) -> str:
    for kind, path in (("image", image), ("audio", audio)):
        if path is not None and not path.is_file():
            raise UserError(f"--{kind}: no such file {path}")
    if adapter_path is None:
        raise UserError("--image/--audio need --adapter-path: a multimodal adapter folder")
    from streamtune.train.mm_generate import load_multimodal

    mm = load_multimodal(model, str(adapter_path))
    return mm.generate(prompt, image=image, audio=audio, max_tokens=max_tokens)


@app.command()
def gc(
    prefixes: list[str] = typer.Argument(
        ..., metavar="PREFIX...", help="Shard set prefixes, e.g. WORK_URL/shards WORK_URL/features."
    ),
    older_than_minutes: float = typer.Option(60.0, help="Keep unlisted shards written more recently."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Delete shard files no index.json lists any more (left by incremental runs that replaced them)."""
    from streamtune.shards.gc import collect_garbage

    so = _storage_options(endpoint_url)
    for prefix in prefixes:
        gone = collect_garbage(prefix, so, older_than_s=older_than_minutes * 60, dry_run=dry_run)
        typer.echo(json.dumps({"prefix": prefix, "dry_run": dry_run, "deleted": gone}))


@app.command("export-base")
def export_base_cmd(
    model: str = typer.Option(DEFAULT_MODEL, help="Base model to export."),
    out: Path = typer.Option(..., "--out", help="Output mlx-lm folder."),
) -> None:
    """Write a base model as an mlx-lm folder (config.json, model.safetensors, tokenizer)."""
    from streamtune.train.models import export_base

    typer.echo(json.dumps({"out": export_base(model, str(out))}))


@app.command("export")
def export_cmd(
    adapter: str = typer.Argument(..., metavar="ADAPTER_DIR", help="Adapter folder or URL."),
    base: str | None = typer.Option(None, "--base", help="Base model (default: the adapter's model)."),
    to: str = typer.Option(..., "--to", help="peft | gguf-adapter | fused-mlx | fused-gguf | ollama"),
    out: Path = typer.Option(..., "--out", help="Output folder (or a .gguf file for the GGUF formats)."),
    dtype: str | None = typer.Option(None, help="GGUF tensor type: f16 (default), bf16, q8_0, f32."),
    base_name: str | None = typer.Option(None, help="PEFT base_model_name_or_path (default: --base)."),
    ollama_mode: str = typer.Option("fused", help="ollama: fused (one GGUF) or adapter (base + adapter)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Hand an adapter off: PEFT, a llama.cpp LoRA GGUF, a fused mlx-lm folder or GGUF, an Ollama folder."""
    from streamtune.export import export_adapter

    summary = export_adapter(
        adapter, base, to, str(out), dtype=dtype, base_name=base_name, ollama_mode=ollama_mode,
        force=force, storage_options=_storage_options(endpoint_url),
    )  # fmt: skip
    for note in summary["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(json.dumps(summary))


@app.command(context_settings=SETTINGS)
def serve(
    ctx: typer.Context,
    config_arg: Path | None = typer.Argument(None, metavar="[CONFIG]", help="YAML pipeline parameters."),
    config: Path | None = ConfigOpt,
    cron: str = typer.Option("0 3 * * *", help="Cron schedule."),
    timezone: str = typer.Option(
        "UTC", help="Time zone of the cron schedule (IANA name, e.g. Europe/Paris)."
    ),
) -> None:
    """Serve the pipeline flow on this machine with a cron schedule (Prefect flow.serve)."""
    from streamtune.config import load_yaml, set_dotted

    data = load_yaml(config or config_arg) if (config or config_arg) else {}
    for dotted, value in parse_flags(_pipeline_params(), ctx.args).items():
        set_dotted(data, dotted, value)
    from flows.pipeline import serve as serve_flow

    serve_flow(cron=cron, parameters=data, timezone=timezone)


@app.command("train-clip")
def train_clip_cmd(
    cache_dir: Path | None = typer.Option(None, help="Cache folder (default ~/.cache/streamtune)."),
    steps: int = typer.Option(None, help="Training steps (default: the recipe's)."),
    evaluate: int = typer.Option(120, help="Held-out drawings for the zero-shot accuracy (0: skip)."),
) -> None:
    """Train (once; cached by recipe) a small CLIP on drawings of the demo's colours and shapes; prints the
    config and checkpoint to pass as --decode.clip-model / --decode.clip-pretrained."""
    import dataclasses

    from streamtune.decode.clip_train import ClipRecipe, trained_clip, zero_shot_accuracy

    recipe = ClipRecipe() if steps is None else dataclasses.replace(ClipRecipe(), steps=steps)
    config, checkpoint = trained_clip(str(cache_dir) if cache_dir else None, recipe,
                                      log=lambda m: typer.echo(m, err=True))  # fmt: skip
    out = {"clip_model": config, "clip_pretrained": checkpoint}
    if evaluate:
        out["zero_shot"] = zero_shot_accuracy(config, checkpoint, n=evaluate)
    typer.echo(json.dumps(out))


@app.command("serve-search")
def serve_search(
    index: str = typer.Option(..., "--index", help="Search index URL (from `streamtune index`)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8765, help="Port (0: any free port)."),
    source_url: str | None = typer.Option(None, help="Root of the source objects, for links to keys."),
    rerank: Path | None = typer.Option(
        None, "--rerank", help="Multimodal adapter folder re-scoring top hits."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model of the --rerank adapter."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Serve a local search page (query box, contact-sheet results) and /api/search JSON over one index."""
    from streamtune.search import open_index
    from streamtune.search.serve import make_server

    so = _storage_options(endpoint_url)
    idx = open_index(index, storage_options=so)
    reranker = _reranker(idx, rerank, model) if rerank else None
    idx.search("warm up", top=1)  # load the query models before the page is announced
    server = make_server(idx, host, port, source_url, so, rerank=reranker)
    h, p = server.server_address[:2]
    typer.echo(json.dumps({"url": f"http://{h}:{p}/", "segments": len(idx)}), err=False)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        idx.close()


def _reranker(idx, adapter: Path, model: str):
    from streamtune.search.rerank import Reranker

    if not adapter.exists():
        raise UserError(f"--rerank: no such adapter folder {adapter}")
    rr = Reranker(model, str(adapter))
    return lambda query, hits: rr.rerank(idx, query, hits)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _print_summary(summary: dict) -> None:
    from rich.console import Console

    from streamtune.report import figure

    console = Console()
    t = summary.get("train") or {}
    d = summary.get("decoded") or {}
    lines = [
        f"samples            {summary.get('samples')}",
        f"shards             {summary.get('shards')}",
        f"bytes streamed     {summary.get('bytes_streamed')}",
        f"audio transcribed  {d.get('audio')} clips, {summary.get('audio_seconds', 0):.1f} s",
        f"images embedded    {d.get('image')}",
        f"quarantined        {summary.get('quarantined')}",
        f"training steps     {t.get('steps')}",
        f"loss               {figure(t.get('loss_first'), 4)} -> {figure(t.get('loss_last'), 4)}",
        f"tokens/s           {figure(t.get('tokens_per_s'))}",
        f"adapter            {summary.get('adapter_path')}",
        f"flow run           {summary.get('flow_run_name')} ({summary.get('flow_run_id')})",
        f"this run           {(summary.get('run') or {}).get('headline')}",
    ]
    if summary.get("generation"):
        g = summary["generation"]
        lines += [
            f"prompt             {g['prompt']!r}",
            f"before             {g['before']!r}",
            f"after              {g['after']!r}",
        ]
    for kind, m in ((k, (summary.get("multimodal") or {}).get(k)) for k in ("image", "audio")):
        if m:
            cf = m["counterfactual"]
            lines += [
                f"{kind:<6} asked     {m['question']!r} (expected e.g. {m['expected']!r})",
                f"       before     {m['before']!r}",
                f"       after      {m['after']!r}",
                f"       held-out   colour {m['colour_accuracy']:.0%}, shape {m['shape_accuracy']:.0%} of "
                f"{m['samples']}; loss own/other media {cf['matched']:.3f}/{cf['shuffled']:.3f} "
                f"(ratio {cf['ratio']:.2f})",
            ]
    console.print("\n".join(lines))


def _one_line(e: BaseException) -> str:
    from pydantic import ValidationError

    from streamtune.config import ConfigError
    from streamtune.config import _one_line as validation_line

    if isinstance(e, ValidationError):
        return validation_line(e, type(e))
    if isinstance(e, ConfigError | UserError):
        return str(e).splitlines()[0]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (UserError, FileNotFoundError, PermissionError, ValueError, KeyError, OSError) as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if debug or os.environ.get("STREAMTUNE_DEBUG"):
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)
