"""Multimodal training throughput: soft tokens through the packed trainer, cached vs online encoders,
streamed vs in RAM, against text-only training on the same model and batch.

Data: generated drawings of coloured shapes and espeak-ng voices (`streamtune.demo.multimodal`), one medium
per sample, decoded once into feature shards with encoder tokens (CLIP patch tokens, Whisper tiny.en
encoder frames). Runs, each `--iters` steps of stage 2 (projectors + LoRA) on `--batch-size` x `--seq-len`:
  ram       cached encoder tokens, rows in RAM (ListSource)
  stream    cached encoder tokens streamed from the feature shards (CloudStreamingDataset)
  online    raw shards streamed, encoders (and augmentation) run in the data path
  text      the same rows with the answer's words in the prompt instead of media (text-only training)
Tokens/s count non-pad tokens, soft tokens included, over steps after `--warmup` that met an already-seen
batch shape. Then a stage-1 + stage-2 run on the cached tokens is evaluated counterfactually on held-out
samples (loss with own vs another sample's media).

    python -m bench.multimodal                     # CPU: SmolLM2-135M
    python -m bench.multimodal --shape tiny        # random-weight tiny llama (seconds)
    python -m bench.multimodal --shape llama-3.2-1b --batch-size 4 --seq-len 2048 --source DIR \
        --whisper-model DIR --skip-counterfactual  # GPU: media written beforehand (--write-source)

Last stdout line: one JSON object: tokens_s, text_only_tokens_s, soft_vs_text, online_tokens_s,
online_vs_cached, stream_tokens_s, stream_vs_ram, counterfactual {matched, shuffled, ratio}, ...
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import streamtune  # noqa: E402,F401,I001  (OpenBLAS before mlx)
import numpy as np  # noqa: E402

from streamtune.train.data import ListSource, Template  # noqa: E402
from streamtune.train.trainer import TrainArgs, train  # noqa: E402

TEMPLATE = Template(
    prompt="{image}\n{audio}\n{meta_question}", completion="{meta_answer}", system="Answer briefly."
)
TEXT_TEMPLATE = Template(
    prompt="{meta_answer}\n{meta_question}", completion="{meta_answer}", system="Answer briefly."
)


def _steady(history: list[dict], warmup: int) -> float:
    rest = [h for h in history[warmup:] if not h.get("new_shape")] or history[warmup:] or history
    return sum(h["tokens"] for h in rest) / sum(h["seconds"] for h in rest)


def build_data(tmp: str, images: int, audio: int, decode_cfg, source: str | None = None):
    """Raw shard set and feature set (encoder tokens) of generated pictures and voices (or of `source`,
    a folder `write_source` filled earlier: machines without espeak-ng)."""
    from streamtune.demo import multimodal as demo

    if source is None:
        source = os.path.join(tmp, "source")
        demo.write_source(source, images, audio)
    source = os.path.abspath(source)
    work = "file://" + os.path.join(tmp, "work")
    t0 = time.perf_counter()
    features = demo.ingest("file://" + source, work, decode_cfg)
    return work + "/shards", features, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--shape", default=None, help="random-weight llama shape instead of --model (e.g. tiny)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--audio", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-iters", type=int, default=8, help="steps of each stage before the counterfactual")
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--skip-counterfactual", action="store_true")
    ap.add_argument("--source", default=None, help="a folder of pictures and voices from --write-source")
    ap.add_argument("--write-source", default=None, help="only write the generated media to this folder")
    ap.add_argument("--whisper-model", default=None, help="Whisper for audio tokens (default: decode's)")
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files for --shape (else from SmolLM2)")
    ap.add_argument("--num-layers", type=int, default=8, help="blocks with LoRA (-1: all)")
    ap.add_argument("--clip-model", default=None, help="open_clip image tower (default: decode's)")
    ap.add_argument("--media-batch", type=int, default=64, help="online: rows encoded together")
    ap.add_argument("--media-workers", type=int, default=0, help="online: decode/augment threads (0: auto)")
    ap.add_argument("--profile", type=int, default=0, help="time the online data path's parts on N rows")
    ap.add_argument("--profile-only", action="store_true", help="only the --profile part")
    opts = ap.parse_args()
    if opts.write_source:
        from streamtune.demo import multimodal as demo

        print(json.dumps({"samples": demo.write_source(opts.write_source, opts.images, opts.audio)}))
        return

    from streamtune import CloudStreamingDataset
    from streamtune.config import DecodeConfig
    from streamtune.train.trainer import setup_model

    tmp = tempfile.mkdtemp(prefix="bench-mm-")
    atexit.register(shutil.rmtree, tmp, True)
    model = opts.model
    if opts.shape:
        from streamtune.train.synthetic import write_random_model

        model = write_random_model(os.path.join(tmp, "model"), opts.shape, tokenizer_dir=opts.tokenizer_dir)
    models = {"whisper_model": opts.whisper_model, "clip_model": opts.clip_model}
    decode_cfg = DecodeConfig(
        media_tokens=["image", "audio"], transcribe=False, image_layer=1, image_pool=2, image_merge="stack",
        **{k: v for k, v in models.items() if v},
    )  # fmt: skip
    raw, features, decode_s = build_data(tmp, opts.images, opts.audio, decode_cfg, opts.source)
    if opts.profile:
        profile = profile_online(raw, decode_cfg, opts, tmp)
        print(json.dumps({"profile": profile}), flush=True)
        if opts.profile_only:
            return
    rows = list(CloudStreamingDataset(features))
    spec = CloudStreamingDataset(features).index["media_tokens"]  # rows in RAM: the encoders from the index
    results: dict = {"model": opts.shape or opts.model, "batch": [opts.batch_size, opts.seq_len]}
    results["decode_s"] = round(decode_s, 1)

    common = dict(
        model=model, batch_size=opts.batch_size, seq_len=opts.seq_len, iters=opts.iters, save_every=0,
        num_layers=opts.num_layers, rank=8, lr=1e-4, projector_lr=1e-3, warmup=1, seed=0, prefetch=2,
        media_batch=opts.media_batch, media_workers=opts.media_workers,
    )  # fmt: skip
    bundle = setup_model(TrainArgs(**common))

    def multimodal(name, data, **kw):
        args = TrainArgs(
            adapter_path=os.path.join(tmp, name), stage="instruct", template=TEMPLATE, **(common | kw)
        )
        media = decode_cfg if args.media_source == "online" else spec
        return train(args, data, model_bundle=bundle, media=media)

    ram = multimodal("ram", ListSource(rows, shuffle=True))
    stream = multimodal("stream", CloudStreamingDataset(features, shuffle=True, seed=0))
    ram2 = multimodal("ram2", ListSource(rows, shuffle=True))
    text_rows = [{k: v for k, v in r.items() if not k.endswith("_tokens")} for r in rows]
    text = train(
        TrainArgs(adapter_path=os.path.join(tmp, "text"), template=TEXT_TEMPLATE, **common),
        ListSource(text_rows, shuffle=True),
        model_bundle=_fresh(bundle),
    )
    ram_tps = (_steady(ram["history"], opts.warmup) + _steady(ram2["history"], opts.warmup)) / 2
    stream_tps = _steady(stream["history"], opts.warmup)
    text_tps = _steady(text["history"], opts.warmup)
    results.update(
        tokens_s=round(ram_tps, 1),
        text_only_tokens_s=round(text_tps, 1),
        soft_vs_text=round(ram_tps / text_tps, 3),
        stream_tokens_s=round(stream_tps, 1),
        stream_vs_ram=round(stream_tps / ram_tps, 3),
        soft_token_fraction=round(_soft_fraction(rows), 3),
        pad_fraction=round(float(np.mean([h["pad_fraction"] for h in ram["history"]])), 3),
    )
    if not opts.skip_online:
        online = multimodal("online", CloudStreamingDataset(raw, shuffle=True, seed=0), media_source="online")
        online_tps = _steady(online["history"], opts.warmup)
        results.update(
            online_tokens_s=round(online_tps, 1),
            online_vs_cached=round(online_tps / stream_tps, 3),
            online_data_wait_s=round(sum(h["data_wait_s"] for h in online["history"][opts.warmup :]), 2),
        )
    if not opts.skip_counterfactual:
        results["counterfactual"] = _counterfactual(model, tmp, rows, opts, common, spec)
    results["peak_mem_mb"] = round(ram["peak_mem_mb"], 1)
    import mlx.core as mx

    results["device"] = str(mx.default_device())
    print(json.dumps(results))


def profile_online(raw: str, decode_cfg, opts, tmp: str) -> dict:
    """Milliseconds per medium of each part of the online data path (decode, augment, tower input, tower
    one at a time vs batched), and rows/s of the whole path: one medium at a time vs OnlineSource."""
    from streamtune import CloudStreamingDataset
    from streamtune.decode.augment import augment_audio, augment_image, rng_for
    from streamtune.decode.media import decode_audio, decode_image
    from streamtune.decode.tokens import media_spec
    from streamtune.train.mm_train import ENCODED, MultimodalRun
    from streamtune.train.models import load_base
    from streamtune.train.synthetic import write_random_model

    every = list(CloudStreamingDataset(raw))
    rows = [r for r in every if r.get("image") is not None][: opts.profile // 2]
    rows += [r for r in every if r.get("audio") is not None][: opts.profile - len(rows)]
    tiny = write_random_model(os.path.join(tmp, "profile-model"), "tiny", tokenizer_dir=opts.tokenizer_dir)
    model, tokenizer, _ = load_base(tiny)
    args = TrainArgs(
        model=tiny, stage="align", media_source="online", seed=0, media_batch=opts.media_batch,
        media_workers=opts.media_workers,
    )  # fmt: skip
    run = MultimodalRun(args, model, tokenizer, media_spec(decode_cfg, ["image", "audio"]), decode_cfg)
    enc = run.encoders()
    out: dict = {"rows": len(rows), "clip_device": str(enc["image"].clip.device)}

    def ms(fn, items):
        t0 = time.perf_counter()
        res = [fn(x) for x in items]
        return res, round(1000 * (time.perf_counter() - t0) / max(len(items), 1), 3)

    pictures = [bytes(r["image"]) for r in rows if r.get("image") is not None]
    voices = [bytes(r["audio"]) for r in rows if r.get("audio") is not None]
    side = enc["image"].clip.image_size
    images, out["image_decode_ms"] = ms(
        lambda b: decode_image(b, decode_cfg.max_pixels, min_side=side), pictures
    )
    images, out["image_augment_ms"] = ms(lambda im: augment_image(im, rng_for(0, 0, "x", "image")), images)
    tensors, out["image_prepare_ms"] = ms(enc["image"].clip.prepare, images)
    enc["image"].encode_tokens(tensors[:2])  # warm up (CUDA context, kernels)
    _, out["image_tower_alone_ms"] = ms(lambda t: enc["image"].encode([t]), tensors)
    t0 = time.perf_counter()
    enc["image"].encode_tokens(tensors, batch_size=opts.media_batch)
    out["image_tower_batched_ms"] = round(1000 * (time.perf_counter() - t0) / max(len(tensors), 1), 3)
    clips, out["audio_decode_ms"] = ms(lambda b: decode_audio(b, 16000, max_seconds=600), voices)
    clips, out["audio_augment_ms"] = ms(lambda a: augment_audio(a, rng_for(0, 0, "x", "audio")), clips)
    enc["audio"].encode_batch(clips[:2], batch_size=2)
    _, out["audio_encoder_alone_ms"] = ms(enc["audio"].encode, clips)
    t0 = time.perf_counter()
    enc["audio"].encode_batch(clips, batch_size=opts.media_batch)
    out["audio_encoder_batched_ms"] = round(1000 * (time.perf_counter() - t0) / max(len(clips), 1), 3)
    _, alone_ms = ms(lambda r: run.media_of(r, 0, augment=True), rows)
    out["path_alone_rows_s"] = round(1000 / alone_ms, 1)
    source = run.source(rows)
    t0 = time.perf_counter()
    for epoch in range(3):
        source.set_epoch(epoch)
        for row in source:
            assert row[ENCODED] is not None
    out["path_windows_rows_s"] = round(3 * len(rows) / (time.perf_counter() - t0), 1)
    out["path_speedup"] = round(out["path_windows_rows_s"] / out["path_alone_rows_s"], 2)
    out["window_stats"] = {k: round(v, 3) for k, v in source.stats.items()}
    return out


def _fresh(bundle):
    """The shared model without projectors and with its adapters trainable again (a text-only run)."""
    model = bundle[0]
    if "projectors" in model:
        del model["projectors"]
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    return bundle


def _soft_fraction(rows: list[dict]) -> float:
    soft = sum(
        len(r.get("image_tokens") if r.get("image_tokens") is not None else r.get("audio_tokens"))
        for r in rows
    )
    return soft / max(soft + 40 * len(rows), 1)  # ~40 text tokens per sample (template, question, answer)


def _counterfactual(model: str, tmp: str, rows: list[dict], opts, common: dict, spec: dict) -> dict:
    """Stage 1 then stage 2 on the cached tokens, then held-out loss with own vs another sample's media."""
    from streamtune.demo import multimodal as demo
    from streamtune.train.mm_generate import load_multimodal

    args = dict(common, iters=opts.eval_iters, template=TEMPLATE)
    stage1, stage2 = os.path.join(tmp, "cf1"), os.path.join(tmp, "cf2")
    train(
        TrainArgs(adapter_path=stage1, stage="align", **(args | {"projector_lr": 2e-3})),
        ListSource(rows, shuffle=True),
        media=spec,
    )
    train(
        TrainArgs(adapter_path=stage2, stage="instruct", init_adapter=stage1, **args),
        ListSource(rows, shuffle=True),
        media=spec,
    )
    mm = load_multimodal(model, stage2)
    tests = demo.held_out(opts.held_out)
    out = {}
    for kind in ("image", "audio"):
        cf = mm.counterfactual(tests[kind], seq_len=opts.seq_len)
        out[kind] = {k: round(v, 4) if isinstance(v, float) else v for k, v in cf.items()}
    return out


if __name__ == "__main__":
    main()
