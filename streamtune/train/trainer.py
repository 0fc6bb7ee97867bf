"""The fine-tuning loop: LoRA/DoRA/full on an mlx-lm model, fed by a (streaming) dataset of feature rows.

Per optimizer step: `grad_accum` packed micro-batches, gradients of the summed token loss accumulated and
divided by the number of completion tokens (across processes under `mx.distributed`), one AdamW update.
Checkpoints hold everything needed to continue bit-for-bit: trainable weights, optimizer state, step,
the data loader's `state_dict`, and samples already read but not yet trained on. Dropout draws from an
RNG reseeded from (seed, step) every step, so it needs no saved state.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import xxhash
from mlx.utils import tree_flatten, tree_map

from streamtune import cpu_ops
from streamtune.accel import default_dtype
from streamtune.config import TrainArgs
from streamtune.train import adapters, checkpoint
from streamtune.train.data import (
    SKIPPED,
    Batch,
    ListSource,
    Packer,
    encode_sample,
    padded_batch,
    peek,
    sample_from_json,
    sample_to_json,
)
from streamtune.train.formats import record_options
from streamtune.train.forward import loss_at, supports_packing
from streamtune.train.models import load_base
from streamtune.train.multimodal import norm_weights


def peak_memory_mb() -> float:
    try:
        gpu = mx.get_peak_memory()
    except AttributeError:
        gpu = 0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(gpu / 2**20, rss_kb / 1024)


def _schedule(args: TrainArgs):
    if args.lr_schedule == "constant":
        main = args.lr
    elif args.lr_schedule == "cosine":
        main = optim.cosine_decay(args.lr, max(args.iters - args.warmup, 1), args.lr * args.min_lr_ratio)
    else:
        raise ValueError(f"unknown lr_schedule {args.lr_schedule!r}")
    if args.warmup <= 0:
        return main
    warm = optim.linear_schedule(args.lr / args.warmup, args.lr, args.warmup)
    if not callable(main):
        main = optim.linear_schedule(args.lr, args.lr, 1)
    return optim.join_schedules([warm, main], [args.warmup])


def validate(args: TrainArgs) -> None:
    for name in ("batch_size", "grad_accum", "rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {args.seq_len}")
    if args.iters < 0 or args.lr <= 0:
        raise ValueError("iters must be >= 0 and lr > 0")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.fine_tune_type not in ("lora", "dora", "full"):
        raise ValueError(f"fine_tune_type must be lora, dora or full, got {args.fine_tune_type!r}")
    if args.init_adapter and args.fine_tune_type == "full":
        raise ValueError("init_adapter needs adapters (fine_tune_type lora or dora)")


def setup_model(args: TrainArgs):
    """Base model with adapters applied and everything but the adapters frozen."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if args.fine_tune_type not in ("lora", "dora", "full"):
        raise ValueError(f"fine_tune_type must be lora, dora or full, got {args.fine_tune_type!r}")
    if args.qlora and args.fine_tune_type == "full":
        raise ValueError("full fine-tuning needs an unquantized base (drop qlora)")
    model, tokenizer, config = load_base(
        args.model,
        quantize=args.quantize_bits if args.qlora else None,
        dequantize=not args.qlora,
        dtype=args.dtype,
    )
    mx.random.seed(args.seed)
    if args.fine_tune_type == "full":
        model.unfreeze()
    else:
        model.freeze()
        linear_to_lora_layers(
            model, args.num_layers, lora_parameters(args), use_dora=args.fine_tune_type == "dora"
        )
    mx.eval(model.parameters())
    return model, tokenizer, config


def lora_parameters(args: TrainArgs) -> dict:
    params = {"rank": args.rank, "scale": args.scale, "dropout": args.dropout}
    if args.lora_keys:
        params["keys"] = list(args.lora_keys)
    return params


