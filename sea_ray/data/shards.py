"""Image-text shards as common tools write them, read where they are (local or ``s3://``).

Two shard formats besides LLaVA manifests (``data.format``, :data:`FORMATS`):

- ``webdataset``: ``.tar`` files of ``<key>.<ext>`` members, the members of one sample next to
  each other (img2dataset's ``--output_format webdataset``: ``<key>.jpg``, ``<key>.txt`` and
  ``<key>.json``). The image is the first member of an image extension (or
  ``data.columns.image``), the caption the ``.txt`` member (or ``data.columns.caption``), else
  the ``caption`` of the ``.json`` member. A ``.json`` member's ``status`` other than
  ``success`` makes the sample an error row, as in img2dataset's Parquet.
- ``parquet``: Parquet files with an image column (bytes, or Hugging Face's ``{bytes, path}``
  struct), a caption column and an id column (img2dataset's ``--output_format parquet``:
  ``key``, ``caption``, ``jpg``, ``status``, ``error_message``, ...). Rows whose ``status`` is not
  ``success`` are error rows with img2dataset's ``error_message``.

``data.manifest`` names one shard file, a folder of them (searched recursively; names starting
with ``_`` or ``.`` are skipped) or a glob (``s3://bucket/laion/*.tar``). ``auto`` decides by
name and content (:func:`resolve`): ``.json``/``.jsonl`` and Parquet holding a ``conversations``
column (what ``sea-ray import-manifest`` writes) are LLaVA manifests, ``.tar`` files WebDataset
(img2dataset's per-tar ``.parquet`` metadata files beside them are then ignored), other Parquet
the image-text layout.

**A sample becomes a manifest row** (:func:`index_file`) with an id (the tar key, the id
column), its caption as a one-turn conversation (:func:`sea_ray.data.manifest.caption_conversation`,
the one rule) and a *member* reference to its image instead of bytes: ``("tar", file, offset,
size, name)`` or ``("parquet", file, row_group, index, column, name)``. The driver reads only
tar headers and caption members, and only the id and caption columns of Parquet, never an image.
Images are read where rows are processed: the labels job's Ray Data tasks read whole shards
with Ray Data's ``read_webdataset`` / ``read_parquet`` (:func:`image_dataset`); the training
stages' preprocessing actors read the members their rows name (:func:`read_members`: byte ranges
of a tar, the row groups of a Parquet file); the importer reads them to embed the bytes.

Bad samples are error rows with their reason, never a crash: no caption, an image without its
text member or a text without its image, a non-success img2dataset status, an id that occurs
twice in one file (both rows), and a tar that is truncated or not a WebDataset (keys not
contiguous; every sample of that file). A corrupt or truncated image is found where it is decoded.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, get_args

from sea_ray import storage
from sea_ray.config.schema import ManifestFormat
from sea_ray.constants import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

FORMATS = get_args(ManifestFormat)  # auto, llava, webdataset, parquet
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # WebDataset image members, in order
CAPTION_EXTS = ("txt", "caption", "text")                                   # WebDataset caption members
ID_COLUMNS = ("key", "id")                                                  # Parquet id columns, in order
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes", "img")
CAPTION_COLUMNS = ("caption", "txt", "text", "TEXT")
STATUS_OK = "success"  # img2dataset's status of a downloaded sample
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset (and Ray's reader): key = up to the basename's first dot


@dataclass(frozen=True)
class Source:
    """What a manifest URI holds: its format and, for shards, the shard files in order."""

    format: str                  # llava | webdataset | parquet
    uri: str
    files: tuple[str, ...] = ()  # shard URIs, sorted (empty for llava)

    @property
    def is_shards(self) -> bool:
        return self.format in SHARD_SUFFIX


def is_glob(uri: str) -> bool:
    return any(c in str(uri) for c in "*?[")


def _uri(uri: str, path: str) -> str:
    """``path`` (a filesystem path of ``uri``'s storage) as a URI of the same scheme."""
    return f"{uri.split('://', 1)[0]}://{path}" if storage.is_remote(uri) else path


def _listed(uri: str) -> Optional[list[str]]:
    """The files ``uri`` names (a glob's matches, a folder's files recursively, or the file
    itself), sorted; None when nothing is there. Names starting with ``_`` or ``.`` (markers,
    errors tables, temporaries) are left out of folders."""
    fs, path = storage.fsspec_fs(uri)
    if is_glob(uri):
        found = fs.glob(path, detail=True)  # one listing, no request per match
        return sorted(_uri(uri, p) for p, info in found.items() if info.get("type") == "file") or None
    if fs.isfile(path):
        return [uri]
    if not fs.isdir(path):
        return None
    root = path.rstrip("/")
    found = []
    for p in fs.find(path):
        rel = p[len(root):].lstrip("/") if p.startswith(root) else p.rsplit("/", 1)[-1]
        if not any(part.startswith(("_", ".")) for part in rel.split("/")):
            found.append(_uri(uri, p))
    return sorted(found)


def exists(uri: str) -> bool:
    """Whether ``uri`` names anything: a file, a folder, or a glob with a match."""
    return _listed(uri) is not None


def _parquet_columns(uri: str) -> list[str]:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_file(path) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def resolve(uri: str, fmt: str = "auto") -> Source:
    """The format of ``uri`` and its shard files. Raises ``FileNotFoundError`` when nothing is
    there and ``ValueError`` when it holds no manifest of ``fmt`` (both name the path)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    lower = str(uri).lower().rstrip("/")
    if lower.endswith((".json", ".jsonl")):
        if fmt in SHARD_SUFFIX:
            raise ValueError(f"{uri} is a JSON manifest, not {fmt} shards (data.format: llava, or auto)")
        return Source("llava", uri)
    files = _listed(uri)
    if files is None:
        raise FileNotFoundError(f"{uri} does not exist" + (" (the glob matches nothing)" if is_glob(uri) else ""))
    by_kind = {kind: [f for f in files if f.lower().endswith(suffix)] for kind, suffix in SHARD_SUFFIX.items()}
    if fmt == "auto":
        fmt = "webdataset" if by_kind["webdataset"] else "parquet" if by_kind["parquet"] else "auto"
        if fmt == "parquet" and "conversations" in _parquet_columns(by_kind["parquet"][0]):
            return Source("llava", uri)
    if fmt == "llava":
        return Source("llava", uri)
    if fmt == "auto" or not by_kind[fmt]:
        what = f"no {SHARD_SUFFIX[fmt]} file" if fmt in SHARD_SUFFIX else "no .tar or .parquet file"
        raise ValueError(f"{uri} holds {what} ({len(files)} other file(s)); a manifest is a LLaVA JSON/JSONL file, "
                         "Parquet, or WebDataset .tar shards")
    return Source(fmt, uri, tuple(by_kind[fmt]))


def problem(uri: str, fmt: str = "auto", columns=None) -> Optional[str]:
    """Why ``uri`` cannot be read as a manifest of ``fmt`` (no shard file of the format, a JSON file
    given as shards, image Parquet without the id, image or caption column), or None; the pre-flight
    check (:func:`sea_ray.checks.manifest_problems`). A path that does not exist is None here: the
    input checks name it."""
    try:
        source = resolve(uri, fmt)
        if source.format == "parquet":
            _columns_of(source.files[0], _parquet_columns(source.files[0]), columns)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- columns


def caption_conversation(caption: str) -> list[dict]:
    """The conversation of a sample that has only a caption (a WebDataset ``.txt``, a Parquet
    caption column): the image asked about, the caption as the answer, in LLaVA's layout as
    LCS-558K's rows are (align's ``plain`` template trains on the caption alone). The one rule of
    every reader of captions (also ``sea_ray.data.manifest.caption_conversation``)."""
    return [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]


def _pick(configured: Optional[str], candidates: Sequence[str], present: Sequence[str]) -> Optional[str]:
    if configured:
        return configured if configured in present else None
    return next((c for c in candidates if c in present), None)


def _columns_of(uri: str, present: Sequence[str], columns) -> dict[str, str]:
    """The id, image and caption columns of the image Parquet ``uri`` (``present``: its columns;
    ``columns``: ``data.columns``, None or an empty field = detect). Raises ``ValueError`` naming
    what is missing."""
    found, missing = {}, []
    for what, candidates in (("id", ID_COLUMNS), ("image", IMAGE_COLUMNS), ("caption", CAPTION_COLUMNS)):
        want = getattr(columns, what, None) if columns is not None else None
        found[what] = _pick(want, candidates, present)
        if found[what] is None:
            missing.append(f"data.columns.{what}={want!r}" if want else
                           f"{what} column (one of {', '.join(candidates)})")
    if missing:
        raise ValueError(f"{uri} has no {', no '.join(missing)}; its columns: {', '.join(present)}")
    return found


def member_name(member: Optional[tuple]) -> Optional[str]:
    """What an errors table shows as a shard row's image: ``shard.tar/key.jpg``, ``shard.parquet[row]``."""
    return member[-1] if member else None


