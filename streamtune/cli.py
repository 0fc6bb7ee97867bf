"""`streamtune` command line. User errors print one line and exit non-zero; `--debug` shows tracebacks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
_state = {"debug": False}


class UserError(Exception):
    """An error caused by input the user gave; shown as one line."""


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _state["debug"] = debug


def _storage_options(endpoint_url: str | None) -> dict | None:
    return {"endpoint_url": endpoint_url} if endpoint_url else None


EndpointOpt = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (default: AWS env).")


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("streamtune-demo"), "--workdir", help="Where outputs and summary.json go."
    ),
    samples: int = typer.Option(24, help="Samples in the generated source set."),
    iters: int | None = typer.Option(None, help="Training steps (default: the demo's)."),
) -> None:
    """Run the whole pipeline on the embedded default: generated media on a loopback S3 server."""
    from streamtune.demo.run import run_demo

    summary = run_demo(str(workdir), samples=samples, iters=iters)
    _print_summary(summary)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML file with pipeline parameters."),
    source_url: str | None = typer.Option(None, help="Override source_url."),
    work_url: str | None = typer.Option(None, help="Override work_url."),
    summary_path: Path = typer.Option(Path("summary.json"), "--summary", help="Where to write summary.json."),
) -> None:
    """Run the pipeline flow on real sources (parameters from CONFIG, flags override)."""
    import yaml

    if not config.exists():
        raise UserError(f"config not found: {config}")
    params = yaml.safe_load(config.read_text()) or {}
    if not isinstance(params, dict):
        raise UserError(f"{config}: expected a mapping of pipeline parameters")
    for key, value in (("source_url", source_url), ("work_url", work_url)):
        if value:
            params[key] = value
    from flows.pipeline import PipelineParams, pipeline

    summary = pipeline(PipelineParams(**params))
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)


@app.command()
def manifest(
    source: str = typer.Argument(..., help="Source URL (s3://bucket/prefix, a folder, any fsspec URL)."),
    out: str = typer.Option(..., "--out", help="Where to write manifest.parquet."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """List and classify a source; write the manifest."""
    from streamtune.manifest import build_manifest, summarize_manifest, write_manifest

    so = _storage_options(endpoint_url)
    table, problems = build_manifest(source, so)
    write_manifest(table, out, so)
    typer.echo(json.dumps({**summarize_manifest(table), "quarantined": len(problems), "out": out}))


@app.command()
def shard(
    manifest_url: str = typer.Argument(
        ..., metavar="MANIFEST", help="manifest.parquet written by `manifest`."
    ),
    source: str = typer.Option(..., "--source", help="The source URL the manifest lists."),
    out: str = typer.Option(..., "--out", help="Shard set prefix."),
    max_shard_mb: int = typer.Option(64, help="Target shard size."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Pack a manifest's samples into Arrow shards + index.json."""
    from streamtune.ingest import commit_raw_shards, plan_shards, unusable_objects, write_raw_shard
    from streamtune.manifest import read_manifest

    so = _storage_options(endpoint_url)
    table = read_manifest(manifest_url, so)
    plans = plan_shards(table, max_shard_bytes=max_shard_mb << 20)
    with _progress() as progress:
        task = progress.add_task("shard", total=len(plans))
        results = []
        for plan in plans:
            results.append(write_raw_shard(source, table, plan, out, source_options=so, out_options=so))
            progress.advance(task)
    index = commit_raw_shards(out, results, so, append=False, problems=unusable_objects(table))
    typer.echo(json.dumps({"shards": len(index["shards"]), "rows": index.get("rows"), "out": out}))


