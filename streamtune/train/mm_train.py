"""Multimodal training runs: what `trainer.train` adds for `stage` align or instruct.

- align (stage 1): only the projectors learn (the LM, adapters included, is frozen), typically on
  caption / transcript pairs, at `projector_lr`.
- instruct (stage 2): projectors at `projector_lr` and the adapters (LoRA / QLoRA / DoRA) at `lr`, on
  instruction data; `init_adapter` = a stage-1 output folder starts from its projectors.

Media reach the model in one of two ways (`media_source`):
- cached: encoder tokens the decode stage stored (`image_tokens` / `audio_tokens` columns of a feature
  set decoded with `media_tokens`); the feature index says which encoders made them.
- online: raw media (`image` / `audio` bytes of a raw shard set) are decoded, augmented
  (`streamtune.decode.augment`, seeded from (seed, epoch, sample id)) and encoded by the frozen encoders
  inside the data path (`OnlineSource`): rows are read `media_batch` at a time (a window), their media
  decoded and augmented by `media_workers` processes (or threads) and encoded in one tower call per kind
  while earlier windows are trained on. Windows start where the previous one ended and a checkpoint names the window's
  start and how many of its rows were used, so a resumed run encodes the very same windows (bitwise the
  same tokens); within a window each medium's tokens equal its encoding alone up to float rounding. A
  medium that does not decode is a quarantine record (`quarantined` in the result, `quarantine.parquet`
  next to the adapter) and its sample is skipped, the same way on every rank and after a resume.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from streamtune.decode.augment import prepare_medium
from streamtune.train.data import DEFAULT_TEMPLATE, Template, render
from streamtune.train.multimodal import (
    KINDS,
    NORM_PARAMS,
    PROJECTOR_FILE,
    attach_projectors,
    encode_with_media,
    fit_input_norm,
    norm_sums,
    placeholder_fields,
    save_projector,
    soft_inputs,
    whiten_for,
)

MEDIA_TEMPLATE = Template(prompt="{image}\n{audio}", completion="{text}")
AHEAD = 3  # windows read and in preparation or encoding ahead of the one being consumed
ENCODED = "__media__"  # row field OnlineSource adds: (epoch, augment, {kind: [tokens]} or Quarantined)
ADAPTER_PARAMS = ("lora_a", "lora_b", "m")  # LoRA / DoRA parameters of mlx-lm's adapter layers


class Quarantined(Exception):
    """A sample whose medium could not be used; `record` is its quarantine record."""

    def __init__(self, record: dict):
        super().__init__(record["message"])
        self.record = record


def find_spec(args, dataset, media=None) -> dict:
    """{kind: encoder spec} of a run: from `media` (a spec dict or a DecodeConfig naming the encoders),
    else from the feature index of `dataset`, restricted to `args.modalities`."""
    from streamtune.config import DecodeConfig

    if isinstance(media, DecodeConfig):
        from streamtune.decode.tokens import media_spec

        spec = media_spec(media, args.modalities or media.media_tokens or KINDS)
    elif media:
        spec = dict(media)
    else:
        index = getattr(dataset, "index", None)  # CloudStreamingDataset: the feature index
        spec = (index.get("media_tokens") if isinstance(index, dict) else None) or {}
    if not spec:
        raise ValueError(
            f"stage {args.stage!r} needs encoder tokens: a feature set decoded with media_tokens, or "
            "media= (a DecodeConfig naming the encoders, required for media_source online)"
        )
    want = args.modalities or list(spec)
    missing = [k for k in want if k not in spec]
    if missing:
        raise ValueError(f"modalities {missing} have no encoder tokens (available: {sorted(spec)})")
    return {k: spec[k] for k in KINDS if k in want}


def adapter_names(model: nn.Module, fine_tune_type: str) -> list[str]:
    """Names of the LM's adapter weights (what adapters.safetensors holds), whatever is trainable now."""
    names = [k for k, _ in tree_flatten(model.parameters()) if not k.startswith("projectors.")]
    if fine_tune_type == "full":
        return names
    return [k for k in names if k.rsplit(".", 1)[-1] in ADAPTER_PARAMS]


