"""llama.cpp tokenizer metadata (`tokenizer.*` keys) for a GGUF model file: copied from a GGUF base, or built
from a byte-level BPE `tokenizer.json` whose pre-tokenizer llama.cpp knows by name."""

from __future__ import annotations

import json
import os

# pre-tokenizer of a byte-level BPE tokenizer.json -> llama.cpp's `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
PRE_TOKENIZERS = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False, False)): "qwen2",
}


def tokenizer_kv_from_gguf(path: str) -> list[tuple]:
    """Every `tokenizer.*` key of a GGUF file, with its exact GGUF types (to copy into another file)."""
    from gguf import GGUFReader, GGUFValueType

    out = []
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            out.append((key, field.contents(), field.types[0], sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{path} has no tokenizer (tokenizer.ggml.tokens)")
    return out


def tokenizer_kv_from_folder(folder: str) -> list[tuple]:
    """llama.cpp tokenizer metadata for a byte-level BPE `tokenizer.json` (GPT-2 style, as SmolLM2, Llama 3,
    Qwen2 use), with special token ids and the chat template from tokenizer_config.json."""
    from gguf import GGUFValueType as T

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer.json in {folder}: GGUF export needs the base's tokenizer")
    with open(path) as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"{path} is not a byte-level BPE tokenizer; this GGUF export writes only those "
            "(convert the fused-mlx folder with llama.cpp's convert_hf_to_gguf.py instead)"
        )
    pre = _pre_name(spec.get("pre_tokenizer"), path)
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [5] * size  # 5: unused
    for text, idx in vocab.items():
        tokens[idx] = text
        token = added.get(text)
        types[idx] = 1 if token is None else (3 if token.get("special") else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", pre, T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    return kv + _special_kv(folder, vocab, spec)


def _pre_name(pre: dict | None, path: str) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    signature = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            signature.append((kind, bool(step.get("add_prefix_space")), bool(step.get("use_regex", True))))
        elif kind == "Digits":
            signature.append((kind, bool(step.get("individual_digits"))))
        elif kind == "Split":
            signature.append((kind, (step.get("pattern") or {}).get("Regex")))
        else:
            signature.append((kind,))
    name = PRE_TOKENIZERS.get(tuple(signature))
    if name is None:
        raise ValueError(
            f"{path}: pre-tokenizer {[s[0] for s in signature]} has no known llama.cpp equivalent "
            f"(known: {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently"
        )
    return name


def _special_kv(folder: str, vocab: dict[str, int], spec: dict) -> list[tuple]:
    from gguf import GGUFValueType as T

    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    kv = []
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token = cfg.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            kv.append((f"tokenizer.ggml.{key}_token_id", vocab[token], T.UINT32, None))
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:  # transformers 5 leaves it to tokenizer.json's post-processor
        single = json.dumps(((spec.get("post_processor") or {}).get("single")) or [])
        add_bos = cfg.get("bos_token") is not None and json.dumps(cfg.get("bos_token")) in single
    kv.append(("tokenizer.ggml.add_bos_token", bool(add_bos), T.BOOL, None))
    template = cfg.get("chat_template")
    if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        template = open(os.path.join(folder, "chat_template.jinja")).read()
    if isinstance(template, str):
        kv.append(("tokenizer.chat_template", template, T.STRING, None))
    return kv
