"""Training throughput: streamtune's packed trainer vs mlx-lm's trainer (and PyTorch+PEFT on CUDA).

Same model, same rows, same batch shape (rows x seq_len), same LoRA (rank 8, every linear of every block).
Tokens/s count non-pad input tokens only and leave out `--warmup` steps. Runs:
  ram      streamtune trainer fed from a list in RAM
  stream   streamtune trainer fed by CloudStreamingDataset over Arrow feature shards (loopback S3 or file)
  mlx_lm   mlx_lm.tuner.trainer.train on the same prompt/completion pairs (its own padding/batching)
  peft     (--peft, needs CUDA) transformers + peft LoRA, padded batches, bf16

    python bench/train.py                                  # CPU: SmolLM2-135M, loopback S3
    python bench/train.py --shape llama-3.2-1b --storage file --peft --batch-size 4 --seq-len 2048

Last stdout line: one JSON object with tokens_s, mlx_lm_tokens_s, ratio_mlx_lm, stream_vs_ram, peak_mem_mb
(and peft_tokens_s, ratio_peft with --peft).
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
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from streamtune.train.data import Packer, encode, render  # noqa: E402
from streamtune.train.trainer import TrainArgs, setup_model, train  # noqa: E402

WORDS = "the a dog cat bird rain street music voice laughs door car engine wind kitchen park water people talk".split()


def make_rows(n: int, seed: int, max_words: int) -> list[dict]:
    """Feature rows with transcript lengths spread like real clips (few long, many short)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = int(np.clip(rng.lognormal(np.log(max_words / 6), 0.8), 3, max_words))
        rows.append(
            {
                "sample_id": f"clip/{i:06d}",
                "transcript": " ".join(rng.choice(WORDS, words)),
                "tags": list(rng.choice(WORDS, 3)),
                "text": " ".join(rng.choice(WORDS, int(rng.integers(4, 24)))),
                "meta": json.dumps({"notes": f"take {i % 7}"}),
                "language": "en",
            }
        )
    return rows


def write_shards(rows: list[dict], url: str, storage_options: dict | None) -> None:
    import pyarrow as pa

    from streamtune.shards.writer import ShardSetWriter

    schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("transcript", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("text", pa.string()),
            ("meta", pa.string()),
            ("language", pa.string()),
        ]
    )
    writer = ShardSetWriter(url, schema, storage_options, max_shard_bytes=256 << 10)
    writer.write(pa.Table.from_pylist(rows, schema))
    writer.close()


def run_ours(args: TrainArgs, bundle, data) -> dict:
    res = train(args, data, model_bundle=bundle)
    return res


def _steady(history: list[dict], warmup: int) -> float:
    """Non-pad tokens/s over the steps after `warmup` that met an already-compiled batch shape."""
    rest = [h for h in history[warmup:] if not h.get("new_shape")] or history[warmup:] or history
    return sum(h["tokens"] for h in rest) / sum(h["seconds"] for h in rest)


def _median_rate(history: list[dict], warmup: int) -> float:
    """Median per-step tokens/s after `warmup`: insensitive to a few stalled steps."""
    rest = [h for h in history[warmup:] if not h.get("new_shape")] or history[warmup:] or history
    return float(np.median([h["tokens"] / h["seconds"] for h in rest]))


def run_mlx_lm(bundle, rows, opts) -> dict:
    """mlx-lm's own trainer on the same (prompt, completion) pairs, through the same chat template.

    Counted like ours: non-pad input tokens (mlx-lm's own tokens/s counts only unmasked completion
    tokens). Its step is compiled per padded batch shape, so a step whose shape it has not seen before
    includes a compile: the steady rate uses only steps with an already-seen shape.
    """
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, CompletionsDataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    model, tokenizer, _ = bundle
    pairs = [render(r) for r in rows]
    data = [{"prompt": p, "completion": c} for p, c in pairs if p]
    dataset = CacheDataset(CompletionsDataset(data, tokenizer, "prompt", "completion", mask_prompt=True))
    batches, seconds = [], []

    def counted_batches(**kwargs):
        for batch, lengths in iterate_batches(**kwargs):
            spans = lengths.tolist()
            batches.append((tuple(batch.shape), sum(max(n - 1, 0) for _, n in spans)))
            yield batch, lengths

    class Collect:
        def on_train_loss_report(self, info):
            seconds.append(1.0 / info["iterations_per_second"])

        def on_val_loss_report(self, info):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        mlx_lm_train(
            model,
            optim.Adam(learning_rate=1e-5),
            dataset,
            None,
            TrainingArgs(
                batch_size=opts.batch_size,
                iters=max(opts.iters, opts.mlx_lm_iters),
                steps_per_report=1,
                steps_per_eval=10**9,
                steps_per_save=10**9,
                max_seq_length=opts.seq_len,
                adapter_file=os.path.join(tmp, "a.safetensors"),
            ),
            iterate_batches=counted_batches,
            training_callback=Collect(),
        )
    seen, warm_tokens, warm_s = set(), 0, 0.0
    for (shape, tokens), s in zip(batches, seconds, strict=False):
        if shape in seen:
            warm_tokens, warm_s = warm_tokens + tokens, warm_s + s
        seen.add(shape)
    all_tps = sum(t for _, t in batches[: len(seconds)]) / sum(seconds)
    return {
        "steady": warm_tokens / warm_s if warm_s else all_tps,
        "all_steps": all_tps,
        "steady_steps": sum(1 for _ in seconds) - len(seen),
        "shapes": len(seen),
        "pad_fraction": 1 - sum(t for _, t in batches) / sum(b * (w - 1) for (b, w), _ in batches),
    }


