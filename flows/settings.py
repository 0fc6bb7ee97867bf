"""Prefect settings the pipeline runs with: no telemetry, results persisted, a local result folder by default.

Prefect reads its settings from the environment when `prefect` is first imported, so these defaults are
applied by `flows/__init__.py` before anything imports Prefect. Values already in the environment win.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

DEFAULTS = {
    # Privacy: no analytics from the server, no client telemetry, no marketing content in the UI.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    # Reruns skip finished work only if every result is persisted.
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
    # A loaded 2-core machine can take longer than the 20 s default to start the ephemeral API.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}

RESULT_STORAGE_ENV = "STREAMTUNE_RESULT_STORAGE"


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the defaults that are not set yet; return what was applied."""
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in DEFAULTS.items() if k not in env}
    env.update(applied)
    if environ is None and applied and "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    return applied


def result_storage(url: str | None = None):
    """The block results are persisted to: `STREAMTUNE_RESULT_STORAGE` (a folder or any fsspec URL such as
    s3://bucket/prefect-results), else None, meaning Prefect's local folder ($PREFECT_HOME/storage or
    PREFECT_LOCAL_STORAGE_PATH)."""
    url = url or os.environ.get(RESULT_STORAGE_ENV)
    if not url:
        return None
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if "://" not in url or url.startswith("file://"):
        return LocalFileSystem(basepath=os.path.abspath(url.removeprefix("file://")))
    from streamtune.storage import resolve_options

    return RemoteFileSystem(basepath=url.rstrip("/"), settings=resolve_options(url))
