"""Prefect flows wiring the streamtune stages: `flows.pipeline.pipeline` and one subflow per stage."""

import tasks  # noqa: F401  (applies the Prefect settings defaults before anything imports Prefect)
