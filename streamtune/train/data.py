"""Feature rows -> prompt/completion text -> token ids -> packed batches.

Packing: each batch row ("lane") is filled with whole samples back to back. The attention mask is
block-diagonal (a token sees only earlier tokens of its own sample) and positions restart at 0 for every
sample, so a packed row computes exactly what the samples would compute alone. Sample i of the stream
goes to lane i % rows, which makes the batches of N processes with rows/N lanes each, fed by
interleaved stream partitions, the same rows as one process with all lanes.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import string
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Template:
    """`prompt` and `completion` are `str.format` strings over the row's fields.

    Extra fields: `tags` is joined with ", ", `meta` (a JSON string) is also exposed as `meta_<key>`.
    A prompt line whose fields are all empty is dropped; a row whose completion renders empty is skipped.
    `system`, if set, becomes the chat template's system message.
    """

    prompt: str
    completion: str
    system: str | None = None


DEFAULT_TEMPLATE = Template(
    prompt=(
        "Describe this recording.\n"
        "Transcript: {transcript}\n"
        "Detected: {tags}\n"
        "Language: {language}\n"
        "Notes: {meta_notes}"
    ),
    completion="{text}",
)

TemplateLike = Template | Callable[[dict], "tuple[str, str] | None"]
_FIELD = re.compile(r"{(\w+)[^}]*}")


def row_fields(sample: dict) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in sample.items():
        if value is None or isinstance(value, bytes | bytearray):
            continue
        if key == "meta":
            meta = _parse_meta(value)
            for mk, mv in meta.items():
                if mv is not None and not isinstance(mv, dict | list):
                    fields[f"meta_{mk}"] = str(mv).strip()
            continue
        if isinstance(value, list | tuple):
            if value and all(isinstance(v, str) for v in value):
                fields[key] = ", ".join(v.strip() for v in value if v.strip())
            continue
        if isinstance(value, str):
            fields[key] = value.strip()
        elif isinstance(value, int | float | bool):
            fields[key] = str(value)
    return fields


def _parse_meta(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        meta = json.loads(value) if isinstance(value, str) and value else {}
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


class _Blank(dict):
    def __missing__(self, key):
        return ""


def _fill(fmt: str, fields: dict[str, str]) -> str:
    return string.Formatter().vformat(fmt, (), _Blank(fields))


def render(sample: dict, template: TemplateLike = DEFAULT_TEMPLATE) -> tuple[str, str] | None:
    """(prompt, completion) for one feature row, or None when the row has nothing to learn from."""
    if callable(template):
        return template(sample)
    fields = row_fields(sample)
    completion = _fill(template.completion, fields).strip()
    if not completion:
        return None
    lines = []
    for line in template.prompt.split("\n"):
        names = _FIELD.findall(line)
        if names and not any(fields.get(n) for n in names):
            continue
        lines.append(_fill(line, fields))
    prompt = "\n".join(lines).strip()
    if not prompt:
        return None
    return prompt, completion


def chat_texts(tokenizer, prompt: str, completion: str, system: str | None = None) -> tuple[str, str]:
    """(the prompt as the chat template renders it up to the assistant's turn, the whole conversation)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False
    )
    if not full.startswith(head):
        raise ValueError("chat template does not render the prompt as a prefix of the conversation")
    return head, full


