"""Does the model use the media? Counterfactual evaluation on held-out samples.

The loss of each sample's reference completion is measured twice: with the sample's own media, and with
the media of another sample (a rotation among samples with the same kinds of media, so placeholders
still match). A model that reads its media has a clearly lower matched loss: `ratio` = shuffled / matched
is well above 1; a model that ignores them has a ratio near 1.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from streamtune.train.data import Packer, TemplateLike, render
from streamtune.train.forward import loss_at, supports_packing
from streamtune.train.multimodal import KINDS, encode_with_media, placeholder_fields, soft_inputs


def _completion_loss(model: nn.Module, samples: list[tuple], dims: dict, seq_len: int, rows: int) -> float:
    from streamtune.train.trainer import _arrays

    kinds = [k for k in KINDS if k in dims]
    packer, pending = Packer(rows, seq_len), deque(samples)
    total, count = 0.0, 0
    packed = supports_packing(model)
    while (batch := packer.next_batch(lambda: pending.popleft() if pending else None)) is not None:
        soft = soft_inputs(batch, kinds, dims)
        total += loss_at(model, *_arrays(batch), packed=packed, soft=soft).item()
        count += batch.targets_count
    return total / max(count, 1)


def counterfactual(
    model: nn.Module,
    tokenizer,
    rows: list[dict],
    template: TemplateLike,
    media_of: Callable[[dict], dict],
    *,
    seq_len: int = 512,
    batch_rows: int = 4,
) -> dict:
    """{"matched", "shuffled", "ratio", "samples"}: mean completion-token loss of held-out `rows` with
    their own media and with another sample's. `media_of(row)` gives {kind: [(tokens, dim) arrays]}."""
    was_training = model.training
    model.eval()
    items = []
    for row in rows:
        media = media_of(row)
        view = {k: v for k, v in row.items() if k not in KINDS and not k.endswith("_tokens")}
        pair = render(view | placeholder_fields(media), template)
        if pair is not None:
            items.append((row.get("sample_id"), pair, media))
    groups = defaultdict(list)
    for i, (_, _, media) in enumerate(items):
        groups[tuple(len(media.get(k) or []) for k in KINDS)].append(i)
    donor = {}
    for members in groups.values():
        for j, i in enumerate(members):
            donor[i] = members[(j + 1) % len(members)]
    used = [i for i in range(len(items)) if donor[i] != i and any(items[i][2].values())]
    if not used:
        raise ValueError("counterfactual evaluation needs at least two samples with the same kinds of media")
    system = getattr(template, "system", None)

    def encoded(i: int, media: dict) -> tuple:
        sid, pair, _ = items[i]
        return encode_with_media(tokenizer, *pair, media, seq_len + 1, system, sid)

    dims = model.projectors.dims
    matched = _completion_loss(model, [encoded(i, items[i][2]) for i in used], dims, seq_len, batch_rows)
    shuffled = _completion_loss(
        model, [encoded(i, items[donor[i]][2]) for i in used], dims, seq_len, batch_rows
    )
    if was_training:
        model.train()
    mx.clear_cache()
    return {"matched": matched, "shuffled": shuffled, "ratio": shuffled / matched, "samples": len(used)}
