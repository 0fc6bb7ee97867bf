"""Per-column buffer compression for Arrow IPC files.

Arrow's writer compresses every buffer of a record batch with one codec, but the format lets each
buffer opt out (an uncompressed-length prefix of -1 means "stored as is"), which every Arrow reader
honours. `write_mixed_file` uses that: text/JSON/list columns are compressed, media columns are stored
raw, and nothing spends time compressing JPEG or FLAC bytes.

How: pyarrow writes a *template* file in which media columns are replaced by empty values of the same
length and validity (so node and buffer lists are identical, and compressing it is cheap); each batch
body is then rebuilt from the template's compressed buffers (non-media columns) and the real batch's raw
buffers (media columns), and the buffer offsets/lengths in the message and footer flatbuffers are
patched in place (they are fixed-size structs, so sizes never change).
"""

from __future__ import annotations

import struct

import pyarrow as pa
import pyarrow.compute as pc

_CONTINUATION = b"\xff\xff\xff\xff"
_MAGIC = b"ARROW1"


# --- minimal flatbuffer reading -------------------------------------------------------------------


def _u32(b, pos: int) -> int:
    return struct.unpack_from("<I", b, pos)[0]


def _field(b, table: int, index: int) -> int | None:
    """Absolute position of field `index` of the table at `table`, or None when absent."""
    vtable = table - struct.unpack_from("<i", b, table)[0]
    vt_size = struct.unpack_from("<H", b, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vt_size:
        return None
    off = struct.unpack_from("<H", b, vtable + slot)[0]
    return table + off if off else None


def _deref(b, pos: int) -> int:
    return pos + _u32(b, pos)


def _vector(b, table: int, index: int) -> tuple[int, int]:
    """(start of elements, count) of a vector field."""
    pos = _field(b, table, index)
    if pos is None:
        return 0, 0
    vec = _deref(b, pos)
    return vec + 4, _u32(b, vec)


def _message_parts(meta: memoryview) -> tuple[int, list[tuple[int, int]], int]:
    """(position of bodyLength, [(offset, length) of buffers], position of the buffers vector)."""
    root = _deref(meta, 0)
    body_len_pos = _field(meta, root, 3)
    header = _deref(meta, _field(meta, root, 2))
    start, count = _vector(meta, header, 2)
    buffers = [struct.unpack_from("<qq", meta, start + 16 * i) for i in range(count)]
    return body_len_pos, buffers, start


# --- messages --------------------------------------------------------------------------------------


def _split_messages(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """An IPC file -> (magic + schema message, [(prefix + metadata, body)] per batch, footer flatbuffer)."""
    view = memoryview(data)
    pos = 8
    head_end = None
    batches = []
    while True:
        if bytes(view[pos : pos + 4]) != _CONTINUATION:
            raise ValueError("unexpected IPC layout")
        meta_len = struct.unpack_from("<i", view, pos + 4)[0]
        if meta_len == 0:
            pos += 8
            break
        meta = view[pos + 8 : pos + 8 + meta_len]
        root = _deref(meta, 0)
        header_type = meta[_field(meta, root, 1)] if _field(meta, root, 1) is not None else 0
        body_len_pos = _field(meta, root, 3)
        body_len = struct.unpack_from("<q", meta, body_len_pos)[0] if body_len_pos is not None else 0
        end = pos + 8 + meta_len + body_len
        if header_type == 1:  # Schema
            head_end = end
        elif header_type == 3:  # RecordBatch
            batches.append((bytes(view[pos : pos + 8 + meta_len]), bytes(view[pos + 8 + meta_len : end])))
        else:
            raise ValueError(f"unsupported IPC message type {header_type}")
        pos = end
    footer_len = struct.unpack_from("<i", view, len(data) - 10)[0]
    footer = bytes(view[len(data) - 10 - footer_len : len(data) - 10])
    return bytes(view[:head_end]), batches, footer


def _buffer_counts(t: pa.DataType) -> int | None:
    """IPC buffers of one array of type t (children included); None for types not handled here."""
    if pa.types.is_null(t):
        return 0
    if pa.types.is_boolean(t) or pa.types.is_primitive(t) or pa.types.is_decimal(t):
        return 2
    if (
        pa.types.is_binary(t)
        or pa.types.is_string(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_large_string(t)
    ):
        return 3
    if pa.types.is_fixed_size_binary(t):
        return 2
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        child = _buffer_counts(
            t.value_type if not pa.types.is_map(t) else pa.struct([t.key_field, t.item_field])
        )
        return None if child is None else 2 + child
    if pa.types.is_fixed_size_list(t):
        child = _buffer_counts(t.value_type)
        return None if child is None else 1 + child
    if pa.types.is_struct(t):
        children = [_buffer_counts(t.field(i).type) for i in range(t.num_fields)]
        return None if any(c is None for c in children) else 1 + sum(children)
    return None


def _emptied(column: pa.Array) -> pa.Array:
    """Same length and validity, every value empty."""
    empty = pa.array([b""] * len(column), type=column.type)
    return pc.if_else(pc.is_null(column), pa.scalar(None, type=column.type), empty)


def supported(schema: pa.Schema) -> bool:
    return all(_buffer_counts(f.type) is not None for f in schema)


def write_mixed_file(batches: list[pa.RecordBatch], raw_columns: set[str], codec: str) -> bytes:
    """An IPC file whose `raw_columns` (binary/string) are stored uncompressed and the rest with `codec`."""
    schema = batches[0].schema
    raw_index = [i for i, f in enumerate(schema) if f.name in raw_columns]
    template_batches = []
    for batch in batches:
        cols = list(batch.columns)
        for i in raw_index:
            cols[i] = _emptied(cols[i])
        template_batches.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as w:
        for b in template_batches:
            w.write_batch(b)
    head, template, footer = _split_messages(sink.getvalue().to_pybytes())

    # which IPC buffers belong to raw columns
    owners: list[bool] = []
    for i, f in enumerate(schema):
        owners += [i in raw_index] * _buffer_counts(f.type)

    out = bytearray(head)
    blocks = []
    for batch, (meta, zbody) in zip(batches, template, strict=True):
        plain = batch.serialize()  # uncompressed message: continuation, metadata, body
        pmeta_len = struct.unpack_from("<i", plain, 4)[0]
        pmeta = memoryview(plain)[8 : 8 + pmeta_len]
        pbody = memoryview(plain)[8 + pmeta_len :]
        _, pbuffers, _ = _message_parts(pmeta)
        meta = bytearray(meta)
        zmeta = memoryview(meta)[8:]
        body_len_pos, zbuffers, vec_start = _message_parts(zmeta)
        if len(zbuffers) != len(owners) or len(pbuffers) != len(owners):
            raise ValueError("buffer layout differs from the schema")
        body = bytearray()
        for k, is_raw in enumerate(owners):
            if is_raw and pbuffers[k][1] > 0:
                off, n = pbuffers[k]
                chunk = struct.pack("<q", -1) + bytes(pbody[off : off + n])
            else:
                off, n = zbuffers[k]
                chunk = zbody[off : off + n]
            struct.pack_into("<qq", zmeta, vec_start + 16 * k, len(body), len(chunk))
            body += chunk
            body += b"\x00" * (-len(body) % 8)
        struct.pack_into("<q", zmeta, body_len_pos, len(body))
        blocks.append((len(out), len(meta), len(body)))
        out += meta
        out += body
    out += _CONTINUATION + b"\x00\x00\x00\x00"
    footer = bytearray(footer)
    root = _deref(footer, 0)
    start, count = _vector(footer, root, 3)
    if count != len(blocks):
        raise ValueError("footer block count differs")
    for k, (offset, meta_len, body_len) in enumerate(blocks):
        struct.pack_into("<qi", footer, start + 24 * k, offset, meta_len)
        struct.pack_into("<q", footer, start + 24 * k + 16, body_len)
    out += footer + struct.pack("<i", len(footer)) + _MAGIC
    return bytes(out)
