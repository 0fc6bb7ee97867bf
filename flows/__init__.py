"""Prefect flows wiring the streamtune stages: `flows.pipeline.pipeline` and one subflow per stage."""

from flows.settings import apply_defaults

apply_defaults()
