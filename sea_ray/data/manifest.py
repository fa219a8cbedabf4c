"""Manifests: LLaVA JSON (a list), JSON Lines, or Parquet; or image-text shards (WebDataset
tars, image Parquet: :mod:`sea_ray.data.shards`); local or ``s3://``.

Every job reads its samples through :func:`read_manifest`, which validates each row and never
raises for a bad one: a malformed row is skipped and reported (row number, id, reason) in the
returned errors, and every good row is kept. The file is streamed (a JSON list one sample at a
time with ``ijson``, JSON Lines line by line, Parquet by record batch): what stays in memory is
the validated rows, not the file's text and every parsed sample besides.

A valid row, as returned::

    {"row": 12, "id": "004539375", "image": "00453/004539375.jpg" or None,
     "image_bytes": b"..." or None, "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                      {"from": "gpt", "value": "..."}]}

A row of image-text shards also has ``member``, its image's place in a shard (``image`` and
``image_bytes`` None: the image is read where the row is processed), and a caption-only
conversation (:func:`caption_conversation`). Rows of other manifests have ``member`` None.

The Parquet layout (what ``sea-ray import-manifest`` writes) has the same columns:
``id`` string, ``image`` string (nullable), ``image_bytes`` binary (nullable),
``conversations`` list<struct<from: string, value: string>>. The importer's ``_SUCCESS`` holds
its summary as JSON (:func:`import_record`), including the image root the relative ``image``
paths live under, which jobs use when their config gives none (:func:`image_root_for`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import ijson
import pyarrow as pa

from sea_ray import storage
from sea_ray.constants import IMAGE_PLACEHOLDER
from sea_ray.data import shards
from sea_ray.data.budget import NO_IMAGE
from sea_ray.data.shards import caption_conversation  # noqa: F401 - the caption rule, public here too

log = logging.getLogger(__name__)
ROLES = ("human", "gpt")

MANIFEST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("conversations", pa.list_(pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())]))),
])


@dataclass
class ManifestResult:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    @property
    def num_read(self) -> int:
        return len(self.rows) + len(self.errors)


def manifest_error(row: int, item: Any, reason: str, stage: str = "manifest") -> dict:
    """One errors-table entry (the columns of ``sea_ray.labels.schema.ERRORS_SCHEMA``)."""
    item = item if isinstance(item, dict) else {}
    ident = item.get("id")
    image = item.get("image") or (item["member"][-1] if item.get("member") else None)  # a shard's: its name
    return {"row": row, "image_id": str(ident) if ident is not None else None,
            "image": image if isinstance(image, str) else None, "stage": stage, "reason": reason}


def validate_row(row: int, item: Any, require_image: bool) -> tuple[Optional[dict], Optional[str]]:
    """(normalised row, None) or (None, reason)."""
    if not isinstance(item, dict):
        return None, f"row is a {type(item).__name__}, not an object"
    ident = item.get("id")
    if ident is None or (isinstance(ident, str) and not ident.strip()):
        return None, "missing id"
    if not isinstance(ident, (str, int)):
        return None, f"id is a {type(ident).__name__}"
    image, image_bytes = item.get("image"), item.get("image_bytes")
    if image is not None and not isinstance(image, str):
        return None, f"image is a {type(image).__name__}, not a path"
    if image_bytes is not None and not isinstance(image_bytes, (bytes, bytearray)):
        return None, "image_bytes is not bytes"
    member = item.get("member")  # a shard's image (sea_ray.data.shards): read where the row is processed
    has_image = bool(image) or bool(image_bytes) or member is not None
    if require_image and not has_image:
        return None, NO_IMAGE
    turns = item.get("conversations")
    if hasattr(turns, "tolist"):
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns:
        return None, "conversations missing or empty"
    clean = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return None, f"turn {i} is malformed (needs from: human|gpt and a string value)"
        if turn["from"] != ROLES[i % 2]:
            return None, f"turn {i} should be from {ROLES[i % 2]!r}"
        clean.append({"from": turn["from"], "value": turn["value"]})
    if len(clean) % 2:
        return None, "the last turn is not an answer"
    if any(not t["value"].strip() for t in clean if t["from"] == "gpt"):
        return None, "empty answer or caption"
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in clean)
    if has_image and n_placeholders != 1:
        return None, f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders for one image"
    if not has_image and n_placeholders:
        return None, f"{IMAGE_PLACEHOLDER} placeholder without an image"
    return {"row": row, "id": str(ident), "image": image or None, "image_bytes": bytes(image_bytes) if image_bytes
            else None, "conversations": clean, "member": member}, None


def _json_error(uri: str, exc: Exception, after_row: Optional[int] = None) -> ValueError:
    """The one message of a manifest that is not JSON (``exc``: the parser's error, its first line)."""
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    where = f" after row {after_row}" if after_row is not None else ""
    return ValueError(f"{uri} is not valid JSON{where} ({detail}); LLaVA manifests are a JSON list or JSON Lines")


def _first_byte(f) -> bytes:
    """The first byte of ``f`` that is not JSON whitespace (b"" for none); rewinds ``f``."""
    while True:
        chunk = f.read(1 << 16)
        stripped = chunk.lstrip(b" \t\r\n")
        if stripped or not chunk:
            f.seek(0)
            return stripped[:1]


def _iter_json_list(uri: str) -> Iterator[tuple[int, Any]]:
    """The items of a JSON list, streamed (``ijson``'s C parser): one item in memory at a time, not
    the file and all its rows (a 1 GB mix665k holds 4 GB of Python objects when loaded whole). A
    file that is not JSON, or not a list, raises ``ValueError``, wherever in the file the fault is."""
    fs, path = storage.fsspec_fs(uri)
    row = -1
    with fs.open(path, "rb") as f:
        try:
            if _first_byte(f) != b"[":  # not a list: parse it whole (as json.load would) to say what it is
                events = ijson.parse(f, use_float=True)
                _, event, value = next(events, ("", "", None))
                for _ in events:
                    pass
                kind = {"start_map": "dict"}.get(event, type(value).__name__)
                raise ValueError(f"{uri} holds a JSON {kind}; LLaVA manifests are a list of samples")
            for row, item in enumerate(ijson.items(f, "item", use_float=True, buf_size=1 << 20)):
                yield row, item
        except (ijson.JSONError, UnicodeDecodeError) as exc:
            raise _json_error(uri, exc, row if row >= 0 else None) from None


def _iter_items(uri: str) -> Iterator[tuple[int, Any]]:
    """(row, parsed item or an exception) in manifest order, for JSON, JSONL and Parquet, streamed
    from storage (neither the file nor its parsed rows are held whole)."""
    lower = str(uri).lower().rstrip("/")
    if not lower.endswith((".json", ".jsonl")):  # a Parquet file or a folder of Parquet shards
        import pyarrow.dataset as pads

        fs, path = storage.pyarrow_fs(uri)
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        row = 0
        for batch in dataset.to_batches():
            for item in batch.to_pylist():
                yield row, item
                row += 1
        return
    if lower.endswith(".json"):
        yield from _iter_json_list(uri)
        return
    fs, path = storage.fsspec_fs(uri)
    with fs.open(path, "rt", encoding="utf-8", newline=None) as f:  # universal newlines: \n, \r\n, \r
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError as exc:
                yield row, exc


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while rows are read: rows hold no reference cycles, and a
    collector that keeps walking the growing list of kept rows as they stream in doubles the time
    of a 558k-row manifest."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _iter_shard_items(source, columns) -> Iterator[tuple[int, Any]]:
    """(row, item) of every sample of ``source``'s shard files in order; a sample the shard
    reader refused is a ``(reason, item)`` pair instead of an item."""
    row = 0
    for uri in source.files:
        for item, reason in shards.index_file(uri, source.format, columns):
            yield row, (reason, item) if reason else item
            row += 1


def read_manifest(uri: str, require_image: bool = False, limit: Optional[int] = None, fmt: str = "auto",
                  columns=None) -> ManifestResult:
    """Read and validate a manifest. Duplicate ids keep the first row; later ones are errors.

    ``fmt`` (``data.format``) and ``columns`` (``data.columns``): LLaVA JSON/JSONL/Parquet or
    image-text shards (WebDataset tars, image Parquet; :mod:`sea_ray.data.shards`), whose rows
    name their image as a ``member`` of a shard instead of a path. A missing manifest raises
    ``FileNotFoundError``; one of no known format ``ValueError``."""
    source = shards.resolve(uri, fmt)
    items = _iter_shard_items(source, columns) if source.is_shards else _iter_items(uri)
    with _collector_paused():
        return _read_manifest(items, require_image, limit)


def _read_manifest(items: Iterator[tuple[int, Any]], require_image: bool, limit: Optional[int]) -> ManifestResult:
    result = ManifestResult()
    seen: set[str] = set()
    for row, item in items:
        if limit is not None and len(result.rows) >= limit:
            break
        if isinstance(item, tuple):  # refused by the shard reader: (reason, item)
            reason, item = item
            result.errors.append(manifest_error(row, {"id": item.get("id"), "image": item.get("_name")}, reason))
            continue
        if isinstance(item, Exception):
            result.errors.append(manifest_error(row, None, f"malformed JSON line: {item}"))
            continue
        clean, reason = validate_row(row, item, require_image)
        if clean is not None and clean["id"] in seen:
            clean, reason = None, f"duplicate id {clean['id']!r}"
        if clean is None:
            result.errors.append(manifest_error(row, item, reason))
            continue
        seen.add(clean["id"])
        result.rows.append(clean)
    return result


def _is_file(uri: str) -> bool:
    return str(uri).lower().rstrip("/").endswith((".json", ".jsonl", ".parquet", ".tar")) or any(
        c in str(uri) for c in "*?[")


def import_record(uri: str) -> Optional[dict]:
    """The summary ``sea-ray import-manifest`` recorded in the ``_SUCCESS`` of the folder it wrote
    (its ``image_root`` among others), or None: a manifest file, a folder the importer did not
    write (or not whole), or storage this process cannot reach (the job reading it checks again)."""
    if _is_file(uri):
        return None
    marker = storage.join(uri, storage.MARKER)
    try:
        record = json.loads(storage.read_text(marker))
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return None
    except Exception as exc:  # unreachable storage: no record
        log.warning("cannot read %s (%s)", marker, type(exc).__name__)
        return None
    return record if isinstance(record, dict) else None


def image_root_for(manifest: str, image_root: Optional[str]) -> Optional[str]:
    """The image root of a job's manifest: the config's ``image_root`` when it gives one, else
    the one ``sea-ray import-manifest`` recorded for the imported folder ``manifest``, else None
    (paths as given). What a row's image reference then points to is
    :func:`sea_ray.storage.resolve_image`'s rule."""
    if image_root:
        return image_root
    recorded = (import_record(manifest) or {}).get("image_root")
    if recorded:
        log.info("%s: using the image root recorded by sea-ray import-manifest: %s", manifest, recorded)
    return recorded or None


def caption_of(row: dict) -> str:
    """The caption of a pretraining row (LCS-558K layout: the first answer)."""
    return row["conversations"][1]["value"].strip()


def rows_to_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_SCHEMA.names} for r in rows], schema=MANIFEST_SCHEMA)
