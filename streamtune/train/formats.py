"""Training text from record rows in the formats mlx-lm reads, with no template to write.

A record row (from a JSONL/CSV/Parquet/Arrow/HF record file: its `sources` holds a `file#row` key, or a
plain dict given straight to the trainer) is recognised by its fields:

- `messages` (chat, multi-turn; optional `tools` passed to the chat template): loss on every assistant turn
  (`assistant_turns: last`: only the final one). The sample carries loss spans instead of a prompt length.
- `prompt` + `completion`: the prompt as the user turn, loss on the completion (mlx-lm's completions format).
- `instruction` + `output` (+ optional `input`): Alpaca, through the shipped `ALPACA_TEMPLATE`.
- `text`: plain text, loss on every token (mlx-lm's text format), for records without audio or images
  (a captioned recording keeps the template, like a media file with a sidecar caption).

Other rows, and every row when the training template is not the default one, go through the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from streamtune.train.data import Template, encode

ALPACA_TEMPLATE = Template(prompt="{meta_instruction}\n\n{meta_input}", completion="{meta_output}")
FORMATS = ("messages", "prompt_completion", "alpaca", "text")
RecordFormat = Literal["auto", "template", "messages", "prompt_completion", "alpaca", "text"]


@dataclass(frozen=True)
class RecordOptions:
    """How record rows become samples: `format` (auto: by their fields) and which assistant turns of a
    chat are learned."""

    format: RecordFormat = "auto"
    assistant_turns: Literal["all", "last"] = "all"


def record_options(args) -> RecordOptions:
    """RecordOptions from TrainArgs."""
    return RecordOptions(args.record_format, args.assistant_turns)


def record_fields(row: dict) -> dict | None:
    """The fields of a record row (its parsed `meta` plus top-level record fields), or None for rows that
    do not come from a record file (media samples keep the template path)."""
    from streamtune.records import is_record_key

    sources = row.get("sources") or []
    top = {k: row[k] for k in ("messages", "tools", "prompt", "completion") if row.get(k) is not None}
    if not (sources and is_record_key(str(sources[0]))) and not top:
        return None
    meta = row.get("meta")
    if isinstance(meta, str) and meta:
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = None
    fields = dict(meta) if isinstance(meta, dict) else {}
    if isinstance(row.get("text"), str):
        fields.setdefault("text", row["text"])
    return fields | top


def detect(fields: dict) -> str | None:
    """The format a record's fields are in, or None (template)."""
    if isinstance(fields.get("messages"), list):
        return "messages"
    if isinstance(fields.get("prompt"), str) and isinstance(fields.get("completion"), str):
        return "prompt_completion"
    if isinstance(fields.get("instruction"), str) and fields.get("output") is not None:
        return "alpaca"
    if isinstance(fields.get("text"), str):
        return "text"
    return None


def _has_media(row: dict) -> bool:
    return any(row.get(k) is not None for k in ("audio", "image", "clip_embedding")) or bool(
        row.get("transcript")
    )


def encode_messages(
    tokenizer, messages: list[dict], max_len: int, *, tools: list | None = None, turns: str = "all"
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a conversation and the [start, stop) token spans of the assistant turns learned.

    The chat template renders every prefix ending before an assistant turn (with the generation prompt)
    and ending after it; the text between is that turn's. Segments are tokenized one by one, as `encode`
    tokenizes prompt and completion, so span edges are exact token boundaries."""
    kw = {"tools": tools} if tools else {}
    learned = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if turns == "last":
        learned = learned[-1:]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        cuts = []
        for i in learned:
            head = tokenizer.apply_chat_template(
                messages[:i], add_generation_prompt=True, tokenize=False, **kw
            )
            done = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
            if not (done.startswith(head) and full.startswith(done)):
                raise ValueError("the chat template does not render earlier turns as a prefix of later ones")
            cuts.append((len(head), len(done)))
    else:  # no chat template: "role: content" lines, an end-of-sequence token after each assistant turn
        eos = tokenizer.eos_token or ""
        full, cuts = "", []
        for i, m in enumerate(messages):
            full += f"{m.get('role')}: "
            start = len(full)
            full += f"{m.get('content') or ''}{eos if m.get('role') == 'assistant' else ''}\n"
            if i in learned:
                cuts.append((start, len(full) - 1))
    ids: list[int] = []
    spans: list[list[int]] = []
    at = 0
    for start, stop in cuts:
        ids += tokenizer.encode(full[at:start], add_special_tokens=False)
        piece = tokenizer.encode(full[start:stop], add_special_tokens=False)
        spans.append([len(ids), len(ids) + len(piece)])
        ids += piece
        at = stop
    ids += tokenizer.encode(full[at:], add_special_tokens=False)
    ids = ids[:max_len]
    return ids, [[a, min(b, len(ids))] for a, b in spans if a < len(ids)]


def encode_record(
    row: dict, tokenizer, *, seq_len: int, template: Template, options: RecordOptions | None = None
):
    """((prompt, completion), (ids, prompt_len or loss spans)) for a record row, None when it has nothing
    to learn, or NotImplemented when the row is not a record (or goes through the template)."""
    from streamtune.train.data import DEFAULT_TEMPLATE, encode_sample

    options = options or RecordOptions()
    fields = record_fields(row)
    if fields is None or options.format == "template":
        return NotImplemented
    fmt = options.format if options.format != "auto" else detect(fields)
    if options.format == "auto" and fmt == "text" and _has_media(row):
        return NotImplemented  # an audio/image record with a caption: the template, like media files
    if fmt is None or (options.format == "auto" and template != DEFAULT_TEMPLATE):
        return NotImplemented
    max_len = seq_len + 1
    if fmt == "alpaca":
        return encode_sample(
            {"meta": json.dumps(fields)}, tokenizer, seq_len=seq_len, template=ALPACA_TEMPLATE
        )
    if fmt == "text":
        text = str(fields.get("text") or "").strip()
        if not text:
            return None
        ids = tokenizer.encode(text)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_len]
        return (("", text), (ids, 0)) if len(ids) > 1 else None
    if fmt == "prompt_completion":
        prompt, completion = str(fields.get("prompt") or ""), str(fields.get("completion") or "")
        if not completion.strip():
            return None
        ids, prompt_len = encode(tokenizer, prompt, completion, max_len, system=template.system)
        return ((prompt, completion), (ids, prompt_len)) if len(ids) > max(prompt_len, 1) else None
    messages = [m for m in fields.get("messages") or [] if isinstance(m, dict)]
    if not any(m.get("role") == "assistant" and m.get("content") for m in messages):
        return None
    tools = fields.get("tools") if isinstance(fields.get("tools"), list) else None
    ids, spans = encode_messages(tokenizer, messages, max_len, tools=tools, turns=options.assistant_turns)
    if not any(b > max(a, 1) for a, b in spans):
        return None
    pair = (messages[0].get("content") or "", messages[-1].get("content") or "")
    return pair, (ids, spans)
