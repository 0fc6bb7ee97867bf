"""An Ollama model folder: GGUF file(s) and a Modelfile for `ollama create NAME -f Modelfile`.

Ollama's TEMPLATE is a Go template, not the Jinja chat template in the GGUF: for the chat formats known here
(ChatML, Llama 3, Mistral [INST]) the Modelfile gets the equivalent Go template, plus the default system
prompt the Jinja template inserts, if any; for others it leaves TEMPLATE out and Ollama falls back to the
template it detects from the GGUF's metadata."""

from __future__ import annotations

TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": (
        "<|start_header_id|>",
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "mistral": (
        "[INST]",
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}</s>",
        ("[INST]", "[/INST]", "</s>"),
    ),
}


def chat_format(template: str | None) -> str | None:
    for name, (marker, _, _) in TEMPLATES.items():
        if template and marker in template:
            return name
    return None


def default_system(template: str | None, special: dict[str, str]) -> str | None:
    """The system prompt the Jinja chat template adds when the conversation has none (SmolLM2 does)."""
    if chat_format(template) != "chatml":
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=[{"role": "user", "content": "\x00"}], add_generation_prompt=False, **special
    )
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def modelfile(
    tokenizer_kv: list[tuple], model_file: str, adapter_file: str | None = None
) -> tuple[str, list]:
    """(Modelfile text, notes) for a GGUF model `model_file` (+ llama.cpp adapter `adapter_file`), both
    relative to the Modelfile's folder."""
    kv = {k: v for k, v, *_ in tokenizer_kv}
    template = kv.get("tokenizer.chat_template")
    tokens = kv.get("tokenizer.ggml.tokens") or []
    eos_id = kv.get("tokenizer.ggml.eos_token_id")
    eos = tokens[int(eos_id)] if eos_id is not None and int(eos_id) < len(tokens) else None
    lines, notes = [f"FROM ./{model_file}"], []
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    found = chat_format(template)
    stops = list(TEMPLATES[found][2]) if found else []
    if eos and eos not in stops:
        stops.append(eos)
    if found:
        lines.append(f'TEMPLATE """{TEMPLATES[found][1]}"""')
        system = default_system(template, {"bos_token": tokens[0] if tokens else ""})
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        notes.append("chat template not recognised: no TEMPLATE line; Ollama uses the GGUF's own metadata")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", notes
