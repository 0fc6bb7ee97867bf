"""The global sample order, computed from index.json alone.

Units of fetching are *ranges*: runs of neighbouring record batches of one shard, coalesced up to
`range_bytes`. For an epoch:

1. shards are permuted by (seed, epoch) when shuffling;
2. ranges of every `shuffle_shards` consecutive shards are interleaved round-robin, so neighbouring
   ranges come from different shards;
3. the resulting sample sequence is cut into contiguous partitions (rank, then worker), so every sample
   lands in exactly one partition and each partition fetches only its own ranges (plus at most two
   shared edge ranges);
4. inside a partition, consecutive ranges are grouped into blocks of at most `block_bytes` and samples
   are shuffled within each block (block shuffle): memory stays bounded by one block while the stream
   mixes samples from many shards. Block sizes ramp up (one range, then doubling) so the first sample
   of an epoch only waits for one range.

Everything is a pure function of the index and these parameters, so a position in the order is all the
state a resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Ranges:
    shard: np.ndarray  # (R,) shard position in the index
    offset: np.ndarray  # (R,) byte offset in the shard file
    length: np.ndarray  # (R,) bytes
    first: np.ndarray  # (R,) global id of the range's first sample
    rows: np.ndarray  # (R,)
    batches: list[list[dict]]  # index batch entries of each range
    shard_ranges: list[np.ndarray]  # range ids of each shard, in file order
    memory: np.ndarray  # (R,) bytes a loaded range holds: fetched bytes, or more if batches decompress

    @property
    def total_rows(self) -> int:
        return int(self.rows.sum())

    def range_of(self, samples: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, samples, side="right") - 1


def build_ranges(shards: list[dict], range_bytes: int) -> Ranges:
    """Coalesce each shard's adjacent batches into ranges of at most `range_bytes` (one batch at least)."""
    shard, offset, length, first, rows, batches, shard_ranges = [], [], [], [], [], [], []
    sample = 0
    for s, entry in enumerate(shards):
        ids = []
        run: list[dict] = []
        for b in entry["batches"]:
            if run and (
                b["offset"] != run[-1]["offset"] + run[-1]["length"]
                or b["offset"] + b["length"] - run[0]["offset"] > range_bytes
            ):
                ids.append(len(shard))
                sample = _add(run, s, sample, shard, offset, length, first, rows, batches)
                run = []
            run.append(b)
        if run:
            ids.append(len(shard))
            sample = _add(run, s, sample, shard, offset, length, first, rows, batches)
        shard_ranges.append(np.asarray(ids, dtype=np.int64))
    as64 = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    memory = [
        max(n, sum(int(b.get("nbytes", b["length"])) for b in run))
        for n, run in zip(length, batches, strict=True)
    ]
    return Ranges(
        as64(shard), as64(offset), as64(length), as64(first), as64(rows), batches, shard_ranges, as64(memory)
    )


def _add(run, s, sample, shard, offset, length, first, rows, batches) -> int:
    n = sum(int(b["rows"]) for b in run)
    shard.append(s)
    offset.append(run[0]["offset"])
    length.append(run[-1]["offset"] + run[-1]["length"] - run[0]["offset"])
    first.append(sample)
    rows.append(n)
    batches.append(run)
    return sample + n


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def range_sequence(ranges: Ranges, seed: int, epoch: int, shuffle: bool, shuffle_shards: int) -> np.ndarray:
    """Range ids in the epoch's (pre-partition) order."""
    n_shards = len(ranges.shard_ranges)
    if not shuffle:
        return np.concatenate(ranges.shard_ranges) if n_shards else np.zeros(0, np.int64)
    order = _rng(seed, epoch, 0).permutation(n_shards)
    seq = []
    for w in range(0, n_shards, max(1, shuffle_shards)):
        group = [ranges.shard_ranges[s] for s in order[w : w + shuffle_shards]]
        depth = max((len(g) for g in group), default=0)
        for k in range(depth):
            seq.extend(int(g[k]) for g in group if k < len(g))
    return np.asarray(seq, dtype=np.int64)


def expand(ranges: Ranges, seq: np.ndarray) -> np.ndarray:
    """Global sample ids of the ranges in `seq`, each range's rows in file order."""
    counts = ranges.rows[seq]
    total = int(counts.sum())
    starts = np.repeat(ranges.first[seq], counts)
    run_base = np.repeat(np.cumsum(counts) - counts, counts)
    return starts + (np.arange(total, dtype=np.int64) - run_base)


def partition_bounds(total: int, parts: list[tuple[int, int]]) -> tuple[int, int]:
    """[lo, hi) of nested contiguous partitions, e.g. [(rank, world_size), (worker_id, num_workers)]."""
    lo, hi = 0, total
    for i, n in parts:
        if not 0 <= i < n:
            raise ValueError(f"partition {i} is out of range for {n} partitions")
        size = hi - lo
        lo, hi = lo + size * i // n, lo + size * (i + 1) // n
    return lo, hi


def block_shuffle(
    ranges: Ranges, samples: np.ndarray, block_bytes: int, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle samples within blocks of consecutive ranges holding at most `block_bytes` (one range at least)."""
    if len(samples) == 0:
        return samples
    rid = ranges.range_of(samples)
    change = np.flatnonzero(np.diff(rid)) + 1
    run_start = np.concatenate([[0], change])
    run_bytes = ranges.memory[rid[run_start]]
    block_of_run = np.zeros(len(run_start), dtype=np.int64)
    block, acc = 0, 0
    limit = min(block_bytes, int(run_bytes[0]))  # ramp: the first samples wait for one range, not a block
    for i, nbytes in enumerate(run_bytes.tolist()):
        if acc and acc + nbytes > limit:
            block, acc = block + 1, 0
            limit = min(block_bytes, limit * 2)
        acc += nbytes
        block_of_run[i] = block
    run_len = np.diff(np.concatenate([run_start, [len(samples)]]))
    block_of_sample = np.repeat(block_of_run, run_len)
    return samples[np.lexsort((rng.random(len(samples)), block_of_sample))]


def epoch_order(
    ranges: Ranges,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    parts: list[tuple[int, int]],
    shuffle_shards: int,
    block_bytes: int,
) -> np.ndarray:
    """Global sample ids of one partition for one epoch, in the order they are yielded."""
    seq = range_sequence(ranges, seed, epoch, shuffle, shuffle_shards)
    samples = expand(ranges, seq)
    lo, hi = partition_bounds(len(samples), parts)
    mine = samples[lo:hi]
    if shuffle:
        mine = block_shuffle(ranges, mine, block_bytes, _rng(seed, epoch, 1, lo))
    return mine


def need_order(ranges: Ranges, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(range ids by first use, uses left per range id, range id per position) for the rest of an order."""
    rid = ranges.range_of(order)
    uniq, first_pos, counts = np.unique(rid, return_index=True, return_counts=True)
    by_use = np.argsort(first_pos, kind="stable")
    return uniq[by_use], dict(zip(uniq.tolist(), counts.tolist(), strict=True)), rid