@app.command()
def decode(
    shards_url: str = typer.Argument(..., metavar="SHARDS", help="Raw shard set prefix."),
    out: str = typer.Option(..., "--out", help="Feature shard set prefix."),
    whisper_model: str = typer.Option("offline:tiny.en", help="mlx-whisper folder, hub id or offline:NAME."),
    clip_model: str = typer.Option("ViT-B-32", help="open_clip model name."),
    clip_pretrained: str | None = typer.Option(None, help="open_clip pretrained tag or checkpoint path."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """Decode raw shards into feature shards (transcripts, CLIP embeddings, tags)."""
    from streamtune.decode.features import DecodeConfig, decode_shards

    cfg = DecodeConfig(whisper_model=whisper_model, clip_model=clip_model, clip_pretrained=clip_pretrained)
    result = decode_shards(shards_url, out, cfg, _storage_options(endpoint_url))
    typer.echo(json.dumps(result, default=str))


@app.command()
def train(
    features: str = typer.Argument(..., help="Feature shard set prefix."),
    model: str = typer.Option(
        "offline:smollm2", help="Base model: offline:smollm2, .gguf, mlx-lm folder, hub id."
    ),
    adapter_path: Path = typer.Option(Path("adapters"), help="Output folder for the adapter."),
    qlora: bool = typer.Option(False, "--qlora", help="Keep the base quantized (QLoRA)."),
    iters: int = typer.Option(100, help="Training steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    endpoint_url: str | None = EndpointOpt,
) -> None:
    """LoRA/QLoRA fine-tune a base model on a feature shard set, streamed."""
    from streamtune import CloudStreamingDataset
    from streamtune.train.trainer import TrainArgs
    from streamtune.train.trainer import train as run_train

    so = _storage_options(endpoint_url)
    ds = CloudStreamingDataset(features, storage_options=so, shuffle=True)
    args = TrainArgs(model=model, adapter_path=str(adapter_path), qlora=qlora, iters=iters, resume=resume)
    result = run_train(args, ds)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "losses"}, default=str))


@app.command()
def generate(
    model: str = typer.Option("offline:smollm2", help="Base model."),
    adapter_path: Path | None = typer.Option(None, help="Adapter folder."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_tokens: int = typer.Option(64),
) -> None:
    """Generate text with a base model and optional adapter."""
    if adapter_path is not None and not (adapter_path / "adapters.safetensors").exists():
        raise UserError(f"no adapters.safetensors in {adapter_path}")
    from streamtune.train.generate import generate as gen

    typer.echo(
        gen(model, prompt, adapter_path=str(adapter_path) if adapter_path else None, max_tokens=max_tokens)
    )


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
    model: str = typer.Option("offline:smollm2", help="Base model to export."),
    out: Path = typer.Option(..., "--out", help="Output mlx-lm folder."),
) -> None:
    """Write a base model as an mlx-lm folder (config.json, model.safetensors, tokenizer)."""
    from streamtune.train.models import export_base

    typer.echo(export_base(model, str(out)))


@app.command()
def serve(
    config: Path | None = typer.Argument(None, help="YAML pipeline parameters."),
    cron: str = typer.Option("0 3 * * *", help="Cron schedule."),
) -> None:
    """Serve the pipeline flow on this machine with a cron schedule (Prefect flow.serve)."""
    import yaml

    from flows.pipeline import serve as serve_flow

    params = yaml.safe_load(config.read_text()) if config else {}
    serve_flow(cron=cron, parameters=params or {})


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _print_summary(summary: dict) -> None:
    from rich.console import Console

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
        f"loss               {t.get('loss_first')} -> {t.get('loss_last')}",
        f"tokens/s           {t.get('tokens_per_s')}",
        f"adapter            {summary.get('adapter_path')}",
        f"flow run           {summary.get('flow_run_id')}",
    ]
    if summary.get("generation"):
        g = summary["generation"]
        lines += [
            f"prompt             {g['prompt']!r}",
            f"before             {g['before']!r}",
            f"after              {g['after']!r}",
        ]
    console.print("\n".join(lines))


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (UserError, FileNotFoundError, PermissionError, ValueError, KeyError, OSError) as e:
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
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
