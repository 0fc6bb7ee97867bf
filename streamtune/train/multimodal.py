"""Images and audio as soft tokens of the LM (LLaVA / SLAM-ASR style).

A frozen encoder turns a medium into a few token vectors (CLIP patch tokens, stacked Whisper encoder
frames: `streamtune.decode.tokens`). A trainable projector per modality (Linear -> GELU -> Linear) maps them
into the LM's hidden size. A prompt carries a placeholder (`<image>`, `<audio>`) per medium; encoding
replaces each by as many slots as the medium has tokens, and the forward pass puts the projected tokens
into the input embeddings at those slots. Slots are prompt tokens, so they never receive loss, and they
take positions like any token: a packed row computes exactly what each sample computes alone.

An encoded sample is `(ids, prompt_len, media)` with `media = [(kind, at, features)]`: `at` is the index
in `ids` where the medium's slots start, `features` its (n, dim) float16 encoder tokens.
"""

from __future__ import annotations

import json
import os
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from streamtune.train.data import chat_texts

KINDS = ("image", "audio")
PLACEHOLDER = {"image": "<image>", "audio": "<audio>"}
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDER.values()) + ")")
_KIND_OF = {p: k for k, p in PLACEHOLDER.items()}
SLOT_ID = 0  # token id under a soft token (its embedding is replaced)
PROJECTOR_FILE = "projector.safetensors"
MULTIMODAL_FILE = "multimodal.json"
Media = tuple[str, int, np.ndarray]
NORM_PARAMS = ("shift", "scale", "whiten")


class MediaMismatch(ValueError):
    """A prompt's placeholders do not match the sample's media."""


class Projector(nn.Module):
    """Encoder tokens -> LM hidden size: Linear -> GELU -> Linear (`mlp`), or one Linear (`linear`).
    With `norm`, each input feature is first standardised by a frozen `shift` and `scale` fitted on
    training tokens (`fit_input_norm`); with `whiten` as well, the standardised features are then
    decorrelated by a frozen (dim, dim) matrix."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kind: str = "mlp",
        hidden: int | None = None,
        norm: bool = False,
        whiten: bool = False,
    ):
        super().__init__()
        if norm or whiten:
            self.shift = mx.zeros((in_dim,))
            self.scale = mx.ones((in_dim,))
        if whiten:
            self.whiten = mx.eye(in_dim)
        if kind == "linear":
            self.layers = [nn.Linear(in_dim, out_dim)]
        elif kind == "mlp":
            width = hidden or out_dim
            self.layers = [nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim)]
        else:
            raise ValueError(f"projector must be mlp or linear, got {kind!r}")

    def __call__(self, x: mx.array) -> mx.array:
        if "shift" in self:
            x = (x - self.shift) * self.scale
        if "whiten" in self:
            x = x @ self.whiten
        for layer in self.layers:
            x = layer(x)
        return x


class Projectors(nn.Module):
    """One projector per modality, as children named after the modality."""

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        kind: str | dict = "mlp",
        norm: bool = False,
        whiten: float | dict | None = None,
    ):
        super().__init__()
        for name, setting in (("projector", kind), ("projector_whiten", whiten)):
            if isinstance(setting, dict) and set(setting) - set(KINDS):
                raise ValueError(f"{name} names {sorted(set(setting) - set(KINDS))}; media are {list(KINDS)}")
        for name in KINDS:
            if name in dims:
                own = kind.get(name, "mlp") if isinstance(kind, dict) else kind
                white = whiten_for(whiten, name) is not None
                setattr(self, name, Projector(int(dims[name]), out_dim, own, norm=norm, whiten=white))
        self.freeze_norm()

    def freeze_norm(self) -> None:
        """Input standardisation is fitted on data, never trained."""
        self.freeze(keys=list(NORM_PARAMS), strict=False)

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in self]

    @property
    def dims(self) -> dict[str, int]:
        """Encoder token width each projector takes."""
        return {k: int(getattr(self, k).layers[0].weight.shape[-1]) for k in self.kinds}


def attach_projectors(
    model: nn.Module,
    dims: dict[str, int],
    kind: str | dict = "mlp",
    seed: int = 0,
    norm: bool = False,
    whiten: float | dict | None = None,
) -> Projectors:
    """Add `model.projectors` (trainable, float32, seeded init; `norm` / `whiten`: with an identity input
    standardisation / whitening until `fit_input_norm`) to an mlx-lm model."""
    unknown = set(dims) - set(KINDS)
    if unknown or not dims:
        raise ValueError(f"media kinds must be among {KINDS}, got {sorted(dims)}")
    mx.random.seed(seed * 7919 + 17)
    model.projectors = Projectors(dims, hidden_size(model), kind, norm, whiten)
    mx.eval(model.projectors.parameters())
    return model.projectors


def attach_from_meta(model: nn.Module, meta: dict, seed: int = 0) -> Projectors:
    """Projectors shaped as an output folder's `multimodal.json` describes them (weights not loaded)."""
    dims = {k: int(s["dim"]) for k, s in meta["media"].items() if k in KINDS}
    norm, whiten = meta.get("projector_norm", False), meta.get("projector_whiten")
    projectors = attach_projectors(model, dims, meta["projector"], seed=seed, norm=norm, whiten=whiten)
    projectors.meta_json = json.dumps(meta)
    return projectors


