"""URIs -> filesystems: local paths and ``s3://`` (any S3-compatible endpoint).

The one I/O layer of the package: where a manifest's image reference points
(:func:`resolve_image`), reading (:func:`read_bytes`, :func:`read_many`), the atomic write
(:func:`open_atomic`, :func:`write_bytes`) and the exclusive create (:func:`create_exclusive`).

The endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); they are never
logged or written anywhere. Completion markers make outputs visible only when whole.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

from sea_ray.errors import ConfigError

MARKER = "_SUCCESS"

# Retries and timeouts of every S3 call, pyarrow's and s3fs' alike, from the environment (Ray's
# workers inherit it; a submitted job forwards it as a setting). The defaults ride out an object
# store that stops answering for 30 s (a paused or restarting server, a network blip): a request
# waits up to S3_TIMEOUT_S for an answer, then is tried again with the SDK's exponential backoff,
# up to S3_ATTEMPTS times in all. Past them the error names the bucket and key.
S3_ATTEMPTS_VAR, S3_ATTEMPTS = "SEA_RAY_S3_ATTEMPTS", 10
S3_TIMEOUT_VAR, S3_TIMEOUT_S = "SEA_RAY_S3_TIMEOUT_S", 20.0


def s3_retry_settings() -> tuple[int, float]:
    """``(attempts, timeout in seconds)`` of S3 calls: the environment's, else the defaults."""
    try:
        attempts = int(os.environ.get(S3_ATTEMPTS_VAR) or S3_ATTEMPTS)
        timeout = float(os.environ.get(S3_TIMEOUT_VAR) or S3_TIMEOUT_S)
    except ValueError:
        attempts = timeout = 0
    if attempts < 1 or timeout <= 0:
        raise ConfigError([f"{S3_ATTEMPTS_VAR} must be a whole number >= 1 and {S3_TIMEOUT_VAR} a number of seconds "
                           f"> 0, got {os.environ.get(S3_ATTEMPTS_VAR)!r} and {os.environ.get(S3_TIMEOUT_VAR)!r}"])
    return attempts, timeout


