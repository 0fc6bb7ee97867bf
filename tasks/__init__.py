"""Prefect tasks: thin wrappers over streamtune stages with retries, content cache keys and artifacts."""

from tasks.settings import apply_defaults

apply_defaults()