def encode(tokenizer, prompt: str, completion: str, max_len: int, system: str | None = None):
    """Token ids of prompt+completion (through the chat template when the tokenizer has one) and the
    number of prompt tokens. Truncated to `max_len` tokens."""
    if getattr(tokenizer, "chat_template", None):
        head, full = chat_texts(tokenizer, prompt, completion, system)
        prompt_ids = tokenizer.encode(head, add_special_tokens=False)
        ids = prompt_ids + tokenizer.encode(full[len(head) :], add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(prompt)
        ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    ids = ids[:max_len]
    return ids, min(len(prompt_ids), len(ids))


@dataclass
class Batch:
    """A packed batch. `inputs`/`targets`/`loss_mask`/`positions`/`segments` are (rows, seq_len) numpy
    arrays; segment 0 is padding, samples are numbered from 1 within a row. `media` lists the soft tokens
    of multimodal samples as (kind, flat position in rows * seq_len, (n, dim) features)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    samples: int
    tokens: int  # non-pad input tokens (soft tokens included)
    media: list = field(default_factory=list)

    @property
    def targets_count(self) -> int:
        return int(self.loss_mask.sum())


def sample_to_json(sample: tuple) -> list:
    """An encoded sample as JSON: [ids, prompt_len] (+ media as [kind, at, shape, base64 float16])."""
    ids, prompt_len, *rest = sample
    if not rest:
        return [ids, prompt_len]
    media = [
        [kind, at, list(f.shape), base64.b64encode(np.ascontiguousarray(f, np.float16).tobytes()).decode()]
        for kind, at, f in rest[0]
    ]
    return [ids, prompt_len, media]


def sample_from_json(data: list) -> tuple:
    ids, prompt_len = list(data[0]), data[1] if isinstance(data[1], list) else int(data[1])
    if len(data) < 3:
        return ids, prompt_len
    media = [
        (kind, int(at), np.frombuffer(base64.b64decode(b64), np.float16).reshape(shape))
        for kind, at, shape, b64 in data[2]
    ]
    return ids, prompt_len, media


def learned(prompt_len: int | list, k: int) -> np.ndarray:
    """Loss mask of a sample's k targets (target j is token j + 1). The second element of an encoded sample
    is the prompt length (tokens from there on are learned) or, for multi-turn chats, a list of
    [start, stop) token spans that are learned (streamtune.train.formats)."""
    if not isinstance(prompt_len, list):
        return np.arange(1, k + 1) >= prompt_len
    mask = np.zeros(k, bool)
    for start, stop in prompt_len:
        mask[max(start - 1, 0) : max(stop - 1, 0)] = True
    return mask


def pack_rows(rows: list[list[tuple]], seq_len: int) -> Batch:
    """Lay out rows of (ids, prompt_len[, media]) samples into a Batch. Each sample uses len(ids) - 1
    slots; a medium's soft tokens go where its slots are."""
    n = len(rows)
    inputs = np.zeros((n, seq_len), np.int32)
    targets = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    positions = np.zeros((n, seq_len), np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    samples = tokens = 0
    media = []
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, prompt_len, *extra) in enumerate(row, start=1):
            k = len(ids) - 1
            for kind, start, feats in extra[0] if extra else ():
                media.append((kind, r * seq_len + at + start, feats))
            if at + k > seq_len:
                raise ValueError(f"row {r} overflows seq_len {seq_len}")
            inputs[r, at : at + k] = ids[:-1]
            targets[r, at : at + k] = ids[1:]
            # target j is token j+1: learn only completion tokens
            loss_mask[r, at : at + k] = learned(prompt_len, k)
            positions[r, at : at + k] = np.arange(k)
            segments[r, at : at + k] = s
            at += k
            samples += 1
            tokens += k
    return Batch(inputs, targets, loss_mask, positions, segments, samples, tokens, media)


SKIPPED = object()  # what `pull` returns for a sample set aside (quarantined): it keeps its turn in the deal


class Packer:
    """Packs a stream of encoded samples into fixed-shape batches. Its state (samples dealt to lanes but
    not yet packed) is JSON-serialisable, so training resumes exactly."""

    def __init__(self, rows: int, seq_len: int):
        self.rows = rows
        self.seq_len = seq_len
        self.lanes: list[deque] = [deque() for _ in range(rows)]
        self.dealt = 0

    def state_dict(self) -> dict:
        return {"dealt": self.dealt, "lanes": [[sample_to_json(s) for s in lane] for lane in self.lanes]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["lanes"]) != self.rows:
            raise ValueError(f"packer state has {len(state['lanes'])} lanes, expected {self.rows}")
        self.dealt = state["dealt"]
        self.lanes = [deque(sample_from_json(s) for s in lane) for lane in state["lanes"]]

    def deal(self, sample: tuple[list[int], int]) -> None:
        self.lanes[self.dealt % self.rows].append(sample)
        self.dealt += 1

    def next_batch(self, pull: Callable[[], tuple[list[int], int] | None]) -> Batch | None:
        """Fill every lane; `pull` returns the next encoded sample or None at the end of the stream."""
        rows = []
        for lane in self.lanes:
            row, used = [], 0
            while True:
                while not lane:
                    sample = pull()
                    if sample is None:
                        break
                    if sample is SKIPPED:  # its lane stays the same with any number of processes
                        self.dealt += 1
                        continue
                    self.deal(sample)
                if not lane:
                    break
                need = len(lane[0][0]) - 1
                if used + need > self.seq_len:
                    break
                row.append(lane.popleft())
                used += need
            rows.append(row)
        if not any(rows):
            return None
        return pack_rows(rows, self.seq_len)


def encode_sample(
    sample: dict, tokenizer, *, seq_len: int, template: TemplateLike = DEFAULT_TEMPLATE, records=None
) -> tuple[tuple[str, str], tuple[list[int], int]] | None:
    """Render one feature row and encode it, truncated to `seq_len + 1` tokens (`seq_len` input slots):
    ((prompt, completion), (ids, prompt_len)), or None when the row has nothing to learn from (no
    completion, or no completion token left after truncation). Rows of record files in a known format
    (chat `messages`, prompt/completion, Alpaca, text) skip the template: streamtune.train.formats,
    `records` (RecordOptions) says how."""
    if isinstance(template, Template):
        from streamtune.train.formats import encode_record

        found = encode_record(sample, tokenizer, seq_len=seq_len, template=template, options=records)
        if found is not NotImplemented:
            return found
    pair = render(sample, template)
    if pair is None:
        return None
    system = getattr(template, "system", None)
    ids, prompt_len = encode(tokenizer, *pair, max_len=seq_len + 1, system=system)
    if len(ids) <= max(prompt_len, 1):
        return None
    return pair, (ids, prompt_len)


def encoded_samples(
    samples: Iterable[dict], tokenizer, *, seq_len: int, template: TemplateLike = DEFAULT_TEMPLATE
) -> Iterator[tuple[list[int], int]]:
    """(ids, prompt_len) per usable row (`encode_sample`); the other rows are skipped."""
    for sample in samples:
        found = encode_sample(sample, tokenizer, seq_len=seq_len, template=template)
        if found is not None:
            yield found[1]


def packed_batches(
    samples: Iterable[dict],
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    template: TemplateLike = DEFAULT_TEMPLATE,
) -> Iterator[Batch]:
    """Packed batches of `batch_size` rows x `seq_len` tokens over one pass of `samples`."""
    stream = encoded_samples(samples, tokenizer, seq_len=seq_len, template=template)
    packer = Packer(batch_size, seq_len)
    while (batch := packer.next_batch(lambda: next(stream, None))) is not None:
        yield batch


def padded_batch(pull: Callable[[], tuple[list[int], int] | None], rows: int, seq_len: int) -> Batch | None:
    """The next `rows` samples of `pull` one per row, padded (for architectures without a packed
    forward); rows past the end of the stream stay empty, None when there is no sample left."""
    samples = [s for s in (pull() for _ in range(rows)) if s is not None and s is not SKIPPED]
    if not samples:
        return None
    return pack_rows([[s] for s in samples] + [[] for _ in range(rows - len(samples))], seq_len)


def peek(dataset: Iterable[dict], n: int) -> list[dict]:
    """The next `n` rows of `dataset`, leaving a resumable dataset (one with `state_dict`) where it was."""
    state = dataset.state_dict() if hasattr(dataset, "state_dict") else None
    rows = iter(dataset)
    try:
        return list(itertools.islice(rows, n))
    finally:
        if hasattr(rows, "close"):
            rows.close()
        if state is not None:
            dataset.load_state_dict(state)


class ListSource:
    """An in-memory dataset with the streaming dataset's resumable interface (tests, RAM baselines)."""

    def __init__(self, rows: list[dict], *, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        self.rows = list(rows)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def _order(self) -> np.ndarray:
        order = np.arange(len(self.rows))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict]:
        order = self._order()
        while self.position < len(order):
            row = self.rows[order[self.position]]
            self.position += 1
            yield row

    def __len__(self) -> int:
        return len(self.rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