def storage_error(exc: OSError) -> str:
    """One line saying what an I/O error was: its message (which names the path, or the bucket
    and key), and for an object store out of reach how long S3 calls were retried."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    if any(m in text for m in ("NETWORK_CONNECTION", "Could not connect", "Connect timeout", "Read timeout")):
        attempts, timeout = s3_retry_settings()
        text += (f" (tried {attempts} times, {timeout:g} s each, with backoff; {S3_ATTEMPTS_VAR} and "
                 f"{S3_TIMEOUT_VAR} set how long)")
    return text


def _naming_uri(fn):
    """``fn`` whose I/O errors name its ``uri`` argument (an object store's "The specified bucket
    does not exist" says neither bucket nor key)."""
    position = list(inspect.signature(fn).parameters).index("uri")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            _raise_naming(exc, str(kwargs["uri"] if "uri" in kwargs else args[position]))

    return wrapper


def _raise_naming(exc: OSError, uri: str):
    """Raise ``exc`` again, its message led by ``uri`` when it is remote and not named yet."""
    if uri in str(exc) or not is_remote(uri):
        raise exc
    raise type(exc)(f"{uri}: {' '.join(str(exc).split()) or type(exc).__name__}") from exc


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def fsspec_fs(uri: str):
    """(fsspec filesystem, path without scheme) for a local path or s3:// URI."""
    import fsspec

    uri = str(uri)
    if uri.startswith("s3://"):
        attempts, timeout = s3_retry_settings()
        # no listings cache: markers written by other processes (workers, other jobs) are what a
        # listing is for, and s3fs would otherwise answer from its first listing for ever
        kwargs = {"use_listings_cache": False,
                  "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"max_attempts": attempts, "mode": "standard"}}}
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
        attempts, timeout = s3_retry_settings()
        kwargs = {"allow_bucket_creation": True, "connect_timeout": timeout, "request_timeout": timeout,
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
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


def resolve_image(ref: Optional[str], image_root: Optional[str] = None) -> Optional[str]:
    """Where a manifest's image reference points; the one rule for every job (labels, import,
    training), so that they all read the same file.

    - ``None`` or ``""`` -> ``None``;
    - a URI (``s3://...``, any ``scheme://...``) or an absolute path -> as it is, whatever
      ``image_root`` is (a ``file://`` URI becomes its local path);
    - a relative path -> under ``image_root`` (a local folder, a ``file://`` folder or an
      ``s3://`` prefix), or, without one, made absolute against the working directory.
    """
    if not ref:
        return None
    ref = str(ref)
    if ref.startswith("file://"):
        return os.path.abspath(_strip_file_scheme(ref))
    if "://" in ref or os.path.isabs(ref):
        return ref
    if not image_root:
        return os.path.abspath(ref)
    image_root = str(image_root)
    if is_remote(image_root):
        return join(image_root, ref)
    return os.path.join(os.path.abspath(_strip_file_scheme(image_root)), ref)


@_naming_uri
def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


@_naming_uri
def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@_naming_uri
def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _read_local(uri: str) -> tuple[Optional[bytes], Optional[str]]:
    try:
        with open(_strip_file_scheme(uri), "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, f"missing file: {uri}"
    except OSError as exc:  # a folder, no permission, an I/O error
        return None, f"cannot read {uri}: {type(exc).__name__}: {exc}"


def read_many(uris: Sequence[Optional[str]], threads: int = 1) -> list[tuple[Optional[bytes], Optional[str]]]:
    """``(bytes, None)`` or ``(None, reason)`` per URI, in order; never raises for a bad file.

    ``None`` -> ``(None, "no image")``. Remote URIs are fetched concurrently, one request batch
    per scheme; local files are read by ``threads`` threads. Reasons start with ``missing file:``
    or ``cannot read``."""
    out: list[tuple[Optional[bytes], Optional[str]]] = [(None, "no image")] * len(uris)
    remote: dict[str, list[int]] = {}
    local: list[int] = []
    for i, uri in enumerate(uris):
        if uri is None:
            continue
        if is_remote(uri):
            remote.setdefault(str(uri).split("://", 1)[0], []).append(i)
        else:
            local.append(i)
    if threads > 1 and len(local) > 1:
        with ThreadPoolExecutor(min(threads, len(local))) as pool:
            for i, got in zip(local, pool.map(lambda j: _read_local(str(uris[j])), local)):
                out[i] = got
    else:
        for i in local:
            out[i] = _read_local(str(uris[i]))
    for idx in remote.values():
        fs, _ = fsspec_fs(uris[idx[0]])
        paths = [fsspec_fs(uris[i])[1] for i in idx]
        try:
            got = fs.cat(paths, on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole request failed: every row gets the reason
            got = {p: exc for p in paths}
        if not isinstance(got, dict):  # fsspec returns the bytes alone for a single path
            got = {paths[0]: got}
        for i, p in zip(idx, paths):
            value = got.get(p, FileNotFoundError(p))
            if isinstance(value, FileNotFoundError):
                out[i] = (None, f"missing file: {uris[i]}")
            elif isinstance(value, BaseException):
                out[i] = (None, f"cannot read {uris[i]}: {type(value).__name__}: {value}")
            else:
                out[i] = (bytes(value), None)
    return out


TMP_PREFIX = ".tmp-"  # local temporaries of open_atomic: hidden from Parquet readers, removable
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def open_atomic(uri: str) -> Iterator:
    """A binary file to write ``uri`` whole: nobody sees it half-written.

    Locally the data goes to a hidden temporary (``.tmp-*``) next to the target, renamed over it
    on success and removed on an error. Remote, the bytes are buffered in memory and sent in one
    upload on success (an S3 object is visible only once whole); an error uploads nothing."""
    fs, path = fsspec_fs(uri)
    if is_remote(uri):
        buf = io.BytesIO()
        yield buf
        try:
            fs.pipe_file(path, buf.getvalue())
        except OSError as exc:
            _raise_naming(exc, uri)
        return
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@_naming_uri
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically (:func:`open_atomic`)."""
    with open_atomic(uri) as f:
        f.write(data)


@_naming_uri
def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@_naming_uri
def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` only if it does not exist: True when this call created it,
    False when it already existed. ``O_EXCL`` on a local disk, a conditional PUT
    (``If-None-Match: *``) on S3; on other stores a check-then-write (best effort)."""
    fs, path = fsspec_fs(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if str(uri).startswith("s3://"):
        try:
            fs.pipe_file(path, data, mode="create")
        except (FileExistsError, OSError):
            if exists(uri):
                return False
            raise
        return True
    if exists(uri):
        return False
    write_bytes(uri, data)
    return True


@_naming_uri
def put_folder(local: str, uri: str, last: str) -> None:
    """Copy the files of the local folder ``local`` to ``uri`` (local or remote), the file named
    ``last`` after every other: a reader that sees it sees the whole folder."""
    fs, path = fsspec_fs(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)
    for name in sorted(os.listdir(local), key=lambda name: name == last):
        fs.put_file(os.path.join(local, name), f"{path.rstrip('/')}/{name}")


@_naming_uri
def put_tree(local: str, uri: str, last: str) -> None:
    """Copy the local folder ``local`` with its subfolders to ``uri`` (local or remote), the top
    file named ``last`` after everything else (a reader that sees it sees the whole tree)."""
    fs, path = fsspec_fs(uri)
    root = path.rstrip("/")
    for folder, _, files in os.walk(local):
        rel = os.path.relpath(folder, local)
        target = root if rel == "." else f"{root}/{rel}"
        if not is_remote(uri):
            fs.makedirs(target, exist_ok=True)
        for name in files:
            if rel == "." and name == last:
                continue
            fs.put_file(os.path.join(folder, name), f"{target}/{name}")
    if os.path.exists(os.path.join(local, last)):
        fs.put_file(os.path.join(local, last), f"{root}/{last}")


@_naming_uri
def makedirs(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


@_naming_uri
def remove_tree(uri: str) -> None:
    """Delete a folder and everything under it (nothing when it is not there)."""
    fs, path = fsspec_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def mark_complete(uri: str, content: str = "") -> None:
    """Write the completion marker of a folder; write it last."""
    write_text(join(uri, MARKER), content)


def is_complete(uri: str) -> bool:
    return exists(join(uri, MARKER))


def cache_root() -> Path:
    """The local cache of downloads and converted models: ``$SEA_RAY_CACHE``, else ``~/.cache/sea_ray``."""
    return Path(os.environ.get("SEA_RAY_CACHE") or Path.home() / ".cache" / "sea_ray")


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for ``uri``: the path itself when local, else a cached download
    (a file or a whole folder), keyed by the URI so repeated calls reuse it."""
    if not is_remote(uri):
        return os.path.abspath(_strip_file_scheme(str(uri)))
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / "downloads" / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
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
