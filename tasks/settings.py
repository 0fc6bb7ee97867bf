"""Prefect settings the pipeline runs with: no telemetry, results persisted, a local result folder by default.

Prefect reads its settings from the environment when `prefect` is first imported, so these defaults are
applied by `tasks/__init__.py` (which `flows` imports) before anything imports Prefect. Values already in the environment win.
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
RESULT_BLOCK = "remote-file-system/streamtune-results"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the defaults that are not set yet; return what was applied.

    `STREAMTUNE_RESULT_STORAGE` picks where task results persist: a folder becomes Prefect's local storage
    path; a remote URL (s3://bucket/prefect-results) selects the `streamtune-results` block, which
    `save_result_storage_block` creates on the server (the deploy job and `serve` do it).
    """
    env = os.environ if environ is None else environ
    wanted = dict(DEFAULTS)
    url = env.get(RESULT_STORAGE_ENV)
    if url and _is_local(url):
        wanted["PREFECT_LOCAL_STORAGE_PATH"] = os.path.abspath(url.removeprefix("file://"))
    elif url:
        wanted["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = RESULT_BLOCK
    applied = {k: v for k, v in wanted.items() if k not in env}
    env.update(applied)
    if environ is None and applied and "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    return applied


def save_result_storage_block(url: str | None = None) -> str | None:
    """Create or update the result storage block for a remote `STREAMTUNE_RESULT_STORAGE` URL; returns its
    slug. Only non-secret options are stored: workers read credentials from their own environment."""
    url = url or os.environ.get(RESULT_STORAGE_ENV)
    if not url or _is_local(url):
        return None
    from prefect.filesystems import RemoteFileSystem

    from streamtune.storage import resolve_options

    block = RemoteFileSystem(basepath=url.rstrip("/"), settings=resolve_options(url))
    block.save(RESULT_BLOCK.split("/", 1)[1], overwrite=True)
    return RESULT_BLOCK