def run_peft(model_dir: str, rows, opts) -> float:
    """PyTorch + PEFT LoRA (rank 8, same 7 projections), padded batches in data order, bf16 on CUDA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    try:
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    except (TypeError, ValueError):  # rope scaling spelled differently across versions: irrelevant to speed
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "rope_scaling")})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):  # initialise on the GPU: an 8B model's random init on the CPU takes minutes
        model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.rank * 2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
    )
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    encoded = [encode(tokenizer, *render(r), max_len=opts.seq_len) for r in rows]
    pad = tokenizer.pad_token_id or 0

    def padded(step):
        chunk = [encoded[(step * opts.batch_size + j) % len(encoded)] for j in range(opts.batch_size)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, p) in enumerate(chunk):
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, p : len(x)] = torch.tensor(x[p:])
            attn[j, : len(x)] = 1
        return ids, attn, labels, sum(len(x) - 1 for x, _ in chunk)

    # Full rows of concatenated samples (plain causal attention across samples: cheaper than a correct
    # packed mask, so this favours the baseline).
    stream = iter(encoded)
    packer = Packer(opts.batch_size, opts.seq_len)

    def full_rows(step):
        batch = packer.next_batch(lambda: next(stream, None))
        ids = torch.tensor(batch.inputs, dtype=torch.long)
        labels = torch.where(
            torch.tensor(batch.loss_mask) > 0, torch.tensor(batch.targets, dtype=torch.long), -100
        )
        labels = torch.cat(
            [torch.full((labels.shape[0], 1), -100), labels[:, :-1]], dim=1
        )  # HF shifts labels
        return ids, torch.ones_like(ids), labels, batch.tokens

    results = {}
    for name, make in (("padded", padded), ("full_rows", full_rows)):
        times, tokens = [], []
        for step in range(opts.iters):
            ids, attn, labels, n = make(step)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids.cuda(), attention_mask=attn.cuda(), labels=labels.cuda())
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens.append(n)
        w = opts.warmup
        results[name] = sum(tokens[w:]) / sum(times[w:])
    return results


def _stream_vs_ram(results, opts, args, bundle, rows, ram, url, storage_options) -> None:
    """Three more runs after `ram` (stream, stream, RAM: ABBA order) and their ratios into `results`."""
    from streamtune import CloudStreamingDataset
    from streamtune.train.data import ListSource

    stream = run_ours(args, bundle, CloudStreamingDataset(url, storage_options))
    stream2 = run_ours(args, bundle, CloudStreamingDataset(url, storage_options))
    ram2 = run_ours(args, bundle, ListSource(rows))
    ram_tps = (_steady(ram["history"], opts.warmup) + _steady(ram2["history"], opts.warmup)) / 2
    stream_tps = (_steady(stream["history"], opts.warmup) + _steady(stream2["history"], opts.warmup)) / 2
    results.update(
        tokens_s=round(ram_tps, 1),
        stream_tokens_s=round(stream_tps, 1),
        stream_vs_ram=round(stream_tps / ram_tps, 3),
        stream_vs_ram_median=round(
            (_median_rate(stream["history"], opts.warmup) + _median_rate(stream2["history"], opts.warmup))
            / (_median_rate(ram["history"], opts.warmup) + _median_rate(ram2["history"], opts.warmup)),
            3,
        ),
        stream_data_wait_s=round(sum(h["data_wait_s"] for h in stream["history"][opts.warmup :]), 3),
        ram_data_wait_s=round(sum(h["data_wait_s"] for h in ram["history"][opts.warmup :]), 3),
        # per step after warmup; negative: the step met a new shape (compiled), left out of the rates
        step_s={
            name: [
                round(-h["seconds"] if h["new_shape"] else h["seconds"], 4)
                for h in run["history"][opts.warmup :]
            ]
            for name, run in (("ram", ram), ("stream", stream), ("stream2", stream2), ("ram2", ram2))
        },
        pairs=[
            round(_steady(s["history"], opts.warmup) / _steady(r["history"], opts.warmup), 3)
            for s, r in ((stream, ram), (stream2, ram2))
        ],
    )


def _cpu_ops_ratio(results: dict, args, bundle, rows, first_on: dict, warmup: int) -> None:
    """Tokens/s with the numpy softmax/SiLU (`streamtune.cpu_ops`) on and off, runs in ABBA order."""
    from streamtune import cpu_ops
    from streamtune.train.data import ListSource

    rates = {True: [_steady(first_on["history"], warmup)], False: []}
    for on in (False, False, True):
        with cpu_ops.enabled(on):
            rates[on].append(_steady(run_ours(args, bundle, ListSource(rows))["history"], warmup))
    on, off = float(np.mean(rates[True])), float(np.mean(rates[False]))
    results.update(
        cpu_ops_tokens_s=round(on, 1),
        no_cpu_ops_tokens_s=round(off, 1),
        cpu_ops_ratio=round(on / off, 3),
        cpu_ops_runs={"on": [round(r, 1) for r in rates[True]], "off": [round(r, 1) for r in rates[False]]},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument(
        "--shape", default=None, help="random-weight llama shape instead of --model (e.g. llama-3.2-1b)"
    )
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files for --shape (default: SmolLM2's)")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--max-words", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--storage", choices=["s3", "file"], default="s3")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument(
        "--window", type=int, default=None, help="attention_window (longest sample) for packed rows"
    )
    ap.add_argument("--additive-mask", action="store_true")
    ap.add_argument("--peft", action="store_true")
    ap.add_argument("--qlora", action="store_true", help="quantize the base to 4 bits on load (QLoRA)")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument(
        "--runs", choices=["abba", "ram"], default="abba", help="ram: one RAM-fed run, no stream_vs_ram"
    )
    ap.add_argument("--mlx-lm-iters", type=int, default=40)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead (0: inline)")
    ap.add_argument(
        "--cpu-ops-ratio",
        action="store_true",
        help="CPU: also train with streamtune.cpu_ops off (ABBA) and report on / off tokens/s",
    )
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (GIL)")
    opts = ap.parse_args()

    if opts.switch_interval:
        sys.setswitchinterval(opts.switch_interval)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    atexit.register(shutil.rmtree, tmp, True)  # models of several GB: never leave them behind
    model_ref = opts.model
    if opts.shape:
        from streamtune.train.synthetic import write_random_model

        model_ref = write_random_model(
            os.path.join(tmp, "model"),
            opts.shape,
            dtype=opts.dtype or "float32",
            tokenizer_dir=opts.tokenizer_dir,
        )
    rows = make_rows(opts.rows, 0, opts.max_words)
    server, storage_options = None, None
    if opts.storage == "s3":
        from streamtune.testing.s3server import start_local_s3

        server = start_local_s3()
        url = server.create_bucket("bench-train") + "/features"
        storage_options = server.storage_options
    else:
        url = "file://" + os.path.join(tmp, "features")
    write_shards(rows, url, storage_options)

    compile_flag = {"auto": None, "on": True, "off": False}[opts.compile]
    args = TrainArgs(
        model=model_ref,
        adapter_path=os.path.join(tmp, "adapters"),
        num_layers=-1,
        rank=opts.rank,
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        iters=opts.iters,
        lr=1e-5,
        compile=compile_flag,
        dtype=opts.dtype,
        attention_window=opts.window,
        additive_mask=opts.additive_mask,
        prefetch=opts.prefetch,
        qlora=opts.qlora,
        grad_checkpoint=opts.grad_checkpoint,
        save_every=0,
    )
    bundle = setup_model(args)
    results: dict = {
        "model": opts.shape or opts.model,
        "batch": [opts.batch_size, opts.seq_len],
        "qlora": opts.qlora,
        "grad_checkpoint": opts.grad_checkpoint,
    }
    from streamtune.train.data import ListSource

    # ABBA order, so drift over the runs (clocks, caches, allocator state) weighs on both sides alike.
    ram = run_ours(args, bundle, ListSource(rows))
    ram_tps = _steady(ram["history"], opts.warmup)
    results.update(
        tokens_s=round(ram_tps, 1),
        pad_fraction=round(float(np.mean([h["pad_fraction"] for h in ram["history"]])), 3),
        packed=ram["packed"],
    )
    if opts.cpu_ops_ratio:
        _cpu_ops_ratio(results, args, bundle, rows, ram, opts.warmup)
    if opts.runs == "abba":
        _stream_vs_ram(results, opts, args, bundle, rows, ram, url, storage_options)
        ram_tps = results["tokens_s"]
    if not opts.skip_mlx_lm:
        mlx_lm = run_mlx_lm(bundle, rows, opts)
        results.update(
            mlx_lm_tokens_s=round(mlx_lm["steady"], 1),
            ratio_mlx_lm=round(ram_tps / mlx_lm["steady"], 3),
            mlx_lm_tokens_s_with_compiles=round(mlx_lm["all_steps"], 1),
            mlx_lm_steady_steps=mlx_lm["steady_steps"],
            mlx_lm_shapes=mlx_lm["shapes"],
            mlx_lm_pad_fraction=round(mlx_lm["pad_fraction"], 3),
        )
    results["peak_mem_mb"] = round(ram["peak_mem_mb"], 1)
    if opts.peft:
        del bundle
        mx.clear_cache()
        peft = run_peft(model_ref, rows, opts)
        best = max(peft.values())
        results.update(
            peft_tokens_s=round(best, 1),
            peft_padded_tokens_s=round(peft["padded"], 1),
            peft_full_rows_tokens_s=round(peft["full_rows"], 1),
            ratio_peft=round(ram_tps / best, 3),
        )
    results["device"] = str(mx.default_device())
    if server is not None:
        server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
