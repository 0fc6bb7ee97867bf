"""URLs to filesystems.

Every stage takes a URL (`s3://bucket/prefix`, `file:///dir`, a plain path, or any fsspec URL) plus
optional `storage_options`. For `s3://` the standard AWS environment is honoured (keys, region,
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, profiles), so MinIO or any S3-compatible endpoint works
without code changes; explicit `storage_options` win over the environment.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

StorageOptions = dict[str, Any]


def s3_env_options() -> StorageOptions:
    """s3fs options derived from the AWS environment (only what botocore would not pick up itself)."""
    opts: StorageOptions = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    if os.environ.get("AWS_PROFILE"):
        opts["profile"] = os.environ["AWS_PROFILE"]
    return opts


def resolve_options(url: str, storage_options: StorageOptions | None = None) -> StorageOptions:
    """Merge environment defaults with explicit options (explicit wins)."""
    opts: StorageOptions = {}
    if protocol_of(url) in ("s3", "s3a"):
        opts.update(s3_env_options())
        # Plain endpoint_url is the common spelling; s3fs wants it top-level.
    for key, value in (storage_options or {}).items():
        if key == "client_kwargs" and isinstance(value, dict):
            opts.setdefault("client_kwargs", {}).update(value)
        else:
            opts[key] = value
    return opts


SECRET_OPTION_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "session_token",
    "secret_key",
    "access_key",
}


def secret_keys(options: dict | None) -> list[str]:
    """Keys of `options` (nested `client_kwargs` too) that carry credentials."""
    found = [k for k in options or {} if k.lower() in SECRET_OPTION_KEYS]
    nested = (options or {}).get("client_kwargs")
    return sorted(found + (secret_keys(nested) if isinstance(nested, dict) else []))


def public_options(options: dict | None) -> dict:
    """`options` without credentials, safe to record next to data."""
    out = {k: v for k, v in (options or {}).items() if k.lower() not in SECRET_OPTION_KEYS}
    if isinstance(out.get("client_kwargs"), dict):
        out["client_kwargs"] = public_options(out["client_kwargs"])
    return out


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def get_fs(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path-without-protocol) for a URL."""
    return url_to_fs(url, **resolve_options(url, storage_options))


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the protocol."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return (
            f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts)
            if rest
            else f"{proto}://" + "/".join(parts)
        )
    return os.path.join(url, *parts)


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic)."""
    fs, path = get_fs(url, storage_options)
    if protocol_of(url) == "file":
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # object stores put atomically


def read_json(url: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def write_json(url: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def arrow_fs(url: str, storage_options: StorageOptions | None = None, **s3_kwargs: Any):
    """A pyarrow.fs filesystem + path for a URL: native C++ S3 client for s3://, fsspec wrapper otherwise.

    pyarrow's S3 client releases the GIL and reads ranges several times faster than s3fs.
    `s3_kwargs` go to `pyarrow.fs.S3FileSystem` (timeouts, retry_strategy) and are ignored otherwise.
    """
    import pyarrow.fs as pafs

    opts = resolve_options(url, storage_options)
    proto = protocol_of(url)
    if proto in ("s3", "s3a"):
        bucket_key = url.split("://", 1)[1]
        kwargs: dict[str, Any] = {}
        endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        region = (opts.get("client_kwargs") or {}).get("region_name") or opts.get("region_name")
        kwargs["region"] = region or "us-east-1"
        key = opts.get("key") or opts.get("aws_access_key_id")
        secret = opts.get("secret") or opts.get("aws_secret_access_key")
        if key and secret:
            kwargs["access_key"], kwargs["secret_key"] = key, secret
            if opts.get("token"):
                kwargs["session_token"] = opts["token"]
        if opts.get("anon"):
            kwargs["anonymous"] = True
        kwargs.update(s3_kwargs)
        return pafs.S3FileSystem(**kwargs), bucket_key
    if proto == "file":
        return pafs.LocalFileSystem(), url.split("://", 1)[1] if "://" in url else os.path.abspath(url)
    fs, path = get_fs(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def safe_local_path(root: str, relative: str) -> str:
    """Map an untrusted key under `root` so it can never escape it ('..', absolute paths, NULs)."""
    parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    cleaned = [p.replace("\x00", "_") for p in parts]
    target = os.path.realpath(os.path.join(root, *cleaned)) if cleaned else os.path.realpath(root)
    base = os.path.realpath(root)
    if target != base and not target.startswith(base + os.sep):
        raise ValueError(f"key {relative!r} escapes {root!r}")
    return target