def _sample(key: Optional[str], caption: Any, member: Optional[tuple], status: Any = None,
            message: Any = None, name: Optional[str] = None, no_caption: str = "no caption"
            ) -> tuple[dict, Optional[str]]:
    """(item, reason): a manifest item of one sample, and why it is bad (None when it is not)."""
    item = {"id": key, "image": None, "member": member, "_name": name or member_name(member)}
    if status is not None and str(status) != STATUS_OK:
        return item, f"img2dataset status {status}" + (f": {message}" if message else "")
    if member is None:
        return item, "no image member" if caption is not None else "no image and no caption"
    if caption is None:
        return item, no_caption
    if not isinstance(caption, str):
        return item, f"caption is a {type(caption).__name__}, not text"
    item["conversations"] = caption_conversation(caption)
    return item, None


def _tar_samples(uri: str, columns) -> Iterator[tuple[dict, Optional[str]]]:
    """The samples of one WebDataset tar (see :func:`index_file`)."""
    image_ext = columns.image if columns and columns.image else None
    caption_ext = columns.caption if columns and columns.caption else None
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    fs, path = storage.pyarrow_fs(uri)
    groups: list[tuple[str, dict]] = []
    fault = None
    with fs.open_input_file(path) as f:
        size = f.size()
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
            for info in tf:
                if not info.isreg():
                    continue
                m = _KEY.match(info.name)
                if not m:
                    continue
                key, ext = m.group(1), m.group(2)
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                if info.offset_data + info.size > size:
                    fault = f"truncated tar: {info.name} ends past the end of {name}"
                    break
                members = groups[-1][1]
                if ext in members:  # Ray's reader refuses such a tar too
                    fault = f"not a WebDataset: {info.name} occurs twice in {name}"
                    break
                if ext in CAPTION_EXTS or ext == caption_ext or ext == "json":
                    members[ext] = tf.extractfile(info).read()
                else:
                    members[ext] = (info.offset_data, info.size, info.name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            fault = f"unreadable tar {name} ({type(exc).__name__}: {exc})"
    keys = [k for k, _ in groups]
    if fault is None and len(set(keys)) != len(keys):
        twice = next(k for i, k in enumerate(keys) if k in keys[:i])
        fault = f"not a WebDataset: the members of key {twice!r} in {name} are not next to each other"
    if not groups:  # not even one sample: the file itself is the error row
        yield {"id": name, "image": None, "member": None, "_name": name}, fault or f"no WebDataset sample in {name}"
        return
    for key, members in groups:
        if fault:
            yield {"id": key, "image": None, "member": None, "_name": f"{name}/{key}"}, fault
            continue
        meta = {}
        if isinstance(members.get("json"), bytes):
            try:
                meta = json.loads(members["json"])
            except ValueError as exc:
                yield {"id": key, "image": None, "member": None, "_name": f"{name}/{key}.json"}, \
                    f"malformed json member ({exc})"
                continue
            meta = meta if isinstance(meta, dict) else {}
        exts = [image_ext] if image_ext else IMAGE_EXTS
        ext = next((e for e in exts if isinstance(members.get(e), tuple)), None)
        member = ("tar", uri, *members[ext]) if ext else None
        if member is not None:
            member = member[:-1] + (f"{name}/{member[-1]}",)
        text_exts = [caption_ext] if caption_ext else CAPTION_EXTS
        text = next((members[e] for e in text_exts if isinstance(members.get(e), bytes)), None)
        caption = text.decode("utf-8", errors="replace").strip() if text is not None else meta.get("caption")
        yield _sample(key, caption, member, meta.get("status"), meta.get("error_message"), f"{name}/{key}",
                      no_caption=f"no caption member ({'.' + caption_ext if caption_ext else '.txt'}, or a caption "
                      "in the .json member)")


def _parquet_samples(uri: str, columns) -> Iterator[tuple[dict, Optional[str]]]:
    """The rows of one image-text Parquet file (see :func:`index_file`): the id, caption and
    status columns only, one row group at a time."""
    import pyarrow.parquet as pq

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        present = pf.schema_arrow.names
        found = _columns_of(uri, present, columns)
        id_col, image_col, caption_col = found["id"], found["image"], found["caption"]
        extra = [c for c in ("status", "error_message") if c in present]  # img2dataset's
        seen: dict[str, int] = {}
        rows = []
        at = 0
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g, columns=[id_col, caption_col, *extra], use_threads=False).to_pydict()
            status, message = table.get("status"), table.get("error_message")
            for i, key in enumerate(table[id_col]):
                key = None if key is None else str(key)
                member = ("parquet", uri, g, i, image_col, f"{name}[{at}]")
                rows.append(_sample(key, table[caption_col][i], member, status[i] if status else None,
                                    message[i] if message else None))
                seen[key] = seen.get(key, 0) + 1
                at += 1
    for item, reason in rows:  # an id twice in one file: the readers could not tell the rows apart
        if reason is None and item["id"] is not None and seen[item["id"]] > 1:
            reason = f"id {item['id']!r} occurs {seen[item['id']]} times in {name}"
        yield item, reason


