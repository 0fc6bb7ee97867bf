"""Streaming shard sets from object storage: CloudStreamingDataset (see README.md in this folder)."""

from streamtune.stream.dataset import CloudStreamingDataset

__all__ = ["CloudStreamingDataset"]
