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
from streamtune.decode.media import MediaError, decode_audio, decode_image, iter_audio_windows, sniff
from streamtune.decode.video import VideoResult, VideoSegment, decode_video

__all__ = [
    "DecodeConfig",
    "Decoder",
    "MediaError",
    "VideoResult",
    "VideoSegment",
    "commit_features",
    "decode_audio",
    "decode_image",
    "decode_video",
    "decode_shard",
    "decode_shards",
    "iter_audio_windows",
    "read_quarantine",
    "sniff",
]