def whiten_for(setting: float | dict | None, kind: str) -> float | None:
    """A medium's `projector_whiten` (a number for every medium, or one per medium)."""
    return setting.get(kind) if isinstance(setting, dict) else setting


def hidden_size(model: nn.Module) -> int:
    return int(model.model.embed_tokens.weight.shape[-1])


def insert_soft(projectors: Projectors, h: mx.array, gather: mx.array, *features: mx.array) -> mx.array:
    """Input embeddings `h` (B, L, H) with soft tokens: position p takes row `gather[p]` of
    [0; projected image tokens; projected audio tokens] when `gather[p] > 0` (see `soft_inputs`)."""
    table = [mx.zeros((1, h.shape[-1]), h.dtype)]
    for kind, feats in zip(projectors.kinds, features, strict=True):
        table.append(getattr(projectors, kind)(feats.astype(mx.float32)).astype(h.dtype))
    table = mx.concatenate(table)
    return mx.where((gather > 0)[..., None], mx.take(table, gather, axis=0), h)


def soft_inputs(batch, kinds: list[str], dims: dict[str, int], bucket: int = 32) -> tuple[mx.array, ...]:
    """(gather, features per kind) for `insert_soft` from a Batch's media. Feature rows are padded to a
    multiple of `bucket` so a compiled step meets few shapes."""
    gather = np.zeros(batch.inputs.shape, np.int32)
    flat = gather.reshape(-1)
    base, out = 1, []
    for kind in kinds:
        parts = [(pos, f) for k, pos, f in batch.media if k == kind]
        rows = sum(len(f) for _, f in parts)
        size = max(bucket, -(-rows // bucket) * bucket)
        matrix = np.zeros((size, dims[kind]), np.float32)
        at = 0
        for pos, f in parts:
            flat[pos : pos + len(f)] = base + at + np.arange(len(f))
            matrix[at : at + len(f)] = f
            at += len(f)
        out.append(mx.array(matrix))
        base += size
    return (mx.array(gather), *out)


def sample_embeddings(model: nn.Module, ids: list[int], media: list[Media]) -> mx.array:
    """(1, len(ids), H) input embeddings of one encoded sample with its soft tokens in place."""
    h = model.model.embed_tokens(mx.array(ids)[None])
    for kind, at, feats in media:
        soft = getattr(model.projectors, kind)(mx.array(np.asarray(feats, np.float32))).astype(h.dtype)
        h = mx.concatenate([h[:, :at], soft[None], h[:, at + len(feats) :]], axis=1)
    return h


# ----------------------------------------------------------------------------------------- encoding


def placeholder_fields(media: dict[str, list]) -> dict[str, str | None]:
    """Template fields `{image}` / `{audio}`: one placeholder per medium the sample has, else None (so a
    template line holding only `{image}` is dropped for a sample without an image)."""
    return {k: "\n".join([PLACEHOLDER[k]] * len(media.get(k) or [])) or None for k in KINDS}


def check_placeholders(prompt: str, completion: str, media: dict[str, list], sample_id) -> None:
    """Raise MediaMismatch (naming the sample) unless the prompt has one placeholder per medium."""
    for kind in KINDS:
        want, got = len(media.get(kind) or []), prompt.count(PLACEHOLDER[kind])
        if want != got:
            raise MediaMismatch(
                f"sample {sample_id!r}: the prompt has {got} {PLACEHOLDER[kind]} placeholder(s) but the "
                f"sample has {want} {kind} medium/media (prompt: {prompt[:120]!r})"
            )
        if PLACEHOLDER[kind] in completion:
            raise MediaMismatch(f"sample {sample_id!r}: {PLACEHOLDER[kind]} in the completion (prompt only)")


def _pieces(tokenizer, text: str, media: dict[str, list], first: bool) -> tuple[list[int], list[Media]]:
    """Token ids of `text` with each placeholder replaced by slots for the next medium of its kind."""
    ids: list[int] = []
    placed: list[Media] = []
    taken = dict.fromkeys(KINDS, 0)
    for part in _SPLIT.split(text):
        if part in _KIND_OF:
            kind = _KIND_OF[part]
            feats = media[kind][taken[kind]]
            taken[kind] += 1
            placed.append((kind, len(ids), feats))
            ids += [SLOT_ID] * len(feats)
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=first and not ids)
    return ids, placed


def encode_with_media(
    tokenizer,
    prompt: str,
    completion: str,
    media: dict[str, list[np.ndarray]],
    max_len: int,
    system: str | None = None,
    sample_id=None,
) -> tuple[list[int], int, list[Media]]:
    """Like `data.encode`, with each placeholder of the prompt replaced by its medium's slots. Media whose
    slots would be cut by `max_len` are dropped with the prompt tail (such a sample has no completion
    left and is skipped by the caller)."""
    check_placeholders(prompt, completion, media, sample_id)
    if getattr(tokenizer, "chat_template", None):
        head, full = chat_texts(tokenizer, prompt, completion, system)
        prompt_ids, placed = _pieces(tokenizer, head, media, first=False)
        ids = prompt_ids + tokenizer.encode(full[len(head) :], add_special_tokens=False)
    else:
        prompt_ids, placed = _pieces(tokenizer, prompt, media, first=True)
        ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    ids = ids[:max_len]
    placed = [m for m in placed if m[1] + len(m[2]) <= len(ids)]
    return ids, min(len(prompt_ids), len(ids)), placed


def prompt_with_media(
    tokenizer, prompt: str, media: dict[str, list[np.ndarray]], system: str | None = None
) -> tuple[list[int], list[Media]]:
    """Generation prompt ids (chat template with the generation prompt) and where the media go."""
    check_placeholders(prompt, "", media, "prompt")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _pieces(tokenizer, head, media, first=False)
    return _pieces(tokenizer, prompt, media, first=True)


# ------------------------------------------------------------------------------------ adapter folder


def projector_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.projectors.parameters()))


