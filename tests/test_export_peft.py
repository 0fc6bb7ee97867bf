"""PEFT export checked by PyTorch + peft on the same tokens (an implementation that shares no code with
MLX), the PEFT -> mlx-lm import, and warm starts from a PEFT folder."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from export_fixtures import ROOT, mlx_logits, prompt_ids, rel, tiny_model, trained

from streamtune.export import export_adapter, read_peft_adapter
from streamtune.train import adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def peft_logits(base_folder: str, adapter_folder: str | None, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if adapter_folder:
        model = peft.PeftModel.from_pretrained(model, adapter_folder)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_export_gives_the_mlx_logits_in_pytorch(kind, tmp_path):
    base, adapter = tiny_model(), trained(kind)
    out = tmp_path / "peft"
    summary = export_adapter(adapter, base, "peft", str(out))
    ids = prompt_ids(base)
    want, plain = mlx_logits(base, adapter, ids), mlx_logits(base, None, ids)
    assert rel(want, plain) > 0.05, "the trained adapter changes the logits (else any export looks right)"
    assert rel(peft_logits(base, None, ids), plain) < 1e-5, "transformers reads the base like MLX"
    got = peft_logits(base, str(out), ids)
    assert rel(got, want) < 1e-4, f"{kind}: PEFT logits differ by {rel(got, want):.2e}"
    assert summary["lora_alpha"] == 20.0 * 8 and summary["fine_tune_type"] == kind


def test_peft_layout_names_shapes_and_config(tmp_path):
    adapter = trained("dora")
    export_adapter(adapter, tiny_model(), "peft", str(tmp_path / "p"))
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 160.0 and config["use_dora"] is True
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1] and config["base_model_name_or_path"] == tiny_model()
    tensors = mx.load(str(tmp_path / "p" / "adapter_model.safetensors"))
    mlx = mx.load(os.path.join(adapter, "adapters.safetensors"))
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b, m = (mlx[f"model.layers.1.self_attn.q_proj.{k}"] for k in ("lora_a", "lora_b", "m"))
    assert tensors[f"{name}.lora_A.weight"].shape == (8, 64) and a.shape == (64, 8)
    assert mx.array_equal(tensors[f"{name}.lora_A.weight"], a.T)
    assert mx.array_equal(tensors[f"{name}.lora_B.weight"], b.T)
    assert mx.array_equal(tensors[f"{name}.lora_magnitude_vector"], m)
    assert len(tensors) == 3 * 3


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_then_import_gives_identical_tensors(kind, tmp_path):
    adapter = trained(kind)
    export_adapter(adapter, tiny_model(), "peft", str(tmp_path / "p"))
    weights, config = read_peft_adapter(str(tmp_path / "p"))
    original = mx.load(os.path.join(adapter, "adapters.safetensors"))
    assert sorted(weights) == sorted(original)
    assert all(mx.array_equal(weights[k], original[k]) for k in original)
    assert config["fine_tune_type"] == kind
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 20.0
    # adapters.read_weights (TrainArgs.init_adapter) takes the PEFT folder as it is
    read = adapters.read_weights(str(tmp_path / "p"))
    assert all(mx.array_equal(read[k], original[k]) for k in original)


def test_training_can_start_from_a_peft_adapter(tmp_path):
    from export_fixtures import rows

    from streamtune.train.trainer import TrainArgs, train

    adapter = trained("lora")
    export_adapter(adapter, tiny_model(), "peft", str(tmp_path / "p"))
    common = dict(model=tiny_model(), num_layers=-1, iters=1, batch_size=2, seq_len=64, lr=1e-6, warmup=0)
    from_mlx = train(TrainArgs(adapter_path=str(tmp_path / "a"), init_adapter=adapter, **common), rows())
    from_peft = train(
        TrainArgs(adapter_path=str(tmp_path / "b"), init_adapter=str(tmp_path / "p"), **common), rows()
    )
    fresh = train(TrainArgs(adapter_path=str(tmp_path / "c"), **common), rows())
    assert from_peft["loss_first"] == pytest.approx(from_mlx["loss_first"], rel=1e-6)
    assert abs(from_peft["loss_first"] - fresh["loss_first"]) > 1e-3


def test_wrong_base_is_one_clear_error_and_leaves_nothing(tmp_path):
    from streamtune.train.synthetic import write_random_model

    other = write_random_model(os.path.join(ROOT, "wide"), {**_tiny_shape(), "hidden_size": 96})
    out = tmp_path / "p"
    with pytest.raises(ValueError, match=r"adapter does not fit base .*down_proj is 96x128 there"):
        export_adapter(trained("lora"), other, "peft", str(out))
    assert not os.listdir(tmp_path)


def _tiny_shape():
    from streamtune.train.synthetic import SHAPES

    return SHAPES["tiny"]


def test_full_finetune_has_no_peft_form(tmp_path):
    adapter = tmp_path / "full"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "full", "model": tiny_model()})
    )
    mx.save_safetensors(str(adapter / "adapters.safetensors"), {"model.norm.weight": mx.ones((64,))})
    with pytest.raises(ValueError, match="full fine-tune has no adapter form"):
        export_adapter(str(adapter), None, "peft", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_peft_on_real_smollm2(tmp_path, smollm2_folder):
    """SmolLM2-135M (the offline Q4_1 GGUF, dequantized as training does), its base exported as a transformers
    folder: PyTorch + PEFT give the MLX logits."""
    base, adapter = "offline:smollm2", trained("lora", "offline:smollm2")
    note = export_adapter(adapter, base, "peft", str(tmp_path / "unnamed"))["notes"]
    assert "PEFT cannot load" in note[0] and "export-base" in note[0]
    hf = smollm2_folder
    export_adapter(adapter, base, "peft", str(tmp_path / "p"), base_name=hf)
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == hf
    ids = prompt_ids(base)
    want = mlx_logits(base, adapter, ids)
    assert rel(want, mlx_logits(base, None, ids)) > 0.05
    got = peft_logits(hf, str(tmp_path / "p"), ids)
    assert rel(got, want) < 1e-4, f"{rel(got, want):.2e}"