class MultimodalRun:
    """Projectors on the model, trainable parts per stage, the media data path, optimizer, files."""

    def __init__(self, args, model: nn.Module, tokenizer, spec: dict, media=None):
        self.args, self.spec, self.tokenizer = args, spec, tokenizer
        self.kinds = list(spec)
        self.dims = {k: int(s["dim"]) for k, s in spec.items()}
        self.online = args.media_source == "online"
        self.template = args.template if "template" in args.model_fields_set else MEDIA_TEMPLATE
        if self.template is DEFAULT_TEMPLATE:
            self.template = MEDIA_TEMPLATE
        attach_projectors(
            model,
            self.dims,
            args.projector,
            seed=args.seed,
            norm=args.projector_norm,
            whiten=args.projector_whiten,
        )
        model.projectors.meta_json = json.dumps(self.meta())
        model.freeze()
        if args.stage == "instruct":
            if args.fine_tune_type == "full":
                model.unfreeze()
            else:
                model.unfreeze(keys=list(ADAPTER_PARAMS), strict=False)
        elif args.stage != "align":
            raise ValueError(f"stage must be text, align or instruct, got {args.stage!r}")
        model.projectors.unfreeze()
        model.projectors.freeze_norm()
        self._media_cfg = media
        self._encoders = None

    def meta(self) -> dict:
        """multimodal.json: encoders, layers, pooling, token counts, projector."""
        return {
            "stage": self.args.stage,
            "projector": self.args.projector,
            "projector_norm": self.args.projector_norm,
            "projector_whiten": self.args.projector_whiten,
            "placeholders": {k: f"<{k}>" for k in self.kinds},
            "media": self.spec,
            "template": self.template.__dict__ if isinstance(self.template, Template) else None,
        }

    # ----------------------------------------------------------------------------- optimizer, files

    def optimizer(self, schedule, projector_schedule, media_schedules: dict | None = None):
        """AdamW at `projector_lr` for the projectors (a medium named in `media_schedules` gets its own
        AdamW at that schedule); in stage instruct a last AdamW at `lr` for the adapters."""
        wd = self.args.weight_decay
        unknown = sorted(set(media_schedules or {}) - set(KINDS))
        if unknown:
            raise ValueError(f"media_lr names {unknown}; media are {list(KINDS)}")
        optimizers, filters = [], []
        for kind, medium_schedule in (media_schedules or {}).items():
            optimizers.append(optim.AdamW(learning_rate=medium_schedule, weight_decay=wd))
            filters.append(lambda path, _, prefix=f"projectors.{kind}.": path.startswith(prefix))
        optimizers.append(optim.AdamW(learning_rate=projector_schedule, weight_decay=wd))
        if self.args.stage != "align":  # the last optimizer takes what no filter claimed
            filters.append(lambda path, _: path.startswith("projectors."))
            optimizers.append(optim.AdamW(learning_rate=schedule, weight_decay=wd))
        return optimizers[0] if len(optimizers) == 1 else optim.MultiOptimizer(optimizers, filters)

    def load_init(self, model: nn.Module, url: str, storage_options=None) -> bool:
        """Projector weights of an earlier run's output folder (stage 1 -> stage 2), if it has them."""
        from streamtune import storage

        path = storage.join(url, PROJECTOR_FILE)
        if not storage.exists(path, storage_options):
            return False
        with _local(path, storage_options) as local:
            weights = mx.load(local)
        has_norm = any(k.rsplit(".", 1)[-1] in NORM_PARAMS for k in weights)
        has_whiten = sorted(k.split(".")[0] for k in weights if k.endswith(".whiten"))
        want_whiten = sorted(k for k in self.kinds if whiten_for(self.args.projector_whiten, k) is not None)
        if has_norm != (self.args.projector_norm or bool(want_whiten)) or has_whiten != want_whiten:
            raise ValueError(
                f"init_adapter {url}: its projectors were trained with projector_norm={has_norm}, "
                f"whitening {has_whiten or 'off'}; this run has "
                f"projector_norm={self.args.projector_norm}, projector_whiten={self.args.projector_whiten}; "
                "set the same"
            )
        model.projectors.load_weights(list(weights.items()), strict=True)
        mx.eval(model.projectors.parameters())
        return True

    def fit_norm(self, model: nn.Module, rows: list[dict], world: int = 1) -> dict[str, int]:
        """Fit the projectors' input standardisation on the encoder tokens of `rows` (unaugmented; rows
        whose media cannot be encoded are left out), summed over the `world` ranks so every rank holds
        the same. Returns the tokens seen per kind."""
        whiten = {k: whiten_for(self.args.projector_whiten, k) is not None for k in self.kinds}
        width = {k: d * d if whiten[k] else d for k, d in self.dims.items()}
        sums = {k: np.zeros(self.dims[k] + width[k] + 1) for k in self.kinds}
        for row in rows:
            try:
                media = self.media_of(row, 0, augment=False)
            except (Quarantined, ValueError):
                continue
            for kind, items in media.items():
                for tokens in items:
                    sums[kind] += norm_sums(tokens, whiten[kind])
        if world > 1:
            sums = {
                k: np.asarray(mx.distributed.all_sum(mx.array(v, mx.float32)), np.float64)
                for k, v in sums.items()
            }
        return fit_input_norm(model.projectors, sums, self.args.projector_whiten)

    # ------------------------------------------------------------------------------------ data path

    def soft(self, batch) -> tuple:
        return soft_inputs(batch, self.kinds, self.dims)

    def source(self, dataset, held_out=None):
        """The rows of `dataset` with their media encoded ahead in windows (online), else `dataset`.
        `held_out(row)`: the row is held out (encoded without augmentation, only in epoch 0)."""
        if not self.online:
            return dataset
        return OnlineSource(self, dataset, held_out)

    def media_of(self, row: dict, epoch: int, augment: bool) -> dict[str, list[np.ndarray]]:
        """{kind: [(tokens, dim) float16 per medium]} of one row."""
        done = row.get(ENCODED)
        if done is not None and done[:2] == (epoch, augment and self.args.augment):
            if isinstance(done[2], Quarantined):
                raise Quarantined(done[2].record)
            return done[2]
        out = {}
        for kind in self.kinds:
            if self.online:
                value = row.get(kind)
                items = value if isinstance(value, list) else [] if value is None else [value]
                out[kind] = [self._encode(kind, row, data, epoch, augment) for data in items]
            else:
                value = row.get(f"{kind}_tokens")
                items = value if isinstance(value, list) else [] if value is None else [value]
                out[kind] = [np.asarray(v, np.float16) for v in items]
                for v in out[kind]:
                    if v.ndim != 2 or v.shape[1] != self.dims[kind]:
                        raise ValueError(
                            f"sample {row.get('sample_id')!r}: {kind}_tokens has shape {v.shape}, the "
                            f"projector expects (n, {self.dims[kind]})"
                        )
        return out

    def encode_row(self, row: dict, max_len: int, epoch: int, augment: bool = True):
        """((prompt, completion), (ids, prompt_len, media)) or None when the row has nothing to learn;
        raises Quarantined for an undecodable medium and MediaMismatch for placeholders that do not
        match the media."""
        media = self.media_of(row, epoch, augment)
        view = {k: v for k, v in row.items() if k not in KINDS and k != ENCODED and not k.endswith("_tokens")}
        pair = render(view | placeholder_fields(media), self.template)
        if pair is None:
            return None
        system = getattr(self.template, "system", None)
        ids, prompt_len, placed = encode_with_media(
            self.tokenizer, *pair, media, max_len, system, row.get("sample_id")
        )
        if len(ids) <= max(prompt_len, 1):
            return None
        return pair, (ids, prompt_len, placed)

    def _encode(self, kind: str, row: dict, data, epoch: int, augment: bool) -> np.ndarray:
        enc = self.encoders()
        prepared = self.prepare(kind, row, data, epoch, augment)
        if kind == "image":
            return enc["image"].encode_tokens([prepared])[0]
        return enc["audio"].encode(prepared)

    def prepare(self, kind: str, row: dict, data, epoch: int, augment: bool):
        """One medium decoded and augmented: the image tower's input pixels, or 16 kHz audio; raises
        Quarantined if it does not decode."""
        sources = list(row.get("sources") or [])
        args = (kind, bytes(data), row.get("sample_id"), sources, epoch, augment, self.prepare_options())
        status, value = prepare_medium(*args)
        if status == "quarantined":
            raise Quarantined(value)
        return value

    def prepare_options(self) -> dict:
        """What `prepare_medium` needs besides the medium (picklable: it may run in another process)."""
        enc = self.encoders()
        cfg = enc["cfg"]
        augmented = (self.args.augment_media or self.kinds) if self.args.augment else []
        opts = {"seed": self.args.seed, "augment": [k for k in self.kinds if k in augmented]}
        opts |= {"max_pixels": cfg.max_pixels, "max_audio_seconds": cfg.max_audio_seconds}
        if "image" in enc:
            opts |= {"min_side": enc["image"].clip.image_size, "pixels": enc["image"].pixel_options()}
        return opts

    def encoders(self) -> dict:
        """The frozen encoders of online mode, built on first use from the spec."""
        if self._encoders is None:
            from streamtune.config import DecodeConfig
            from streamtune.decode.tokens import build_encoders, config_from_spec

            media = self._media_cfg
            cfg = media if isinstance(media, DecodeConfig) else config_from_spec(self.spec)
            self._encoders = build_encoders(cfg, self.spec)
        return self._encoders


