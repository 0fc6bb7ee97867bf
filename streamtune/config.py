"""Every setting and its default, declared once.

`ShardConfig`, `DecodeConfig` and `TrainArgs` are the single source of fields, defaults and help text. The
pipeline's parameters nest them (`shard:`, `decode:`, `train:`), the CLI builds a flag for every field from
them, and docs/configuration.md is generated from them (`python -m streamtune.config > docs/configuration.md`).
Precedence everywhere: defaults < YAML file < flags. Unknown keys are an error naming the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from streamtune.train.data import DEFAULT_TEMPLATE, Template

DEFAULT_MODEL = "offline:smollm2"
DEFAULT_WHISPER = "offline:tiny.en"
DEFAULT_CLIP = "ViT-B-32"
DEFAULT_LABELS = [
    "person", "dog", "cat", "car", "bicycle", "tree", "flower", "food", "building", "street",
    "beach", "mountain", "sky", "water", "book", "computer", "phone", "chair", "text document", "bird",
]  # fmt: skip


class ConfigError(ValueError):
    """A configuration the user wrote is wrong (unknown key, bad value); the message says which."""


class Settings(BaseModel):
    """Base of every settings section: unknown keys are rejected with the closest valid key."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            check_keys(cls, data)
        return data


def check_keys(cls: type[BaseModel], data: Mapping[str, Any], where: str = "") -> None:
    """Raise ConfigError for the first key `cls` does not have, naming the closest valid one."""
    names = list(cls.model_fields)
    for key in data:
        if key in names:
            continue
        hint = _closest(str(key), cls)
        place = f" in {where}" if where else f" for {cls.__name__}"
        raise ConfigError(f"unknown setting {key!r}{place}" + (f"; did you mean {hint!r}?" if hint else ""))


def _closest(key: str, cls: type[BaseModel]) -> str | None:
    candidates = dotted_fields(cls)
    by_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == key]
    if by_leaf:
        return by_leaf[0]
    found = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not found:
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
        found = [leaves[leaf[0]]] if leaf else []
    return found[0] if found else None


def _section(annotation: Any) -> type[Settings] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Settings) else None


