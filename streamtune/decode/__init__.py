"""Raw media -> training features: in-memory media decode, Whisper transcripts, CLIP embeddings and tags.

Heavy modules (mlx-whisper, open_clip) load only when `whisper`, `clip` or a Decoder's models are used.
"""

from streamtune.decode.features import (
    DecodeConfig,
    Decoder,
    commit_features,
    decode_shard,
    decode_shards,
    read_quarantine,
)
from streamtune.decode.media import MediaError, decode_audio, decode_image, sniff

__all__ = [
    "DecodeConfig",
    "Decoder",
    "MediaError",
    "commit_features",
    "decode_audio",
    "decode_image",
    "decode_shard",
    "decode_shards",
    "read_quarantine",
    "sniff",
]
