"""Real SmolLM2 weights through the real loading paths: GGUF, export to mlx-lm, QLoRA, adapters in mlx-lm."""

import json

import mlx.core as mx  # noqa: I001
import pytest

import streamtune  # noqa: F401
from streamtune.train.generate import complete, fuse, load_with_adapter
from streamtune.train.models import export_base, load_base, offline_smollm2_gguf
from streamtune.train.trainer import TrainArgs, train

QUESTION = "What is the capital of France? Answer in one sentence."


def test_offline_gguf_path_and_errors(tmp_path):
    assert offline_smollm2_gguf().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(FileNotFoundError):
        load_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base(str(tmp_path))
    with pytest.raises(ValueError, match="offline"):
        load_base("offline:nope")


@pytest.mark.slow
def test_gguf_quantized_and_dequantized_agree_and_answer():
    q_model, tokenizer, q_cfg = load_base("offline:smollm2")
    f_model, _, f_cfg = load_base("offline:smollm2", dequantize=True, dtype="float32")
    assert q_cfg["quantization"]["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert q_cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    assert "quantization" not in f_cfg
    ids = mx.array(tokenizer.encode("The quick brown fox jumps over the lazy dog"))[None]
    q_logits, f_logits = q_model(ids), f_model(ids)
    # same weights, different kernels (quantized matmul vs f32 BLAS): tiny drift, same predictions
    assert mx.abs(q_logits - f_logits).mean().item() < 2e-2
    assert mx.array_equal(q_logits.argmax(-1), f_logits.argmax(-1)).item()
    assert "Paris" in complete(f_model, tokenizer, QUESTION, max_tokens=16)
    # byte-level BPE from GGUF: digits split, special tokens whole
    assert tokenizer.encode("2024<|im_end|>", add_special_tokens=False) == [
        *[tokenizer.convert_tokens_to_ids(d) for d in "2024"],
        2,
    ]


@pytest.mark.slow
def test_export_base_loads_in_mlx_lm(smollm2_folder):
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(smollm2_folder)  # export_base("offline:smollm2", ...), once a session
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    assert "Paris" in mlx_lm_generate(model, tokenizer, prompt, max_tokens=16)


@pytest.mark.slow
def test_qlora_on_4bit_base_learns_and_adapter_loads_in_mlx_lm(tmp_path):
    from mlx_lm import load as mlx_lm_load

    rows = [
        {
            "sample_id": f"q{i}",
            "transcript": f"bark number {i % 3}",
            "tags": ["dog"],
            "text": "A dog barks twice.",
        }
        for i in range(6)
    ]
    args = TrainArgs(
        adapter_path=str(tmp_path / "qlora"),
        qlora=True,
        iters=2,  # the loss falls ~10x in one step (2.82 -> 0.28)
        batch_size=1,
        seq_len=64,  # a 4-bit backward on CPU costs in proportion to the tokens: 54 a step, not 108
        num_layers=4,
        lr=1e-3,
        warmup=1,
    )
    res = train(args, rows)
    assert res["loss_last"] < 0.7 * res["loss_first"], res["losses"]
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert config["qlora"] and config["fine_tune_type"] == "lora" and config["num_layers"] == 4

    ours, tokenizer, _ = load_with_adapter("offline:smollm2", args.adapter_path)
    assert isinstance(ours.layers[-1].self_attn.q_proj.linear, __import__("mlx.nn").nn.QuantizedLinear)
    base = export_base("offline:smollm2", str(tmp_path / "base4"), dequantize=False)
    theirs, _ = mlx_lm_load(base, adapter_path=args.adapter_path)
    ids = mx.array(tokenizer.encode("Describe this recording."))[None]
    assert mx.allclose(ours(ids), theirs(ids), atol=1e-3, rtol=1e-3).item()

    fused = fuse("offline:smollm2", args.adapter_path, str(tmp_path / "fused"))
    standalone, _ = mlx_lm_load(fused)
    assert mx.allclose(standalone(ids), ours(ids), atol=5e-2, rtol=5e-2).item()


@pytest.mark.slow
def test_gguf_package_reader_matches_mlx_reader():
    """The fallback for types MLX can't read (K-quants): same tensors and metadata via the `gguf` package."""
    from streamtune.train import gguf

    path = offline_smollm2_gguf()
    slow, meta = gguf._read_with_gguf_package(path)
    fast, fast_meta = gguf.read_gguf(path)
    fast = gguf.dequantize_all(fast, mx.float32)
    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight", "output_norm.weight"):
        assert slow[name].shape == fast[name].shape
        assert mx.abs(slow[name] - fast[name]).max().item() < 5e-3, name
    assert gguf.model_config(meta) == gguf.model_config(fast_meta)
    assert meta["tokenizer.ggml.tokens"][:3] == fast_meta["tokenizer.ggml.tokens"][:3]
