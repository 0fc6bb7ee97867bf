"""How close is each hand-off format to the MLX model it came from, on a real model?

Trains a LoRA and a DoRA adapter for a few steps on MODEL (default offline:smollm2: top 4 blocks, every
projection), exports them to every format, and runs the same chat prompt through MLX (float32, the adapter
as trained) and through independent implementations: PyTorch + PEFT on the base written as a transformers
folder, llama.cpp (llama-cpp-python, if installed) on the GGUF adapter + the base GGUF and on the fused GGUFs,
and the project's own GGUF reader. Reports the largest logit difference relative to the largest MLX logit
over the prompt, and how many of N greedy tokens agree before the first difference.

    python -m bench.export [--model offline:smollm2] [--new-tokens 16]

Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
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

from streamtune.export import export_adapter  # noqa: E402
from streamtune.export.fused import folder_to_gguf  # noqa: E402
from streamtune.train.generate import load_with_adapter  # noqa: E402
from streamtune.train.models import export_base, load_base, resolve  # noqa: E402
from streamtune.train.trainer import TrainArgs, train  # noqa: E402

PROMPT = "What is the capital of France? Answer in one sentence."


def rows(n: int = 16) -> list[dict]:
    return [{"transcript": "tick " * (1 + i % 5), "tags": ["t"], "text": f"answer {i % 4}"} for i in range(n)]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def mlx_run(net, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(net)
    logits = net(mx.array([ids]), cache=cache)[0].astype(mx.float32)
    prompt = np.array(logits)
    out = [int(mx.argmax(logits[-1]))]
    while len(out) < n:
        out.append(int(mx.argmax(net(mx.array([[out[-1]]]), cache=cache)[0, -1])))
    return prompt, out


def llama_cpp_run(
    model: str, ids: list[int], n: int, lora: str | None = None
) -> tuple[np.ndarray, list[int]]:
    from llama_cpp import Llama

    # float32 KV cache (type 0): llama.cpp's default f16 cache alone moves SmolLM2's logits by 1.4e-3
    llm = Llama(
        model_path=model,
        lora_path=lora,
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )
    try:
        llm.eval(ids)
        prompt = np.array(llm.scores[: len(ids)])
        out = [int(np.argmax(prompt[-1]))]
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return prompt, out
    finally:
        llm.close()


def peft_logits(base_dir: str, adapter_dir: str, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def compare(want: tuple[np.ndarray, list[int]], got: tuple[np.ndarray, list[int]]) -> dict:
    return {
        "rel": float(f"{rel(got[0], want[0]):.2e}"),
        "same_greedy_tokens": next(
            (i for i, (a, b) in enumerate(zip(got[1], want[1], strict=True)) if a != b), len(want[1])
        ),
    }


def timed_export(adapter: str, base: str, to: str, out: str, **kw) -> float:
    start = time.perf_counter()
    export_adapter(adapter, base, to, out, **kw)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:smollm2")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    work = tempfile.mkdtemp(prefix="bench-export-")
    n = args.new_tokens
    try:
        _, tokenizer, _ = load_base(args.model)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        base_net, _, _ = load_with_adapter(args.model, None, dtype="float32")
        plain = mlx_run(base_net, ids, n)
        hf = export_base(args.model, os.path.join(work, "hf"))
        result = {"model": args.model, "prompt_tokens": len(ids), "new_tokens": n, "llama_cpp": have_llama}
        for kind in ("lora", "dora"):
            adapter = os.path.join(work, kind)
            train(
                TrainArgs(model=args.model, adapter_path=adapter, fine_tune_type=kind, num_layers=4, iters=4,
                          batch_size=2, seq_len=64, lr=1e-3, warmup=0),
                rows(),
            )  # fmt: skip
            net, _, _ = load_with_adapter(args.model, adapter, dtype="float32")
            want = mlx_run(net, ids, n)
            r = {
                "adapter_effect_rel": float(f"{rel(want[0], plain[0]):.2e}"),
                "mlx_text": tokenizer.decode(want[1]),
            }
            seconds = {
                "peft": timed_export(
                    adapter, args.model, "peft", os.path.join(work, f"{kind}-peft"), base_name=hf
                )
            }
            r["peft"] = {
                "rel": float(f"{rel(peft_logits(hf, os.path.join(work, f'{kind}-peft'), ids), want[0]):.2e}")
            }
            seconds["fused-mlx"] = timed_export(
                adapter, args.model, "fused-mlx", os.path.join(work, f"{kind}-fused")
            )
            fused = load_with_adapter(os.path.join(work, f"{kind}-fused"), None, dtype="float32")[0]
            r["fused-mlx"] = compare(want, mlx_run(fused, ids, n))
            if kind == "lora" and resolve(args.model).endswith(".gguf"):
                path = os.path.join(work, "adapter.gguf")
                seconds["gguf-adapter"] = timed_export(adapter, args.model, "gguf-adapter", path)
                if have_llama:
                    f32 = os.path.join(work, "base-f32.gguf")
                    folder_to_gguf(hf, f32, dtype="f32", tokenizer_from=resolve(args.model), name="base")
                    r["gguf-adapter + f32 base GGUF"] = compare(want, llama_cpp_run(f32, ids, n, path))
                    r["gguf-adapter + original GGUF"] = compare(
                        want, llama_cpp_run(resolve(args.model), ids, n, path)
                    )
                    r["original GGUF alone vs MLX base"] = compare(
                        plain, llama_cpp_run(resolve(args.model), ids, n)
                    )
                    os.remove(f32)
            for dtype in ("f32", "f16", "bf16", "q8_0"):
                path = os.path.join(work, f"{kind}-{dtype}.gguf")
                seconds[f"fused-gguf {dtype}"] = timed_export(
                    adapter, args.model, "fused-gguf", path, dtype=dtype
                )
                entry = {"mb": round(os.path.getsize(path) / 2**20)}
                reread = load_base(path, dequantize=True, dtype="float32")[0]
                entry["project_reader"] = compare(want, mlx_run(reread, ids, n))
                if have_llama:
                    entry["llama.cpp"] = compare(want, llama_cpp_run(path, ids, n))
                r[f"fused-gguf {dtype}"] = entry
                os.remove(path)
            r["export_seconds"] = seconds
            result[kind] = r
            print(json.dumps({kind: r}), file=sys.stderr)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
