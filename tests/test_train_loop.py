"""The loop's options on a tiny random model: DoRA, full fine-tuning, held-out eval, epochs, accumulation,
gradient checkpointing, unpacked fallback."""

import json

import mlx.core as mx  # noqa: I001
import pytest

import streamtune  # noqa: F401
from streamtune.train.data import ListSource
from streamtune.train.synthetic import write_random_model
from streamtune.train.trainer import TrainArgs, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), "tiny", seed=4)


def rows(n=20):
    return [
        {"sample_id": f"s{i}", "transcript": "tick " * (1 + i % 6), "tags": ["t"], "text": f"answer {i % 4}"}
        for i in range(n)
    ]


def test_dora_with_held_out_eval_and_epoch_limit(tiny, tmp_path):
    steps = []
    args = TrainArgs(
        model=tiny,
        adapter_path=str(tmp_path / "dora"),
        fine_tune_type="dora",
        num_layers=-1,
        iters=50,
        epochs=2,
        batch_size=2,
        seq_len=128,
        lr=2e-3,
        val_fraction=0.25,
        eval_every=2,
    )
    res = train(args, ListSource(rows()), on_step=steps.append)
    assert res["steps"] < 50, "stops after two epochs"
    assert 0 < res["samples"] < 2 * 20, "held-out rows are never trained on"
    assert res["val_loss"] is not None and any("val_loss" in m for m in steps)
    assert res["loss_last"] < res["loss_first"]
    assert all(m["tokens"] > 0 and 0 <= m["pad_fraction"] < 1 and m["peak_mem_mb"] > 0 for m in steps)
    # the first step always meets a new shape; a packed batch has at most 8 shapes, so later ones repeat
    assert steps[0]["new_shape"] and 1 <= sum(m["new_shape"] for m in steps) <= 8
    assert any(not m["new_shape"] for m in steps) and res["tokens_per_s"] > 0
    names = mx.load(str(tmp_path / "dora" / "adapters.safetensors")).keys()
    assert any(n.endswith(".m") for n in names), "DoRA magnitudes saved"
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"


def test_full_finetune_with_accumulation_and_checkpointing(tiny, tmp_path):
    args = TrainArgs(
        model=tiny,
        adapter_path=str(tmp_path / "full"),
        fine_tune_type="full",
        iters=3,
        batch_size=2,
        grad_accum=2,
        grad_checkpoint=True,
        seq_len=96,
        lr=1e-3,
    )
    res = train(args, rows())
    assert res["steps"] == 3 and res["samples"] > 0
    saved = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    assert "model.embed_tokens.weight" in saved


def test_unpacked_fallback_matches_packed_first_loss(tiny, tmp_path):
    """One sample per row (architectures without a packed forward) starts from the same loss when every
    row holds one sample anyway."""
    data = [{"transcript": "x " * 12, "text": f"reply {i}"} for i in range(4)]
    common = dict(model=tiny, iters=1, batch_size=2, seq_len=64, lr=1e-4)
    packed = train(TrainArgs(adapter_path=str(tmp_path / "p"), **common), data)
    unpacked = train(TrainArgs(adapter_path=str(tmp_path / "u"), packing=False, **common), data)
    assert not unpacked["packed"] and packed["packed"]
    assert unpacked["loss_first"] == pytest.approx(packed["loss_first"], rel=1e-5)


def test_empty_or_unusable_dataset_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="no trainable rows"):
        train(
            TrainArgs(model=tiny, adapter_path=str(tmp_path / "e"), iters=2), [{"transcript": "no caption"}]
        )