def norm_weights(model: nn.Module) -> dict[str, mx.array]:
    """The projectors' frozen input standardisation, under the model's parameter names (a checkpoint
    keeps it beside the trainable parameters)."""
    if not hasattr(model, "projectors"):
        return {}
    flat = tree_flatten(model.projectors.parameters())
    return {f"projectors.{k}": v for k, v in flat if k.rsplit(".", 1)[-1] in NORM_PARAMS}


def norm_sums(tokens: np.ndarray, whiten: bool) -> np.ndarray:
    """What `fit_input_norm` needs of some (n, dim) tokens, as one float64 vector ranks can sum:
    [sum, sum of squares (or with `whiten` the flattened sum of outer products), count]."""
    t = np.asarray(tokens, np.float64)
    second = (t.T @ t).ravel() if whiten else (t * t).sum(0)
    return np.concatenate([t.sum(0), second, [len(t)]])


def fit_input_norm(
    projectors: Projectors, sums: dict[str, np.ndarray], whiten: float | dict | None = None
) -> dict[str, int]:
    """Set each projector's `shift`/`scale` to the mean and inverse spread of its encoder tokens
    (`sums[kind]`: summed `norm_sums`). A feature whose spread is under 1 % of the average spread is
    scaled as if it had that much, so a feature that is constant in the fitting tokens cannot blow up
    on other inputs. With `whiten`, the projector's `whiten` matrix becomes the inverse square root of
    the standardised features' correlation, each eigenvalue lifted by `whiten` times their mean
    (shrinkage: the few directions that dominate are scaled down to the others, rare directions are not
    blown up), and never under 1e-4 of their mean. Returns tokens per kind."""
    counts = {}
    for kind, total in sums.items():
        proj = getattr(projectors, kind)
        dim = proj.shift.shape[0]
        count = float(total[-1])
        counts[kind] = int(count)
        lift = whiten_for(whiten, kind)
        if count == 0:
            continue
        mean = total[:dim] / count
        if lift is None:
            var = total[dim : 2 * dim] / count - mean * mean
        else:
            cov = total[dim:-1].reshape(dim, dim) / count - np.outer(mean, mean)
            var = np.diag(cov)
        spread = np.sqrt(np.maximum(var, 0.0))
        spread = np.maximum(spread, 0.01 * spread.mean() + 1e-6)
        proj.shift = mx.array(mean.astype(np.float32))
        proj.scale = mx.array((1.0 / spread).astype(np.float32))
        if lift is not None:
            corr = cov / np.outer(spread, spread)
            eig, vec = np.linalg.eigh((corr + corr.T) / 2)
            eig = np.maximum(eig, 0.0)
            # a floor, so full whitening (lift 0) of fewer tokens than features stays finite
            lifted = np.maximum(eig + lift * eig.mean(), 1e-4 * max(eig.mean(), 1e-12))
            proj.whiten = mx.array(((vec / np.sqrt(lifted)) @ vec.T).astype(np.float32))
    mx.eval(projectors.parameters())
    projectors.freeze_norm()
    return counts


def save_projector(model: nn.Module, folder: str, meta: dict) -> None:
    """`projector.safetensors` and `multimodal.json` (encoders, layers, pooling, token counts, dims)."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "projector.tmp.safetensors")
    mx.save_safetensors(tmp, projector_weights(model), metadata={"format": "mlx"})
    os.replace(tmp, os.path.join(folder, PROJECTOR_FILE))
    with open(os.path.join(folder, MULTIMODAL_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, MULTIMODAL_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
