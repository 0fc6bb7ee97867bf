"""Arrow IPC shard sets: one IPC file per shard plus index.json (see README.md in this folder)."""

from streamtune.shards.format import RAW_SCHEMA, ShardError, checksum, shard_name
from streamtune.shards.index import commit_index, decode_batch, parse_index, read_index, read_shard_table
from streamtune.shards.writer import ShardSetWriter, encode_shard, write_shard

__all__ = [
    "RAW_SCHEMA",
    "ShardError",
    "ShardSetWriter",
    "checksum",
    "commit_index",
    "decode_batch",
    "encode_shard",
    "parse_index",
    "read_index",
    "read_shard_table",
    "shard_name",
    "write_shard",
]
