"""Turn decoded record batches into Python rows cheaply.

Binary and string values are sliced out of the Arrow buffers only when their row is yielded, so a
fetched range costs its own bytes in memory and nothing more; small columns are converted per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

Getter = Callable[[int], object]


def _varlen_getter(arr: pa.Array, as_text: bool, zero_copy: bool = False) -> Getter:
    large = pa.types.is_large_binary(arr.type) or pa.types.is_large_string(arr.type)
    _, offsets_buf, data_buf = arr.buffers()
    width = 8 if large else 4
    offsets = np.frombuffer(
        offsets_buf, dtype=np.int64 if large else np.int32, count=len(arr) + 1, offset=arr.offset * width
    ).tolist()
    data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
    valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False).tolist()
    if as_text:
        convert = lambda view: str(view, "utf-8")  # noqa: E731
    elif zero_copy:
        convert = lambda view: view  # noqa: E731
    else:
        convert = bytes

    def get(i: int) -> object:
        if valid is not None and not valid[i]:
            return None
        return convert(data[offsets[i] : offsets[i + 1]])

    return get


def _tensor_getter(arr: pa.FixedSizeListArray) -> Getter:
    width = arr.type.list_size
    values = arr.flatten() if arr.offset == 0 else arr.slice(0).flatten()
    matrix = values.to_numpy(zero_copy_only=False).reshape(-1, width)
    valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False).tolist()

    def get(i: int) -> object:
        if valid is not None and not valid[i]:
            return None
        return matrix[i].copy()

    return get


def _ragged_tensor_getter(arr: pa.ListArray) -> Getter:
    """list<fixed_size_list<number, width>>: row i is a (n_i, width) array (e.g. encoder tokens)."""
    width = arr.type.value_type.list_size
    offsets = arr.offsets.to_numpy()
    matrix = arr.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False).tolist()

    def get(i: int) -> object:
        if valid is not None and not valid[i]:
            return None
        return matrix[offsets[i] : offsets[i + 1]].copy()

    return get


def _is_ragged_tensor(t: pa.DataType, arr: pa.Array) -> bool:
    if not (pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type)):
        return False
    inner = t.value_type.value_type
    return (pa.types.is_floating(inner) or pa.types.is_integer(inner)) and arr.values.values.null_count == 0


def _none(i: int) -> None:
    return None


def column_getter(arr: pa.Array, zero_copy: bool = False) -> Getter:
    t = arr.type
    # An all-null column (no video or references in a batch of audio rows) allocates nothing: a validity
    # array would be the consumer's first allocation from Arrow's pool, ~30 MB of allocator arenas in RSS.
    if len(arr) and arr.null_count == len(arr):
        return _none
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _varlen_getter(arr, as_text=False, zero_copy=zero_copy)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _varlen_getter(arr, as_text=True)
    if pa.types.is_fixed_size_list(t) and (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    ):
        if arr.values.null_count == 0:
            return _tensor_getter(arr)
    if _is_ragged_tensor(t, arr):
        return _ragged_tensor_getter(arr)
    return arr.to_pylist().__getitem__


class RangeRows:
    """Rows of one fetched range (one or more record batches), addressed by row number in the range."""

    def __init__(
        self,
        batches: list[pa.RecordBatch],
        columns: list[str],
        zero_copy: bool = False,
        release: Callable[[], None] | None = None,
    ):
        self.columns = columns
        self._release = release
        self.zero_copy = zero_copy
        self.nbytes = sum(b.nbytes for b in batches)
        self._batches = batches
        self._starts = np.cumsum([0] + [b.num_rows for b in batches]).tolist()
        self._getters: list[list[Getter] | None] = [None] * len(batches)

    def _batch_getters(self, k: int) -> list[Getter]:
        getters = self._getters[k]
        if getters is None:
            batch = self._batches[k]
            getters = [column_getter(batch.column(name), self.zero_copy) for name in self.columns]
            self._getters[k] = getters
        return getters

    def row(self, i: int) -> dict:
        k = 0
        if len(self._starts) > 2:
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
        getters = self._batch_getters(k)
        j = i - self._starts[k]
        return {name: get(j) for name, get in zip(self.columns, getters, strict=True)}

    def close(self) -> None:
        """Drop the batches and hand the range buffer back; no row may be read afterwards."""
        self._batches, self._getters = [], []
        if self._release is not None:
            release, self._release = self._release, None
            release()
