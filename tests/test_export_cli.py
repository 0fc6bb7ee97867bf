"""`streamtune export`: a JSON summary as the last line; bad input is one line naming the problem and leaves
nothing at --out; fused-mlx of a QLoRA adapter; a multimodal adapter folder exports its text part."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from export_fixtures import mlx_logits, prompt_ids, rel, tiny_model, trained
from helpers import cli_in_process

from streamtune.export import export_adapter


def test_export_command_prints_a_json_summary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "peft"
    adapter = trained("lora")
    result = cli_in_process(
        monkeypatch, capsys, "export", adapter, "--to", "peft", "--out", str(out)
    )  # base from adapter_config
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["format"] == "peft" and summary["lora_alpha"] == 160.0 and summary["base"] == tiny_model()
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


def _no_tokenizer_base(tmp_path) -> str:
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model(), name), folder)
    return str(folder)


def _wide_base() -> str:
    from export_fixtures import ROOT

    from streamtune.train.synthetic import SHAPES, write_random_model

    path = os.path.join(ROOT, "wide-cli")
    return path if os.path.exists(path) else write_random_model(path, {**SHAPES["tiny"], "hidden_size": 96})


@pytest.mark.parametrize(
    "case, reason",
    [
        ("wrong-base", "adapter does not fit base"),
        ("no-tokenizer", "no tokenizer in"),
        ("unknown-format", "unknown export format 'onnx'"),
        ("no-adapter", "no adapters.safetensors in"),
        ("out-exists", "already exists (pass --force"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(case, reason, tmp_path, monkeypatch, capsys):
    adapter, base, to = trained("lora"), tiny_model(), "fused-gguf"
    out = tmp_path / "out" / "model.gguf"
    if case == "wrong-base":
        base = _wide_base()
    elif case == "no-tokenizer":
        base = _no_tokenizer_base(tmp_path)
    elif case == "unknown-format":
        to = "onnx"
    elif case == "no-adapter":
        adapter = str(tmp_path)
    else:
        out.parent.mkdir()
        out.write_text("keep me")
    before = sorted(os.listdir(out.parent)) if out.parent.exists() else []
    result = cli_in_process(
        monkeypatch, capsys, "export", adapter, "--base", base, "--to", to, "--out", str(out)
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in result.stderr, result.stderr
    after = sorted(os.listdir(out.parent)) if out.parent.exists() else []
    assert after == before, "nothing half-written left behind"


def test_fused_mlx_of_a_qlora_adapter_is_dequantized_and_exact(tmp_path):
    base, adapter = tiny_model(), trained("qlora")
    summary = export_adapter(adapter, base, "fused-mlx", str(tmp_path / "fused"))
    assert any("dequantized" in n for n in summary["notes"])
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config
    ids = prompt_ids(base)
    want = mlx_logits(base, adapter, ids)  # the 4-bit base + adapter, as trained
    got = mlx_logits(str(tmp_path / "fused"), None, ids)
    assert rel(got, want) < 1e-5


def test_multimodal_adapter_exports_its_text_part(tmp_path, monkeypatch, capsys):
    mm = tmp_path / "mm"
    shutil.copytree(trained("lora"), mm)
    mx.save_safetensors(str(mm / "projector.safetensors"), {"image.0.weight": mx.zeros((64, 32))})
    (mm / "multimodal.json").write_text(json.dumps({"projector": "mlp", "media": {}}))
    result = cli_in_process(
        monkeypatch, capsys, "export", str(mm), "--to", "fused-mlx", "--out", str(tmp_path / "fused")
    )
    assert result.returncode == 0, result.stderr
    assert "projector.safetensors (the multimodal projector) stays MLX-only" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("MLX-only" in n for n in summary["notes"])
    assert "projector.safetensors" not in os.listdir(tmp_path / "fused")
    ids = prompt_ids(tiny_model())
    got = mlx_logits(str(tmp_path / "fused"), None, ids)
    assert rel(got, mlx_logits(tiny_model(), str(mm), ids)) < 1e-5
    peft = export_adapter(str(mm), None, "peft", str(tmp_path / "peft"))
    assert any("MLX-only" in n for n in peft["notes"])
    assert np.isfinite(got).all()


def test_export_from_an_s3_adapter_folder(bucket, s3opts, tmp_path):
    """An adapter on S3 (a pipeline's adapters/ root with latest.json) exports like a local folder."""
    from streamtune import storage
    from streamtune.train.adapters import publish, upload

    version = f"{bucket}/adapters/v-0001"
    upload(trained("lora"), version, s3opts)
    publish(f"{bucket}/adapters", version, {"step": 6}, s3opts)
    summary = export_adapter(f"{bucket}/adapters", None, "peft", str(tmp_path / "p"), storage_options=s3opts)
    assert summary["base"] == tiny_model() and storage.exists(f"{version}/adapters.safetensors", s3opts)
    local = export_adapter(trained("lora"), None, "peft", str(tmp_path / "q"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "q" / name).read_bytes()
    assert local["modules"] == summary["modules"] == 14