def index_file(uri: str, fmt: str, columns=None) -> Iterator[tuple[dict, Optional[str]]]:
    """``(item, reason)`` per sample of one shard file, in file order; ``reason`` is None for a
    sample that can be used (the manifest rules then check its id and caption,
    :func:`sea_ray.data.manifest.validate_row`). ``columns``: ``data.columns`` (id, image,
    caption; None = detect). Items hold no image bytes."""
    yield from (_tar_samples if fmt == "webdataset" else _parquet_samples)(uri, columns)


# --------------------------------------------------------------------------- image bytes


def _image_value(value) -> Optional[bytes]:
    """An image column's value as bytes (Hugging Face's ``{bytes, path}`` struct included)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None or isinstance(value, float):  # pandas' NaN of a missing member
        return None
    return bytes(value)


def read_members(members: Sequence[Optional[tuple]], cache: Optional[dict] = None
                 ) -> list[tuple[Optional[bytes], Optional[str]]]:
    """``(bytes, None)`` or ``(None, reason)`` per member reference, in order; never raises for a
    bad one. Tar members are byte ranges (fetched together, per file); Parquet members are read
    one row group at a time, the image column only; ``cache`` (a dict the caller keeps) holds the
    last row group read, so consecutive calls on one group read it once."""
    out: list[tuple[Optional[bytes], Optional[str]]] = [(None, "no image")] * len(members)
    tars: dict[str, list[int]] = {}
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        if m is None:
            continue
        if m[0] == "tar":
            tars.setdefault(m[1], []).append(i)
        else:
            groups.setdefault((m[1], m[2], m[4]), []).append(i)
    for uri, idx in tars.items():
        fs, path = storage.fsspec_fs(uri)
        try:
            got = fs.cat_ranges([path] * len(idx), [members[i][2] for i in idx],
                                [members[i][2] + members[i][3] for i in idx], on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole file failed: every row gets the reason
            got = [exc] * len(idx)
        for i, value in zip(idx, got):
            if isinstance(value, BaseException):
                out[i] = (None, f"cannot read {member_name(members[i])}: {type(value).__name__}: {value}")
            elif len(value) != members[i][3]:
                out[i] = (None, f"cannot read {member_name(members[i])}: {len(value)} of {members[i][3]} bytes")
            else:
                out[i] = (bytes(value), None)
    for (uri, group, column), idx in groups.items():
        try:
            values = (cache or {}).get((uri, group, column))
            if values is None:
                import pyarrow.parquet as pq

                fs, path = storage.pyarrow_fs(uri)
                with fs.open_input_file(path) as f:
                    values = pq.ParquetFile(f).read_row_group(group, columns=[column], use_threads=False) \
                        .column(column).to_pylist()
                if cache is not None:
                    cache.clear()
                    cache[(uri, group, column)] = values
        except Exception as exc:  # noqa: BLE001
            for i in idx:
                out[i] = (None, f"cannot read {member_name(members[i])}: {type(exc).__name__}: {exc}")
            continue
        for i in idx:
            data = _image_value(values[members[i][3]])
            out[i] = (data, None) if data else (None, f"no image in {member_name(members[i])}")
    return out


# --------------------------------------------------------------------------- Ray Data


def _arrow_path(uri: str) -> str:
    return storage.pyarrow_fs(uri)[1]


def image_dataset(source: Source, rows: Sequence[dict], lookup_ref, columns=None):
    """A Ray Data dataset of the images of ``rows`` (manifest rows of ``source``'s shards, each
    with its ``member``), read by Ray Data's own readers in Ray tasks, never on the driver:
    ``read_webdataset`` (raw bytes, no decoding; the image members only) or ``read_parquet``
    (the id and image columns). ``lookup_ref``: an object ref of :func:`lookup_of`'s mapping,
    with which :func:`attach_positions` places each sample read; samples not in it (error rows,
    rows of finished shards) are dropped there. Only the files holding ``rows`` are read.
    ``columns``: ``data.columns``, as given to :func:`index_file`."""
    import ray.data

    order = {f: i for i, f in enumerate(source.files)}
    files = sorted({r["member"][1] for r in rows}, key=lambda f: order.get(f, len(order)))
    fs, _ = storage.pyarrow_fs(files[0])
    paths = [_arrow_path(f) for f in files]
    if source.format == "webdataset":
        exts = [columns.image] if columns is not None and columns.image else list(IMAGE_EXTS)
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, include_paths=True, suffixes=exts)
        kwargs = {"id_column": "__key__", "image_columns": exts}
    else:
        images = sorted({r["member"][4] for r in rows})
        id_column = _columns_of(files[0], _parquet_columns(files[0]), columns)["id"]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=[id_column, *images], include_paths=True)
        kwargs = {"id_column": id_column, "image_columns": images}
    return ds.map_batches(attach_positions, batch_format="pyarrow", fn_kwargs={"lookup": lookup_ref, **kwargs})


_LOOKUPS: dict = {}


def attach_positions(batch, lookup, id_column: str, image_columns: Sequence[str]):
    """Ray Data stage after the reader: each sample's ``(row, seq, shard)`` from ``lookup`` (an
    object ref, fetched once per worker process) and its image bytes, in the columns the labels
    job's decode stage reads (row, seq, shard, image_id, uri, image_bytes); unknown samples dropped."""
    import pyarrow as pa
    import ray

    if isinstance(lookup, ray.ObjectRef):
        key = lookup.hex()
        if key not in _LOOKUPS:
            _LOOKUPS.clear()
            _LOOKUPS[key] = ray.get(lookup)
        lookup = _LOOKUPS[key]
    cols = batch.to_pydict()
    n = batch.num_rows
    images = [next((_image_value(cols[c][i]) for c in image_columns if c in cols and _image_value(cols[c][i])), None)
              for i in range(n)]
    out = {"row": [], "seq": [], "shard": [], "image_id": [], "uri": [], "image_bytes": []}
    for i in range(n):
        ident = cols[id_column][i]
        hit = lookup.get((cols["path"][i], None if ident is None else str(ident)))
        if hit is None:
            continue
        for name, value in zip(("row", "seq", "shard"), hit):
            out[name].append(value)
        out["image_id"].append(str(ident))
        out["uri"].append(None)
        out["image_bytes"].append(images[i])
    return pa.table({"row": pa.array(out["row"], pa.int64()), "seq": pa.array(out["seq"], pa.int64()),
                     "shard": pa.array(out["shard"], pa.int32()), "image_id": pa.array(out["image_id"], pa.string()),
                     "uri": pa.array(out["uri"], pa.string()), "image_bytes": pa.array(out["image_bytes"], pa.binary())})


def lookup_of(rows: Sequence[dict], positions: Sequence[tuple[int, int, int]]) -> dict:
    """``{(file path as the readers report it, id): (row, seq, shard)}`` for :func:`attach_positions`."""
    paths: dict[str, str] = {}
    out = {}
    for r, pos in zip(rows, positions):
        uri = r["member"][1]
        if uri not in paths:
            paths[uri] = _arrow_path(uri)
        out[(paths[uri], r["id"])] = pos
    return out
