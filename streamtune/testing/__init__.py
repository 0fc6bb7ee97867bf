"""Helpers for running streamtune against a real S3 server on loopback (tests, demo, benchmarks)."""
