"""The embedded default: a small generated multimodal source set, served from a loopback S3 server."""