def dotted_fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf setting of `cls` as a dotted name (`train.iters`)."""
    out = []
    for name, info in cls.model_fields.items():
        sub = _section(info.annotation)
        out += dotted_fields(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


class ShardConfig(Settings):
    """How raw samples are packed into Arrow shards."""

    max_shard_bytes: int = Field(64 << 20, gt=0, description="Target size of one raw shard in bytes.")
    inline_max_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Media objects larger than this stay at the source: shards hold their URL, version and size, and decode reads them by range.",
    )
    id_column: str | None = Field(
        None,
        description="Field of record files (JSONL/CSV/Parquet/...) whose value names each record; null: file + row number. Read by the manifest stage.",
    )


class DecodeConfig(Settings):
    """Decoding raw samples into features: Whisper transcripts, CLIP embeddings and zero-shot tags."""

    whisper_model: str = Field(
        DEFAULT_WHISPER,
        description="Whisper model: offline:tiny.en, offline:base, an mlx-whisper folder or hub id.",
    )
    language: str | None = Field("en", description="Spoken language; null lets Whisper detect it.")
    clip_model: str = Field(DEFAULT_CLIP, description="open_clip model name (e.g. ViT-B-32, RN50).")
    clip_pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (needs the hub) or a local checkpoint file; null: random init.",
    )
    labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LABELS), description="Zero-shot tag vocabulary for images."
    )
    audio_batch: int = Field(8, ge=1, description="Whisper windows decoded together.")
    image_batch: int = Field(32, ge=1, description="Images embedded together.")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Larger images are quarantined (decompression bombs)."
    )
    max_audio_seconds: float = Field(
        3600.0,
        gt=0,
        description="Audio encoder tokens (media_tokens, online training) need whole clips: longer ones are quarantined; transcription streams any length.",
    )
    audio_window_seconds: float = Field(
        300.0,
        gt=0,
        description="Longer audio is decoded and transcribed in windows of this length (bounded memory).",
    )
    max_decode_ratio: float = Field(
        1000.0,
        gt=0,
        description="Streamed audio/video decoding to more bytes per input byte than this is a bomb.",
    )
    keyframe_every: float = Field(5.0, gt=0, description="Video: seconds between sampled frames.")
    scene_threshold: float = Field(
        0.1, gt=0, le=1, description="Video: mean grayscale difference (0..1) that marks a scene change."
    )
    segment_seconds: float = Field(
        30.0, gt=0, description="Video: segment length; cuts move to transcript segment boundaries."
    )
    thumbnail_width: int = Field(160, ge=16, description="Video: width of the JPEG thumbnail of a frame.")
    top_k: int = Field(3, ge=1, description="Tags kept per image.")
    cache_dir: str | None = Field(None, description="Converted model cache; default ~/.cache/streamtune.")
    transcribe: bool = Field(True, description="Transcribe audio with Whisper (off: encoder tokens only).")
    media_tokens: list[Literal["image", "audio"]] = Field(
        default_factory=list,
        description="Encoder outputs kept for multimodal training: image (CLIP patch tokens), audio (Whisper encoder frames).",
    )
    image_layer: int = Field(
        -2, description="CLIP vision block whose patch tokens are kept (-1 last, -2 penultimate)."
    )
    image_pool: int = Field(
        1, ge=1, description="Merge the patch grid by this factor per side (2: a quarter of the tokens)."
    )
    image_merge: Literal["mean", "stack", "max"] = Field(
        "mean",
        description="mean: average merged patches; stack: concatenate them (width x pool^2); max: their maximum.",
    )
    audio_layer: int = Field(
        -1, description="Whisper encoder block whose frames are kept (-1: the final output)."
    )
    audio_factor: int = Field(
        5, ge=1, description="Whisper frames (50 per s) per audio token: 5 gives 10 tokens per second."
    )
    audio_pool: Literal["stack", "mean"] = Field(
        "stack", description="stack: concatenate a token's frames (width factor x d_model); mean: average."
    )
    audio_context: Literal["clip", "window"] = Field(
        "clip", description="clip: encode a clip's own frames only (cheap); window: pad to Whisper's 30 s."
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, str) or not all(isinstance(x, str) and x.strip() for x in value or []):
            raise ValueError("DecodeConfig.labels must be a list of non-empty strings")
        return list(value)

    def key(self) -> str:
        """Stable hash of everything that changes the features: models, settings, code version.

        Batch sizes and the cache folder are left out: they change speed, not results.
        """
        from streamtune.decode.features import CODE_VERSION, local_fingerprint

        settings = self.model_dump(exclude={"audio_batch", "image_batch", "cache_dir"})
        if not self.media_tokens:  # feature sets decoded before encoder tokens existed keep their keys
            for name in ("media_tokens", "image_layer", "image_pool", "audio_layer", "audio_factor"):
                settings.pop(name)
            settings.pop("audio_pool")
            settings.pop("audio_context")
            settings.pop("image_merge")
        if self.transcribe:  # the default: keys of earlier feature sets stay valid
            settings.pop("transcribe")
        settings["whisper_files"] = local_fingerprint(self.whisper_model)
        settings["clip_files"] = local_fingerprint(self.clip_pretrained)
        settings["code"] = CODE_VERSION
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


class IndexConfig(Settings):
    """Search index over a feature set: transcript embeddings, a BM25 lexical index, CLIP frame vectors."""

    text_model: str = Field(
        "offline:all-minilm-l6-v2",
        description="Transcript embedding model: offline:all-minilm-l6-v2, a sentence-transformers folder or hub id.",
    )
    text_batch: int = Field(64, ge=1, description="Transcripts embedded together.")
    vector_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Stored width of transcript and frame vectors (search computes in float32)."
    )
    thumbnails: bool = Field(True, description="Keep each video segment's middle thumbnail in the index.")
    clip_model: str | None = Field(
        None, description="open_clip text tower for text-to-frame search; null: the decode section's."
    )
    clip_pretrained: str | None = Field(
        None,
        description="Its checkpoint or tag; null: the decode section's. Random weights turn the visual signal off.",
    )
    lexical_weight: float = Field(1.0, ge=0, description="Weight of BM25 (SQLite FTS5) in rank fusion.")
    semantic_weight: float = Field(
        1.0, ge=0, description="Weight of transcript-embedding cosine in rank fusion."
    )
    clip_weight: float = Field(
        1.0, ge=0, description="Weight of CLIP text-to-frame similarity in rank fusion."
    )
    rrf_k: int = Field(
        60, ge=1, description="Reciprocal rank fusion constant: score = sum of weight / (k + rank)."
    )
    candidates: int = Field(100, ge=1, description="Top results of each signal that enter the fusion.")
    ann_min_rows: int = Field(
        100_000, ge=0, description="Rows from which vectors get an IVF index (below: exact scan); 0: never."
    )
    ann_lists: int = Field(0, ge=0, description="IVF lists; 0: about sqrt(rows).")
    ann_nprobe: int = Field(
        0,
        ge=0,
        description="IVF lists a query reads (more: better recall, slower); 0: a quarter of the lists.",
    )
    max_query_chars: int = Field(2000, ge=1, description="Longer queries are refused with an error.")
    sample_queries: list[str] = Field(
        default_factory=list,
        description="Queries whose top hits the pipeline's index artifact shows; empty: a few transcript words.",
    )


class TrainArgs(Settings):
    """LoRA / QLoRA / DoRA / full fine-tuning of an mlx-lm model on streamed feature rows."""

    model: str = Field(
        DEFAULT_MODEL, description="Base model: offline:smollm2, a .gguf file, an mlx-lm folder or hub id."
    )
    adapter_path: str | None = Field(
        None, description="Adapter folder or URL; default ./adapters (train) or WORK_URL/adapters (pipeline)."
    )
    init_adapter: str | None = Field(
        None, description="Start from these adapter weights (folder or URL) instead of a fresh adapter."
    )
    fine_tune_type: Literal["lora", "dora", "full"] = Field("lora", description="lora, dora or full.")
    qlora: bool = Field(False, description="Keep (or quantize) the base in quantize_bits (QLoRA).")
    quantize_bits: int = Field(4, description="Bits of the quantized base with qlora.")
    num_layers: int = Field(8, description="Blocks, counted from the top, that get adapters; -1: all.")
    rank: int = Field(8, ge=1, description="LoRA rank.")
    scale: float = Field(20.0, description="LoRA scale (PEFT's lora_alpha = scale * rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_keys: list[str] | None = Field(
        None,
        description="Module paths that get adapters, e.g. [self_attn.q_proj, self_attn.v_proj]; null: every linear.",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup: int = Field(2, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine (to min_lr_ratio * lr) or constant."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, description="Final learning rate of the cosine schedule, relative to lr."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    iters: int = Field(100, ge=0, description="Optimizer steps.")
    epochs: int | None = Field(
        None, description="Stop after this many passes over the data, if before iters."
    )
    batch_size: int = Field(4, description="Packed rows per micro-batch, over all processes.")
    seq_len: int = Field(256, description="Tokens per row; longer samples are truncated.")
    grad_accum: int = Field(1, description="Micro-batches per optimizer step.")
    grad_checkpoint: bool = Field(
        False, description="Recompute activations in the backward pass (less memory)."
    )
    compile: bool | None = Field(None, description="mx.compile the step; null: on GPU only.")
    packing: bool = Field(True, description="Pack several samples per row (block-diagonal attention).")
    additive_mask: bool | None = Field(
        None, description="0/-inf float mask instead of boolean; null: on GPU."
    )
    prefetch: int = Field(2, ge=0, description="Batches prepared ahead in a background thread (0: inline).")
    attention_window: int | None = Field(
        None, description="Longest sample (< seq_len / 2): attention over two windows only."
    )
    template: Template | SkipJsonSchema[Callable[[dict], Any]] = Field(
        DEFAULT_TEMPLATE,
        description="Prompt/completion format strings over a feature row's fields (and system).",
    )
    record_format: Literal["auto", "template", "messages", "prompt_completion", "alpaca", "text"] = Field(
        "auto",
        description="Rows of record files: auto picks messages / prompt_completion / alpaca / text by their fields (with the default template); template: use the template.",
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="Chat records (messages): learn every assistant turn, or only the last."
    )
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: only at the end).")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Share of rows held out for validation.")
    max_val_samples: int = Field(64, ge=0, description="Cap on held-out samples.")
    save_every: int = Field(
        50, ge=0, description="Checkpoint every N steps (0: never; resume needs checkpoints)."
    )
    checkpoint_url: str | None = Field(
        None, description="Checkpoint folder or URL; default ADAPTER_PATH/checkpoints."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted).")
    resume: bool = Field(
        False, description="Continue from the latest checkpoint (an error if there is none)."
    )
    seed: int = Field(0, description="Seed of data order, adapter init and dropout.")
    dtype: str | None = Field(
        None, description="float32, bfloat16 or float16; null: float32 on CPU, bfloat16 on GPU."
    )
    storage_options: SkipJsonSchema[dict | None] = Field(
        None, description="fsspec options for adapter and checkpoint URLs (not for config files: no secrets)."
    )
    progress: bool = Field(False, description="Show a progress bar.")
    stage: Literal["text", "align", "instruct"] = Field(
        "text",
        description="text: prompts are words only; align: train only the media projectors (stage 1); instruct: projectors and adapters (stage 2).",
    )
    modalities: list[Literal["image", "audio"]] | None = Field(
        None, description="Media the model sees as soft tokens (align/instruct); null: all the features hold."
    )
    media_source: Literal["cached", "online"] = Field(
        "cached",
        description="cached: encoder tokens stored by decode; online: raw media encoded (and augmented) while training.",
    )
    projector: Literal["mlp", "linear"] | dict[str, Literal["mlp", "linear"]] = Field(
        "mlp",
        description="Projector per modality: mlp (Linear-GELU-Linear) or linear; or one per medium, "
        "e.g. {image: linear} (media not named: mlp).",
    )
    projector_lr: float = Field(1e-3, gt=0, description="Peak learning rate of the projectors.")
    media_lr: dict[str, float] = Field(
        default_factory=dict,
        description="Peak learning rate of a medium's projector where it should differ from projector_lr, "
        "e.g. {image: 0.01}: an encoder whose features say less needs larger steps.",
    )
    projector_norm: bool = Field(
        True,
        description="Standardise each encoder feature before its projector, by a mean and spread fitted "
        "on the first projector_norm_samples training rows (frozen, saved with the projector). Encoder "
        "tokens share a large common component; without it the drawings' shapes went unlearnt.",
    )
    projector_whiten: float | dict[str, float] | None = Field(
        None,
        description="Also decorrelate the standardised encoder features (frozen matrix fitted with the "
        "standardisation): the correlation's eigenvalues are lifted by this times their mean before the "
        "inverse square root, so the few directions that dominate (colour, in the demo's drawings) are "
        "scaled down to the rest and the projector learns the rare ones (shape) at the same pace. "
        "One number for every medium or one per medium ({image: 1.0}; media not named: standardise "
        "only). null: standardise only.",
    )
    projector_norm_samples: int = Field(
        256, ge=1, description="Rows (per rank, summed over ranks) the input standardisation is fitted on."
    )
    augment: bool = Field(
        True, description="online: seeded crop/flip/colour jitter, offset/gain/speed/noise per sample+epoch."
    )
    augment_media: list[Literal["image", "audio"]] | None = Field(
        None, description="online: the media augment applies to (null: every medium the run sees)."
    )
    media_batch: int = Field(
        64,
        ge=1,
        description="online: rows whose media are encoded together (one image-tower call, one audio batch; "
        "64 kept the H200 at 0.90-0.93 x cached, 32 at 0.80).",
    )
    media_workers: int = Field(
        0,
        ge=0,
        description="online: worker processes decoding and augmenting media (0: 4 threads of this process).",
    )

    @field_validator("projector_whiten")
    @classmethod
    def _whiten(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(v < 0 for v in values):
            raise ValueError("projector_whiten must be >= 0 (0: full whitening)")
        return value

    @property
    def adapter_dir(self) -> str:
        return self.adapter_path or "adapters"

    @property
    def checkpoint_dir(self) -> str:
        from streamtune.storage import join

        return self.checkpoint_url or join(self.adapter_dir, "checkpoints")

    def settings(self) -> dict[str, Any]:
        """The fields that decide what training produces (for cache keys and adapter configs)."""
        drop = {"adapter_path", "checkpoint_url", "storage_options", "progress", "resume", "prefetch"}
        drop |= {"media_workers"}
        out = self.model_dump(exclude=drop | {"template"})
        out["template"] = (
            self.template.__dict__ if isinstance(self.template, Template) else repr(self.template)
        )
        return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"config not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def build(cls: type[Settings], *layers: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None):
    """`cls` from defaults < each layer (YAML mappings) < `overrides` (dotted names, e.g. flags).

    Errors become one ConfigError naming the setting."""
    data: dict[str, Any] = {}
    for layer in layers:
        _merge(data, dict(layer or {}))
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, cls)) from None


def _merge(into: dict, more: dict) -> None:
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _one_line(e: ValidationError, cls: type) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    return f"{cls.__name__}: {where}: {msg}" if where else f"{cls.__name__}: {msg}"


def flag_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) of a field annotation: `int | None` -> (int, True)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) not in (Union, UnionType) or not args:  # list[str] is a list, not a str
        return annotation, False
    return (args[0] if len(args) == 1 else annotation), len(args) < len(get_args(annotation))


def reference_table(*sections: tuple[str, type[Settings]]) -> str:
    """A Markdown reference of every setting: name, default, meaning."""
    out = []
    for title, cls in sections:
        out += [f"## `{title}`", "", " ".join(cls.__doc__.split()), ""]
        out += ["| setting | default | meaning |", "| --- | --- | --- |"]
        for name, info in cls.model_fields.items():
            if info.exclude or name in ("storage_options", "template") or _section(info.annotation):
                continue
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            shown = json.dumps(default) if not isinstance(default, str) else default
            if info.is_required():
                shown = "required"
            if name == "labels":
                shown = f"{len(default)} everyday words"
            out.append(f"| `{name}` | `{shown}` | {info.description or ''} |")
        out.append("")
    return "\n".join(out)


def configuration_doc(*pipeline: tuple[str, type[Settings]]) -> str:
    """docs/configuration.md: `pipeline` sections first (the app layer passes the pipeline's own fields)."""
    return (
        "\n".join(
            [
                "# Configuration reference",
                "",
                "Generated from `streamtune/config.py` and `flows/params.py` (`python -m app.config_doc >",
                "docs/configuration.md`); a test keeps it in sync. A setting is the same in a YAML file (`-c FILE`),",
                "a command-line flag (`--batch-size 8` for `streamtune train`, `--train.batch-size 8` for",
                "`streamtune run`) and the Prefect run form. Precedence: defaults < YAML < flags. Booleans take",
                "`--name` / `--no-name`; lists are written as YAML (`--labels '[cat, dog]'`). `template` (the",
                "prompt/completion/system format strings of `train`) is set in YAML only.",
                "",
                reference_table(
                    *pipeline,
                    ("shard", ShardConfig),
                    ("decode", DecodeConfig),
                    ("index", IndexConfig),
                    ("train", TrainArgs),
                ),
            ]
        ).rstrip()
        + "\n"
    )
