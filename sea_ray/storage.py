"""URIs -> filesystems: local paths and ``s3://`` (any S3-compatible endpoint).

The endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); they are never
logged or written anywhere. Completion markers make outputs visible only when whole.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MARKER = "_SUCCESS"


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def fsspec_fs(uri: str):
    """(fsspec filesystem, path without scheme) for a local path or s3:// URI."""
    import fsspec

    uri = str(uri)
    if uri.startswith("s3://"):
        kwargs = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        return fsspec.filesystem("s3", **kwargs), uri[len("s3://"):]
    if is_remote(uri):
        protocol, _, path = uri.partition("://")
        return fsspec.filesystem(protocol), path
    return fsspec.filesystem("file"), os.path.abspath(_strip_file_scheme(uri))


def pyarrow_fs(uri: str):
    """(pyarrow filesystem, path) — honours AWS_ENDPOINT_URL for s3:// (pyarrow's S3FileSystem() does not)."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"allow_bucket_creation": True}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(_strip_file_scheme(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic);
    an S3 PUT is atomic by itself."""
    fs, path = fsspec_fs(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def mark_complete(uri: str, content: str = "") -> None:
    """Write the completion marker of a folder; write it last."""
    write_text(join(uri, MARKER), content)


def is_complete(uri: str) -> bool:
    return exists(join(uri, MARKER))


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for ``uri``: the path itself when local, else a cached download
    (a file or a whole folder), keyed by the URI so repeated calls reuse it."""
    if not is_remote(uri):
        return os.path.abspath(_strip_file_scheme(str(uri)))
    cache_root = Path(cache_dir or os.environ.get("SEA_RAY_CACHE", Path.home() / ".cache" / "sea_ray"))
    target = cache_root / "downloads" / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    done = target / ".complete"
    fs, path = fsspec_fs(uri)
    name = path.rstrip("/").split("/")[-1]
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(target / name), recursive=True)
        else:
            fs.get(path, str(target / name))
        done.write_text(str(uri))
    return str(target / name)