class OnlineSource:
    """Rows of `dataset` with field ENCODED: their media decoded, augmented and encoded a window of
    `media_batch` rows at a time, up to AHEAD windows ahead of the consumer. State: the loader's state at
    the current window's start and the rows of it already yielded (a resume re-reads that window)."""

    def __init__(self, run: MultimodalRun, dataset, held_out=None):
        self.run, self.dataset, self.held_out = run, dataset, held_out or (lambda row: False)
        self.epoch = 0  # SampleStream's epoch: it calls set_epoch whenever that changes
        self.window = max(1, int(run.args.media_batch))
        run.encoders()  # built here, once, before threads use them
        if run.args.media_workers > 0:  # processes: decoding and augmenting hold the GIL much of the time
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # never fork a process using a GPU
            self.pool = ProcessPoolExecutor(run.args.media_workers, mp_context=context)
        else:
            self.pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="media-prepare")
        self.options = run.prepare_options()
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="media-encode")  # towers: one at a time
        self.skip = 0  # rows of the first window to drop (a resume in the middle of a window)
        self.next_feed: dict | None = None  # the next epoch's windows, begun before that epoch is asked for
        # only loaders that say which epoch they are in can be moved on ahead of the training loop
        self.ahead_epochs = hasattr(dataset, "set_epoch") and hasattr(dataset, "state_dict")
        self.position: tuple | None = None  # (loader state at the window's start, rows yielded of it)
        self.stats = {"windows": 0, "prepare_s": 0.0, "encode_s": 0.0}

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, None
        ahead = self.next_feed
        if ahead is not None and ahead["epoch"] == epoch:  # already begun when the last one ended
            if ahead["pending"]:
                self.position = (ahead["pending"][0][0], 0)
            return
        self.next_feed = None
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        if self.position is None:
            return {"loader": self.dataset.state_dict(), "skip": self.skip}
        return {"loader": self.position[0], "skip": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        if "skip" not in state:  # a checkpoint of a loader read one row at a time
            state = {"loader": state, "skip": 0}
        self.dataset.load_state_dict(state["loader"])
        self.skip, self.position, self.next_feed = int(state["skip"]), None, None

    def _loader_state(self):
        return self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else None

    def _feed(self, epoch: int) -> dict:
        """An epoch's windows in flight: {"epoch", "rows" (the loader's iterator), "pending", "done"}."""
        return {"epoch": epoch, "rows": iter(self.dataset), "pending": deque(), "done": False}

    def _fill(self, feed: dict) -> None:
        while not feed["done"] and len(feed["pending"]) < AHEAD:
            start, window = self._loader_state(), []
            for row in feed["rows"]:
                window.append(row)
                if len(window) == self.window:
                    break
            feed["done"] = len(window) < self.window
            if window:
                feed["pending"].append((start, window, self._submit(window, feed["epoch"])))

    def __iter__(self):
        feed = (
            self.next_feed if self.next_feed is not None and self.next_feed["epoch"] == self.epoch else None
        )
        self.next_feed = None
        feed = feed or self._feed(self.epoch)
        skip, self.skip = self.skip, 0
        while True:
            self._fill(feed)
            if not feed["pending"]:
                return
            start, window, job = feed["pending"].popleft()
            if feed["done"] and not feed["pending"] and self.ahead_epochs:
                # the next epoch's first windows are prepared while this one's last is used
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch + 1)
                self.next_feed = self._feed(self.epoch + 1)
                self._fill(self.next_feed)
            results = job.result()
            for i in range(skip, len(window)):
                self.position = (start, i + 1)
                yield window[i] | {ENCODED: results[i]}
            skip = 0

    def _submit(self, window: list[dict], epoch: int) -> Future:
        run = self.run
        work = []  # (row index, kind, item index, future of the prepared medium)
        plan = {}  # row index -> augment, for the rows whose media are encoded
        for r, row in enumerate(window):
            held = self.held_out(row)
            if held and epoch > 0:
                continue  # neither trained on nor kept: SampleStream never asks for its media
            augment = plan[r] = not held and run.args.augment
            for kind in run.kinds:
                value = row.get(kind)
                items = value if isinstance(value, list) else [] if value is None else [value]
                for j, data in enumerate(items):
                    sources, sid = list(row.get("sources") or []), row.get("sample_id")
                    args = (kind, bytes(data), sid, sources, epoch, augment, self.options)
                    future = self.pool.submit(prepare_medium, *args)
                    work.append((r, kind, j, future))
        return self.encoder.submit(self._encode_window, window, epoch, plan, work)

    def _encode_window(self, window: list[dict], epoch: int, plan: dict, work: list) -> list:
        import time

        t0 = time.perf_counter()
        prepared, failed = {}, {}
        for r, kind, j, future in work:
            status, value = future.result()
            if status == "quarantined":
                failed.setdefault(r, Quarantined(value))  # the row's first failing medium, in kind/item order
            else:
                prepared[r, kind, j] = value
        t1 = time.perf_counter()
        enc = self.run.encoders()
        tokens = {}
        for kind in self.run.kinds:
            keys = [k for k in prepared if k[1] == kind and k[0] not in failed]
            if not keys:
                continue
            inputs = [prepared[k] for k in keys]
            if kind == "image":
                out = enc["image"].encode_tokens(inputs, batch_size=self.window)
            else:
                out = enc["audio"].encode_batch(inputs, batch_size=self.audio_batch())
            tokens.update(zip(keys, out, strict=True))
        self.stats["windows"] += 1
        self.stats["prepare_s"] += t1 - t0
        self.stats["encode_s"] += time.perf_counter() - t1
        results: list = [None] * len(window)  # None: not encoded (media_of would encode it alone)
        for r, augment in plan.items():
            if r in failed:
                results[r] = (epoch, augment, failed[r])
                continue
            media = {kind: [] for kind in self.run.kinds}
            for k in sorted(k for k in tokens if k[0] == r):
                media[k[1]].append(tokens[k])
            results[r] = (epoch, augment, media)
        return results

    def audio_batch(self) -> int:
        # on the CPU one clip per call costs least (no padding to the longest); a GPU wants batches
        return self.window if mx.default_device().type == mx.gpu else 1

    def __del__(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.encoder.shutdown(wait=False, cancel_futures=True)


def _local(url: str, storage_options):
    """A context manager yielding a local path of `url` (downloaded to a temporary file if remote)."""
    import contextlib
    import tempfile

    from streamtune import storage

    @contextlib.contextmanager
    def opened():
        if "://" not in url or url.startswith("file://"):
            yield url.removeprefix("file://")
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(url))
            with open(path, "wb") as f:
                f.write(storage.read_bytes(url, storage_options))
            yield path

    return opened()


def save_multimodal(model: nn.Module, folder: str) -> None:
    """projector.safetensors + multimodal.json next to the adapter files."""
    save_projector(model, folder, json.loads(model.projectors.meta_json))


def gather_records(records: list[dict], group) -> list[dict]:
    """Every rank's quarantine records (a collective: all ranks call it), sorted by sample id."""
    if group.size() > 1:
        data = np.frombuffer(json.dumps(records).encode(), np.uint8)
        sizes = mx.distributed.all_gather(mx.array([data.size]), group=group).tolist()
        padded = np.zeros(max(sizes), np.uint8)
        padded[: data.size] = data
        gathered = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
        records = [r for i in range(group.size()) for r in json.loads(gathered[i, : sizes[i]].tobytes())]
    return sorted(records, key=lambda r: str(r.get("sample_id")))