def adapter_config(args: TrainArgs, config: dict) -> dict:
    return {
        "fine_tune_type": args.fine_tune_type,
        "num_layers": args.num_layers,
        "lora_parameters": lora_parameters(args),
        "model": args.model,
        "qlora": args.qlora,
        "quantize_bits": args.quantize_bits if args.qlora else None,
        "base_model_type": config.get("model_type"),
        "seq_len": args.seq_len,
    }


def save_adapter(model: nn.Module, path: str, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    if hasattr(model, "projectors"):  # multimodal: the LM's adapter here, the projectors in their own file
        from streamtune.train.mm_train import adapter_names, save_multimodal

        everything = dict(tree_flatten(model.parameters()))
        weights = {k: everything[k] for k in adapter_names(model, config["fine_tune_type"])}
        save_multimodal(model, path)
    tmp = os.path.join(path, "adapters.safetensors.tmp.safetensors")
    mx.save_safetensors(tmp, weights, metadata={"format": "mlx"})
    os.replace(tmp, os.path.join(path, "adapters.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


class SampleStream:
    """Feature rows -> encoded (ids, prompt_len) samples over epochs, with a held-out split."""

    def __init__(self, dataset, tokenizer, args: TrainArgs, rank: int, world: int, media=None):
        if isinstance(dataset, list | tuple):
            dataset = ListSource(list(dataset))
        if world > 1 and getattr(dataset, "world_size", 1) != world:
            if not isinstance(dataset, ListSource):
                raise ValueError(
                    f"distributed training over {world} processes needs a dataset partitioned per rank "
                    "(CloudStreamingDataset(rank=..., world_size=...)) or a list"
                )
            dataset = ListSource(dataset.rows[rank::world], shuffle=dataset.shuffle, seed=dataset.seed)
        self.dataset = self.rows = dataset
        self.tokenizer = tokenizer
        self.args = args
        self.epoch = 0
        self.iterator = None
        self.yielded_this_epoch = 0
        self.val: list[tuple] = []
        self.skipped = 0
        self.media = media  # mm_train.MultimodalRun: rows -> samples with soft tokens
        if media is not None:  # online: media encoded ahead in windows
            self.dataset = media.source(self.dataset, self._held_out)
        self.quarantined: list[dict] = []

    def _is_val(self, row: dict, pair: tuple[str, str]) -> bool:
        if self.args.val_fraction <= 0:
            return False
        key = str(row.get("sample_id") or pair[0] + pair[1])
        return (
            xxhash.xxh64_intdigest(key.encode(), seed=self.args.seed) % 10_000
            < self.args.val_fraction * 10_000
        )

    def _held_out(self, row: dict) -> bool:
        return bool(row.get("sample_id")) and self._is_val(row, ("", ""))

    def pull(self) -> tuple[list[int], int] | None:
        while True:
            if self.iterator is None:
                if self.args.epochs is not None and self.epoch >= self.args.epochs:
                    return None
                self.iterator = iter(self.dataset)
            row = next(self.iterator, None)
            if row is None:
                if self.yielded_this_epoch == 0:
                    raise ValueError("the dataset yielded no trainable rows in a whole epoch")
                self.epoch += 1
                self.yielded_this_epoch = 0
                self.iterator = None
                if hasattr(self.dataset, "set_epoch") and (
                    self.args.epochs is None or self.epoch < self.args.epochs
                ):
                    self.dataset.set_epoch(self.epoch)
                continue
            # samples are cut to the attention window, if any, so that attending over 2 windows is exact
            longest = min(self.args.seq_len, self.args.attention_window or self.args.seq_len)
            found = self._encode(row, longest)
            if found is SKIPPED:  # quarantined: skipped the same way whatever the number of processes
                return SKIPPED
            if found is None:
                self.skipped += 1
                continue
            pair, sample = found
            if self._is_val(row, pair):
                if self.epoch == 0 and len(self.val) < self.args.max_val_samples:
                    self.val.append(sample)
                continue
            self.yielded_this_epoch += 1
            return sample

    def _encode(self, row: dict, longest: int):
        if self.media is None:
            return encode_sample(
                row,
                self.tokenizer,
                seq_len=longest,
                template=self.args.template,
                records=record_options(self.args),
            )
        from streamtune.train.mm_train import Quarantined

        held_out = self._held_out(row)
        if held_out and (self.epoch > 0 or len(self.val) >= self.args.max_val_samples):
            return None  # not trained on and not kept: no need to encode its media
        try:
            return self.media.encode_row(row, longest, self.epoch, augment=not held_out)
        except Quarantined as q:
            if all(r["sample_id"] != q.record["sample_id"] for r in self.quarantined):
                self.quarantined.append(q.record)
            return SKIPPED

    def state_dict(self) -> dict:
        if not hasattr(self.dataset, "state_dict"):
            raise ValueError("checkpointing needs a dataset with state_dict()/load_state_dict()")
        state = {
            "epoch": self.epoch,
            "yielded_this_epoch": self.yielded_this_epoch,
            "loader": self.dataset.state_dict(),
            "val": [sample_to_json(s) for s in self.val],
        }
        if self.media is not None:
            state["quarantined"] = self.quarantined
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.yielded_this_epoch = state["yielded_this_epoch"]
        self.val = [sample_from_json(s) for s in state["val"]]
        self.quarantined = list(state.get("quarantined", []))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self.dataset.load_state_dict(state["loader"])
        self.iterator = None


def _arrays(batch: Batch) -> tuple[mx.array, ...]:
    """Inputs of `loss_at`: the rows, and the flat positions where the loss counts with their targets and
    weights, padded (weight 0) to a multiple of 1/8 of the batch so a compiled step meets at most 8 shapes."""
    weights = batch.loss_mask.reshape(-1)
    where = np.flatnonzero(weights)
    step = max(weights.size // 8, 1)
    size = min(weights.size, -(-max(len(where), 1) // step) * step)
    index = np.zeros(size, np.int32)
    index[: len(where)] = where
    return (
        mx.array(batch.inputs),
        mx.array(batch.positions),
        mx.array(batch.segments),
        mx.array(index),
        mx.array(batch.targets.reshape(-1)[index]),
        mx.array(np.where(np.arange(size) < len(where), weights[index], 0).astype(np.float32)),
    )


def _average(g: mx.array, world: int, count: int) -> mx.array:
    return _all_sum(g, world) / max(count, 1)


def _all_sum(x, world: int):
    return mx.distributed.all_sum(x) if world > 1 else x


def train(
    args: TrainArgs,
    dataset: Iterable[dict],
    *,
    on_step: Callable[[dict], None] | None = None,
    model_bundle: tuple | None = None,
    media=None,
) -> dict:
    """Train adapters on `dataset` (feature rows; streamed, never materialised) and save them to
    `args.adapter_path`. `model_bundle` = (model, tokenizer, config) from `setup_model` skips loading.
    With `args.stage` align or instruct the model also sees images and audio through projectors
    (`streamtune.train.mm_train`): `media` names the encoders (a DecodeConfig, needed for
    `media_source: online`, or a spec dict); cached encoder tokens name them in the feature index."""
    validate(args)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if args.batch_size % world:
        raise ValueError(f"batch_size {args.batch_size} is not divisible by {world} processes")
    if args.resume and checkpoint.latest(args.checkpoint_dir, args.storage_options) is None:
        raise ValueError(f"nothing to resume from: no checkpoint at {args.checkpoint_dir}")
    model, tokenizer, config = model_bundle or setup_model(args)
    mm = None
    if args.stage != "text":
        from streamtune.train.mm_train import MultimodalRun, find_spec

        mm = MultimodalRun(args, model, tokenizer, find_spec(args, dataset, media), media)
    on_gpu = default_dtype() != "float32"
    additive = on_gpu if args.additive_mask is None else args.additive_mask
    packed = args.packing and supports_packing(model)
    rows = args.batch_size // world
    stream = SampleStream(dataset, tokenizer, args, rank, world, mm)
    # A checkpoint must hold the loader's position: datasets that cannot report one are not checkpointed.
    checkpointing = bool(args.save_every) and hasattr(stream.dataset, "state_dict")
    if args.save_every and not checkpointing:
        warnings.warn(f"no checkpoints: {type(stream.dataset).__name__} has no state_dict()", stacklevel=2)
    packer = Packer(rows, args.seq_len)

    schedule = _schedule(args)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    if mm is not None:
        projector_schedule = _schedule(args.model_copy(update={"lr": args.projector_lr}))
        media_schedules = {k: _schedule(args.model_copy(update={"lr": v})) for k, v in args.media_lr.items()}
        optimizer = mm.optimizer(schedule, projector_schedule, media_schedules)
    optimizer.init(model.trainable_parameters())
    step, losses, history, resumed_from = 0, [], [], None
    warm_projectors = False
    offset = 0  # steps the starting adapter was trained for, so a warm start continues the global count
    if args.resume:
        params, opt_state, state = checkpoint.load(args.checkpoint_dir, args.storage_options)
        model.load_weights(list(params.items()), strict=False)
        optimizer.state = opt_state
        if len(state["stream"]) != world:
            raise ValueError(f"checkpoint was written by {len(state['stream'])} processes, not {world}")
        stream.load_state_dict(state["stream"][rank])
        packer.load_state_dict(state["packer"][rank])
        step, losses = state["step"], state["losses"]
        offset = state.get("step_offset", 0)
        resumed_from = step
        mx.eval(model.parameters(), optimizer.state)
    elif args.init_adapter:
        weights = adapters.read_weights(args.init_adapter, args.storage_options)
        if weights is None:
            raise ValueError(f"init_adapter: no adapters.safetensors at {args.init_adapter}")
        model.load_weights(list(weights.items()), strict=False)
        if mm is not None:
            warm_projectors = mm.load_init(model, args.init_adapter, args.storage_options)
        mx.eval(model.parameters())
        offset = int(
            (adapters.read_config(args.init_adapter, args.storage_options) or {}).get("global_step", 0)
        )

    fit = args.projector_norm or args.projector_whiten is not None
    if mm is not None and fit and not args.resume and not warm_projectors:
        rows = [r for r in peek(stream.rows, args.projector_norm_samples) if not stream._held_out(r)]
        mm.fit_norm(model, rows, world)

    def compute(inputs, positions, segments, index, targets, weights, *soft):
        return loss_at(
            model,
            inputs,
            positions,
            segments,
            index,
            targets,
            weights,
            packed,
            args.grad_checkpoint,
            args.attention_window,
            additive,
            soft or None,
        )

    value_and_grad = nn.value_and_grad(model, compute)
    if args.grad_checkpoint and not packed:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    if args.compile or (args.compile is None and on_gpu):
        state = [model.state, mx.random.state]
        compiled = partial(mx.compile, inputs=state, outputs=state)(value_and_grad)

        def value_and_grad(*a):  # a trace cannot evaluate arrays midway, as the numpy CPU ops do
            with cpu_ops.enabled(False):
                return compiled(*a)

    def make_batch() -> Batch | None:
        if packed:
            return packer.next_batch(stream.pull)
        return padded_batch(stream.pull, rows, args.seq_len)

    def snapshot() -> str | None:
        # loader + packer position right after a batch: what a checkpoint after that batch must hold
        if not checkpointing:
            return None
        return json.dumps({"stream": stream.state_dict(), "packer": packer.state_dict()})

    batches = BatchPrefetcher(make_batch, snapshot, args.prefetch)
    resume_state = None

    bar = None
    if args.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=args.iters, initial=step, desc="train", unit="step")

    model.train()
    tokens_total = samples_total = 0
    timed_tokens, timed_seconds = 0, 0.0
    shapes_seen: set[tuple] = set()  # a compiled step traces and compiles once per input shape
    first_loss = losses[0] if losses else None
    start = time.perf_counter()
    while step < args.iters:
        t0 = time.perf_counter()
        mx.random.seed(args.seed * 1_000_003 + step)
        grads, loss_acc, count, tokens, samples, slots = None, mx.array(0.0), 0, 0, 0, 0
        wait, new_shape = 0.0, False
        for _ in range(args.grad_accum):
            w0 = time.perf_counter()
            batch, resume_state = batches.next()
            wait += time.perf_counter() - w0
            if batch is None:
                break
            arrays = _arrays(batch) + (mm.soft(batch) if mm else ())
            shape = tuple(a.shape for a in arrays)
            new_shape |= shape not in shapes_seen
            shapes_seen.add(shape)
            lvalue, g = value_and_grad(*arrays)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_acc = loss_acc + lvalue
            count += batch.targets_count
            tokens += batch.tokens
            samples += batch.samples
            slots += batch.inputs.size
            mx.eval(grads, loss_acc)
        if grads is None:
            break
        totals = _all_sum(mx.array([count, tokens, samples, slots], dtype=mx.float32), world)
        count, tokens, samples, slots = (int(v) for v in totals.tolist())
        grads = tree_map(partial(_average, world=world, count=count), grads)
        loss_acc = _all_sum(loss_acc, world)
        lr = float(schedule(mx.array(step))) if callable(schedule) else schedule
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss_acc)
        step += 1
        loss = loss_acc.item() / max(count, 1)
        losses.append(loss)
        first_loss = losses[0]
        dt = time.perf_counter() - t0
        if not new_shape:
            timed_tokens += tokens
            timed_seconds += dt
        tokens_total += tokens
        samples_total += samples
        metrics = {
            "step": step,
            "global_step": offset + step,
            "loss": loss,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "pad_fraction": 1 - tokens / max(slots, 1),
            "samples": samples,
            "epoch": stream.epoch,
            "peak_mem_mb": peak_memory_mb(),
            "seconds": dt,
            "data_wait_s": wait,  # of `seconds`, spent waiting for the batch (the data path fell behind)
            "new_shape": new_shape,  # first step at this batch shape: includes tracing (and compiling)
        }
        if mm is not None:
            p_lr = projector_schedule
            metrics["projector_lr"] = float(p_lr(mx.array(step - 1))) if callable(p_lr) else p_lr
        if args.eval_every and step % args.eval_every == 0 and (stream.val or world > 1):
            metrics["val_loss"] = evaluate(model, stream.val, args, packed, world, mm)
        history.append(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if on_step is not None and rank == 0:
            on_step(metrics)
        if checkpointing and step % args.save_every == 0:
            _save_checkpoint(args, model, optimizer, resume_state, step, losses, group, step_offset=offset)
    batches.close()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if rank == 0:
        done = adapter_config(args, config) | {"global_step": offset + step}
        save_adapter(model, adapters.local_dir(args.adapter_dir), done)
        adapters.upload(adapters.local_dir(args.adapter_dir), args.adapter_dir, args.storage_options)
    final_val = evaluate(model, stream.val, args, packed, world, mm) if stream.val or world > 1 else None
    quarantined = []
    if mm is not None:
        from streamtune.train.mm_train import gather_records

        quarantined = gather_records(stream.quarantined, group)
        if rank == 0 and quarantined:
            from streamtune import quarantine as quarantine_table
            from streamtune.storage import join

            url = join(args.adapter_dir, "quarantine.parquet")
            quarantine_table.write_quarantine(url, quarantined, args.storage_options)
    return {
        "steps": step,
        "global_step": offset + step,
        "loss_first": first_loss,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "val_loss": final_val,
        "tokens": tokens_total,
        "samples": samples_total,
        "tokens_per_s": timed_tokens / timed_seconds
        if timed_seconds
        else (tokens_total / seconds if seconds else 0),
        "adapter_path": args.adapter_dir,
        "resumed_from_step": resumed_from,
        "peak_mem_mb": peak_memory_mb(),
        "seconds": seconds,
        "packed": packed,
        "world_size": world,
        "skipped_rows": stream.skipped,
        "quarantined": quarantined,
        "stage": args.stage,
        "history": history,
        "args": args.settings(),
    }


class BatchPrefetcher:
    """Prepares training batches (read, tokenize, pack) in a thread while the device computes. Each batch
    comes with the loader/packer state right after it, so checkpoints stay exact. (Not the range fetcher
    `streamtune.stream.prefetch.Prefetcher`, which reads shard bytes ahead under a byte budget.)"""

    def __init__(self, make: Callable[[], Batch | None], snapshot: Callable[[], str | None], depth: int):
        self.make, self.snapshot, self.depth = make, snapshot, depth
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
            self.thread.start()

    def _produce(self):
        batch = self.make()
        return batch, self.snapshot()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._produce()
            except BaseException as exc:  # surfaced in the training thread
                item = exc
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException) or item[0] is None:
                return

    def next(self) -> tuple[Batch | None, str | None]:
        if self.thread is None:
            return self._produce()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item[0] is None:
            self.queue.put(item)  # stay exhausted
        return item

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def evaluate(model: nn.Module, samples: list[tuple], args: TrainArgs, packed: bool, world: int, mm=None):
    """Mean completion-token loss over held-out samples."""
    if not samples and world == 1:
        return None
    model.eval()
    total, count = mx.array(0.0), 0
    pending = deque(samples)
    packer = Packer(max(args.batch_size // world, 1), args.seq_len)

    def pull():
        return pending.popleft() if pending else None

    while True:
        batch = packer.next_batch(pull) if packed else padded_batch(pull, packer.rows, args.seq_len)
        if batch is None:
            break
        total = total + loss_at(
            model,
            *_arrays(batch),
            soft=mm.soft(batch) if mm else None,
            packed=packed,
            window=args.attention_window,
            additive_mask=default_dtype() != "float32" if args.additive_mask is None else args.additive_mask,
        )
        count += batch.targets_count
    totals = _all_sum(mx.concatenate([total.reshape(1), mx.array([float(count)])]), world)
    model.train()
    # every rank takes part in the sums, also one whose held-out share is empty
    return totals[0].item() / totals[1].item() if totals[1].item() else None


def _save_checkpoint(args, model, optimizer, local: str, step, losses, group, step_offset: int = 0):
    world = group.size()
    if world > 1:
        # gather every rank's loader/packer state on rank 0 as bytes
        data = np.frombuffer(local.encode(), dtype=np.uint8)
        sizes = mx.distributed.all_gather(mx.array([data.size]), group=group).tolist()
        padded = np.zeros(max(sizes), np.uint8)
        padded[: data.size] = data
        gathered = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
        states = [json.loads(gathered[i, : sizes[i]].tobytes()) for i in range(world)]
    else:
        states = [json.loads(local)]
    if group.rank() == 0:
        checkpoint.save(
            args.checkpoint_dir,
            step,
            params=dict(tree_flatten(model.trainable_parameters())) | norm_weights(model),
            optimizer_state=optimizer.state,
            state={
                "stream": [s["stream"] for s in states],
                "packer": [s["packer"] for s in states],
                "losses": losses,
                "step_offset": step_offset,
                "rng": {"seed": args.seed, "rule": "seed * 1000003 + step"},
            },
            storage_options=args.storage_options,
            keep=args.keep_checkpoints,
        )
    if world > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # barrier: checkpoint committed
