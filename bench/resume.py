"""How exactly does a resumed run reproduce an uninterrupted one on this device?

Three runs on the same model, data and seed, each loading the base afresh:
  full      uninterrupted, checkpoints every --save-every steps
  again     uninterrupted again: the device's own run-to-run spread (0 where kernels are deterministic)
  resumed   crashes right after the checkpoint at --crash-at, then a new train() call resumes from it

    python bench/resume.py                                        # CPU, tiny model
    python bench/resume.py --shape llama-3.2-1b --tokenizer-dir DIR --dtype bfloat16 --seq-len 2048

Last stdout line: JSON with the largest adapter and loss differences of `again` and `resumed` against `full`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import streamtune  # noqa: E402,F401,I001  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from bench.train import make_rows, write_shards  # noqa: E402
from streamtune import CloudStreamingDataset  # noqa: E402
from streamtune.train.synthetic import write_random_model  # noqa: E402
from streamtune.train.trainer import TrainArgs, train  # noqa: E402


class Crash(Exception):
    pass


def adapter_diff(a_dir: str, b_dir: str) -> tuple[float, bool]:
    a = mx.load(os.path.join(a_dir, "adapters.safetensors"))
    b = mx.load(os.path.join(b_dir, "adapters.safetensors"))
    assert a.keys() == b.keys() and a
    worst = max(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)).max().item() for k in a)
    return worst, all(mx.array_equal(a[k], b[k]).item() for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--max-words", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--crash-at", type=int, default=4)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    opts = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-resume-")
    atexit.register(shutil.rmtree, tmp, True)  # models of several GB: never leave them behind
    model = write_random_model(
        os.path.join(tmp, "model"),
        opts.shape,
        dtype=opts.dtype or "float32",
        tokenizer_dir=opts.tokenizer_dir,
    )
    features = "file://" + os.path.join(tmp, "features")
    write_shards(make_rows(opts.rows, 0, opts.max_words), features, None)

    def run(name: str, *, resume: bool = False, crash_at: int | None = None) -> dict:
        args = TrainArgs(
            model=model,
            adapter_path=os.path.join(tmp, name),
            dtype=opts.dtype,
            num_layers=-1,
            batch_size=opts.batch_size,
            seq_len=opts.seq_len,
            iters=opts.iters,
            lr=1e-4,
            warmup=2,
            dropout=0.1,
            seed=7,
            save_every=opts.save_every,
            checkpoint_url="file://" + os.path.join(tmp, "ckpt-" + name.split("-")[0]),
            resume=resume,
            compile={"auto": None, "on": True, "off": False}[opts.compile],
        )

        def on_step(m: dict) -> None:
            if crash_at is not None and m["step"] == crash_at:
                raise Crash

        data = CloudStreamingDataset(features, shuffle=True, seed=5)
        try:
            return train(args, data, on_step=on_step)
        finally:
            mx.clear_cache()

    full = run("full")
    again = run("again")
    try:
        run("resumed-1", crash_at=opts.crash_at)
        raise SystemExit("the crash did not happen")
    except Crash:
        pass
    resumed = run("resumed-2", resume=True)
    again_diff, again_same = adapter_diff(os.path.join(tmp, "full"), os.path.join(tmp, "again"))
    resumed_diff, resumed_same = adapter_diff(os.path.join(tmp, "full"), os.path.join(tmp, "resumed-2"))
    scale = max(
        mx.abs(v.astype(mx.float32)).max().item()
        for v in mx.load(os.path.join(tmp, "full", "adapters.safetensors")).values()
    )
    print(
        json.dumps(
            {
                "shape": opts.shape,
                "device": str(mx.default_device()),
                "dtype": opts.dtype or "float32",
                "compile": opts.compile,
                "steps": resumed["steps"],
                "crashed_after_step": opts.crash_at,
                "again_bitwise": again_same,
                "again_max_abs_diff": again_diff,
                "resumed_bitwise": resumed_same,
                "resumed_max_abs_diff": resumed_diff,
                "adapter_max_abs": scale,
                "again_max_loss_diff": max(
                    abs(a - b) for a, b in zip(full["losses"], again["losses"], strict=True)
                ),
                "resumed_max_loss_diff": max(
                    abs(a - b) for a, b in zip(full["losses"], resumed["losses"], strict=True)
                ),
                "losses": [round(v, 5) for v in full["losses"]],
            }
        )
    )


if __name__ == "__main__":
    main()
