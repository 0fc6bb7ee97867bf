"""Ollama folders: the Modelfile's lines, its Go template against the model's Jinja chat template, the files
it points at, and llama.cpp (Ollama's engine) running them (marker `llamacpp`)."""

import os
import re

import pytest
from export_fixtures import llama_cpp_logits, mlx_logits, prompt_ids, rel, tiny_model, trained

from streamtune.export import export_adapter
from streamtune.export.ollama import modelfile
from streamtune.train.models import load_base


def directives(text: str) -> list[tuple[str, str]]:
    """(command, argument) per Modelfile instruction; triple-quoted arguments may span lines."""
    found = re.findall(r'^(\w+) (?:"""([\s\S]*?)"""|([^\n]*))$', text, re.M)
    return [(command, quoted or plain) for command, quoted, plain in found]


def render_go(template: str, system: str, prompt: str) -> str:
    """The classic Ollama template subset the export writes: {{ if .X }}…{{ end }} and {{ .X }}."""
    values = {"System": system, "Prompt": prompt, "Response": ""}
    text = re.sub(
        r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}",
        lambda m: m[2] if values[m[1]] else "",
        template,
        flags=re.S,
    )
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m[1]], text)


def test_fused_ollama_folder(tmp_path):
    base, adapter = tiny_model(), trained("lora")
    out = tmp_path / "ollama"
    summary = export_adapter(adapter, base, "ollama", str(out))
    assert sorted(os.listdir(out)) == ["Modelfile", "model.gguf"] == summary["files"]
    assert summary["create"] == f"ollama create NAME -f {out}/Modelfile"
    found = directives((out / "Modelfile").read_text())
    commands = [c for c, _ in found]
    assert commands[:4] == ["FROM", "TEMPLATE", "SYSTEM", "PARAMETER"] and "ADAPTER" not in commands
    args = dict(found[:3])
    assert args["FROM"] == "./model.gguf" and (out / args["FROM"]).is_file()
    stops = [a for c, a in found if c == "PARAMETER"]
    assert stops == ['stop "<|im_start|>"', 'stop "<|im_end|>"']
    # the Go template gives the prompt the model was trained with (its Jinja chat template)
    _, tokenizer, _ = load_base(base)
    for system in ("Be brief.", args["SYSTEM"]):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi there"}]
        jinja = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert render_go(args["TEMPLATE"], system, "Hi there").startswith(jinja)
    # no system message: Jinja inserts SmolLM2's default, which the Modelfile's SYSTEM carries
    jinja = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert render_go(args["TEMPLATE"], args["SYSTEM"], "Hi").startswith(jinja)
    assert args["SYSTEM"].startswith("You are a helpful AI assistant")


def test_adapter_mode_ollama_folder(tmp_path):
    out = tmp_path / "ollama"
    export_adapter(trained("lora"), tiny_model(), "ollama", str(out), ollama_mode="adapter")
    found = dict(directives((out / "Modelfile").read_text()))
    assert found["FROM"] == "./base.gguf" and found["ADAPTER"] == "./adapter.gguf"
    assert (out / "base.gguf").is_file() and (out / "adapter.gguf").is_file()


def test_adapter_mode_refuses_dora_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="DoRA magnitudes have no llama.cpp LoRA form"):
        export_adapter(trained("dora"), tiny_model(), "ollama", str(tmp_path / "o"), ollama_mode="adapter")
    assert os.listdir(tmp_path) == []


def test_unknown_chat_template_leaves_template_to_ollama():
    from gguf import GGUFValueType as T

    kv = [
        ("tokenizer.chat_template", "{{ messages }}", T.STRING, None),
        ("tokenizer.ggml.tokens", ["a", "</x>"], T.ARRAY, T.STRING),
    ]
    kv.append(("tokenizer.ggml.eos_token_id", 1, T.UINT32, None))
    text, notes = modelfile(kv, "model.gguf")
    assert text == 'FROM ./model.gguf\nPARAMETER stop "</x>"\n' and "no TEMPLATE" in notes[0]


@pytest.mark.llamacpp
@pytest.mark.parametrize("mode", ["fused", "adapter"])
def test_llama_cpp_runs_what_the_modelfile_points_at(mode, tmp_path):
    pytest.importorskip("llama_cpp")
    base, adapter = tiny_model(), trained("lora")
    out = tmp_path / "ollama"
    export_adapter(adapter, base, "ollama", str(out), ollama_mode=mode, dtype="f32")
    found = dict(directives((out / "Modelfile").read_text()))
    lora = str(out / found["ADAPTER"]) if "ADAPTER" in found else None
    ids = prompt_ids(base)
    got, _ = llama_cpp_logits(str(out / found["FROM"]), ids, lora)
    assert rel(got, mlx_logits(base, adapter, ids)) < 1e-4
