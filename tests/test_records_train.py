"""Training formats of record rows: multi-turn chat loss masks, prompt/completion, text, Alpaca."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import streamtune  # noqa: F401  (BLAS before mlx)
from streamtune.train.data import (
    DEFAULT_TEMPLATE,
    Packer,
    Template,
    encode,
    encode_sample,
    pack_rows,
    sample_from_json,
    sample_to_json,
)
from streamtune.train.formats import ALPACA_TEMPLATE, RecordOptions, encode_messages

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
CHAT = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from streamtune.train.models import load_base
    from streamtune.train.synthetic import write_random_model

    folder = write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), "tiny", seed=1)
    return load_base(folder, dtype="float32")[1]


def record(fields: dict, key: str = "chat/train.jsonl#7") -> dict:
    """A feature row as decode leaves a record's row: fields in meta, the record key in sources."""
    return {"sample_id": key, "text": fields.get("text"), "meta": json.dumps(fields), "sources": [key]}


def hand_mask(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids, mask = [], []
    for text, learn in pieces:
        toks = tokenizer.encode(text, add_special_tokens=False)
        ids += toks
        mask += [learn] * len(toks)
    return ids, mask


def test_multi_turn_loss_mask_equals_hand_computed_mask(tokenizer):
    ids, mask = hand_mask(
        tokenizer,
        [
            (SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Paris.<|im_end|>\n", True),
            ("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Rome.<|im_end|>\n", True),
        ],
    )
    _, (got_ids, spans) = encode_sample(record({"messages": CHAT}), tokenizer, seq_len=256)
    assert got_ids == ids
    got = np.zeros(len(ids), bool)
    for a, b in spans:
        got[a:b] = True
    assert got.tolist() == mask
    # packed: target j is token j + 1, so the loss mask is the token mask shifted by one
    batch = pack_rows([[(got_ids, spans)]], 256)
    k = len(ids) - 1
    assert batch.loss_mask[0, :k].astype(bool).tolist() == mask[1:]
    assert not batch.loss_mask[0, k:].any()
    # only the last assistant turn
    _, (_, last) = encode_sample(
        record({"messages": CHAT}), tokenizer, seq_len=256, records=RecordOptions(assistant_turns="last")
    )
    assert last == spans[-1:]
    # truncation keeps the spans inside the ids; a chat cut before any answer has nothing to learn
    _, (cut_ids, cut) = encode_sample(record({"messages": CHAT}), tokenizer, seq_len=spans[1][0] + 1)
    assert len(cut_ids) == spans[1][0] + 2 and cut == [spans[0], [spans[1][0], spans[1][0] + 2]]
    assert encode_sample(record({"messages": CHAT}), tokenizer, seq_len=spans[0][0] - 1) is None


def test_tools_reach_the_chat_template(tokenizer):
    hf = copy.deepcopy(tokenizer._tokenizer)
    hf.chat_template = (
        "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    ids, spans = encode_messages(hf, CHAT[:2], 512, tools=tools)
    assert hf.decode(ids).startswith('TOOLS [{"type": "function"')
    assert [hf.decode(ids[a:b]) for a, b in spans] == ["Paris.</s>\n"]


def test_prompt_completion_text_and_alpaca_records(tokenizer):
    pc = encode_sample(record({"prompt": "Q?", "completion": "A."}), tokenizer, seq_len=128)
    assert pc[1] == encode(tokenizer, "Q?", "A.", 129)
    text = encode_sample(record({"text": "Just some words."}), tokenizer, seq_len=128)
    assert text[1] == (tokenizer.encode("Just some words.") + [tokenizer.eos_token_id], 0)
    alpaca = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
    (prompt, completion), sample = encode_sample(record(alpaca), tokenizer, seq_len=128)
    assert (prompt, completion) == ("Add the numbers.\n\n2 3", "5")
    assert sample == encode(tokenizer, prompt, completion, 129)
    no_input = encode_sample(record(alpaca | {"input": ""}), tokenizer, seq_len=128)
    assert no_input[0][0] == "Add the numbers."
    assert ALPACA_TEMPLATE.completion == "{meta_output}"
    # plain dicts in mlx-lm's formats work too (no record key needed)
    assert (
        encode_sample({"messages": CHAT}, tokenizer, seq_len=256)[1][1]
        == encode_sample(record({"messages": CHAT}), tokenizer, seq_len=256)[1][1]
    )


def test_media_samples_and_custom_templates_keep_the_template(tokenizer):
    media_row = {
        "sample_id": "clips/a",
        "text": "a caption",
        "transcript": "hello",
        "sources": ["clips/a.wav"],
    }
    assert encode_sample(media_row, tokenizer, seq_len=128)[0][0].startswith("Describe this recording.")
    asr_record = record({"text": "a caption"}, key="speech/data-00000-of-00001.arrow#3") | {
        "transcript": "hello"
    }
    assert encode_sample(asr_record, tokenizer, seq_len=128)[0][0].startswith("Describe this recording.")
    mine = Template(prompt="Say {meta_prompt}", completion="{meta_completion}!")
    row = record({"prompt": "hi", "completion": "there"})
    assert encode_sample(row, tokenizer, seq_len=128, template=mine)[0] == ("Say hi", "there!")
    forced = encode_sample(row, tokenizer, seq_len=128, records=RecordOptions(format="template"))
    assert forced is None or forced[0][0].startswith("Describe")
    assert DEFAULT_TEMPLATE.completion == "{text}"


def test_spans_survive_the_packer_state(tokenizer):
    samples = [
        encode_sample(record({"messages": CHAT[: 2 + 2 * (i % 2)]}), tokenizer, seq_len=120)[1]
        for i in range(12)
    ]
    assert json.loads(json.dumps(sample_to_json(samples[1])))
    assert sample_from_json(json.loads(json.dumps(sample_to_json(samples[1])))) == samples[1]
    a, b = Packer(2, 120), Packer(2, 120)
    stream = iter(samples)
    first = a.next_batch(lambda: next(stream, None))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = list(stream)
    pull_a, pull_b = iter(rest), iter(rest)
    x, y = a.next_batch(lambda: next(pull_a, None)), b.next_batch(lambda: next(pull_b, None))
    assert first.targets_count > 0
    np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
    np.testing.assert_array_equal(x.inputs, y.inputs)
