"""``sea-ray import-manifest``: LLaVA JSON/JSONL (or Parquet), or image-text shards -> validated Parquet shards.

Usage::

    sea-ray import-manifest --input blip_laion_cc_sbu_558k.json --output s3://bucket/manifests/lcs558k \\
        [--image-root s3://bucket/images] [--embed-images] [--rows-per-shard N] [--require-image]
    sea-ray import-manifest --input s3://bucket/laion-wds/ --output s3://bucket/manifests/laion \\
        [--format webdataset|parquet] [--id-column C] [--image-column C] [--caption-column C]

Image-text shards (WebDataset tars, img2dataset's or any image Parquet; :mod:`sea_ray.data.shards`)
are imported with their images embedded: each caption becomes a one-turn conversation
(:func:`sea_ray.data.manifest.caption_conversation`), each image is read from its shard and
decoded, and a bad sample (no caption, an image without its text member, an img2dataset status
other than success, an image that does not decode) is an error row like any other.

Output folder (local or ``s3://``)::

    shard-00000.parquet ...   rows in manifest order, ``sea_ray.data.manifest.MANIFEST_SCHEMA``
    _errors.parquet           skipped rows with their reason (``ERRORS_SCHEMA``); maybe empty
    _SUCCESS                  written last: the summary as JSON; its presence marks a whole import

The errors table and the marker start with ``_`` so that Parquet readers of the folder (pyarrow
datasets, ``ray.data.read_parquet``, :func:`sea_ray.data.manifest.read_manifest`) skip them.
Every row is validated by ``read_manifest``; with ``--embed-images`` each image is read where
:func:`sea_ray.storage.resolve_image` points (relative paths under ``--image-root``) and decoded
by :func:`sea_ray.data.images.decode_image`, as the labels job does; a missing, empty, truncated,
corrupt or decompression-bomb image makes the row an error (stage ``decode``), never a crash.
Without it, image paths are kept as written, and the image root (made absolute when local) is
recorded in the summary, which jobs reading the folder use when their config gives no
``data.image_root`` (:func:`sea_ray.data.manifest.image_root_for`).

When more than ``max_error_fraction`` of the rows read are bad (rows without an image skipped by
``--require-image`` are a filter and count on neither side), the import fails with
:class:`~sea_ray.errors.TooManyErrors` and writes no ``_SUCCESS``; the shards and
``_errors.parquet`` it wrote stay for a look, and the next import into the folder replaces them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sea_ray import paths, storage
from sea_ray.config.schema import MAX_ERROR_FRACTION
from sea_ray.data import budget, shards
from sea_ray.data.shards import read_members
from sea_ray.data.manifest import manifest_error, read_manifest, rows_to_table
from sea_ray.errors import DataError, TooManyErrors
from sea_ray.labels.schema import ERRORS_SCHEMA

log = logging.getLogger(__name__)

ERRORS_FILE = "_errors.parquet"
SHARD_RE = re.compile(r"shard-\d+\.parquet")
DEFAULT_ROWS_PER_SHARD = 50_000          # text only: a 665k-row manifest in 14 shards
DEFAULT_ROWS_PER_SHARD_EMBEDDED = 1_000  # with image bytes: shards of tens of MB
IO_THREADS = 16


def _check_images(rows: list[dict], image_root: Optional[str], max_pixels: Optional[int],
                  pool: ThreadPoolExecutor) -> list[tuple[Optional[bytes], Optional[str]]]:
    """(bytes, None) or (None, reason) per row: each image read where
    :func:`~sea_ray.storage.resolve_image` says (the labels job's rule), or from its shard (a
    ``member``, :func:`sea_ray.data.shards.read_members`), and decoded by the labels
    job's :func:`~sea_ray.data.images.decode_image` (same bomb limit, truncation and format checks),
    so an image embedded here is one the labels job can label."""
    from sea_ray.data.images import decode_image

    uris = [None if r.get("member") else storage.resolve_image(r["image"], image_root) for r in rows]
    fetched = storage.read_many(uris, threads=IO_THREADS)
    members = [i for i, r in enumerate(rows) if r.get("member")]  # shard rows: their members' bytes
    for i, got in zip(members, read_members([rows[i]["member"] for i in members], cache={})):
        fetched[i] = got

    def check(item):
        data, reason = item
        if data is None:
            return None, reason
        img, reason = decode_image(data, max_pixels)
        return (data, None) if img is not None else (None, reason)

    return list(pool.map(check, fetched))


def _clear_output(output: str) -> None:
    """Remove the marker first, then the shards and errors of an earlier import into ``output``."""
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_fs(output)
    marker = f"{path.rstrip('/')}/{storage.MARKER}"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        fs.delete_file(marker)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and (SHARD_RE.fullmatch(info.base_name) or info.base_name == ERRORS_FILE
                                                or info.base_name.startswith(storage.TMP_PREFIX)):
            fs.delete_file(info.path)  # .tmp-*: what a killed import left half-written


def _write_table(table: pa.Table, output: str, name: str) -> None:
    """One Parquet file, written atomically (:func:`sea_ray.storage.open_atomic`: a hidden
    ``.tmp-*`` renamed into place locally, one upload on S3)."""
    with storage.open_atomic(storage.join(output, name)) as f:
        pq.write_table(table, f, compression="zstd")


def _judged(errors: list[dict], rows_read: int, require_image: bool) -> tuple[list[dict], int]:
    """(the error rows the budget counts, the input rows it counts them among): rows without an
    image that ``require_image`` skips are a filter, not errors."""
    if not require_image:
        return errors, rows_read
    bad = [e for e in errors if not (e["stage"] == "manifest" and e["reason"] == budget.NO_IMAGE)]
    return bad, rows_read - (len(errors) - len(bad))


def _refuse(input: str, output: str, errors: list[dict], judged: list[dict], rows: int, max_fraction: float,
            image_root: Optional[str], embed_images: bool, early: bool) -> TooManyErrors:
    """Write the errors table (no ``_SUCCESS``) and return the error to raise."""
    errors.sort(key=lambda e: e["row"])
    _write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), output, ERRORS_FILE)
    stop = " (stopped early: no later row can bring it back within the budget)" if early else ""
    return TooManyErrors(
        f"import-manifest: {'at least ' if early else ''}{len(judged)} of {rows} rows of {input} are bad "
        f"({budget.fraction(len(judged), rows)}), "
        f"more than --max-error-fraction {max_fraction:g} allows{stop}; no {storage.MARKER} written, the rows and "
        f"their reasons are in {storage.join(output, ERRORS_FILE)}\n"
        + budget.describe(judged, "--image-root" if embed_images else None, image_root)
        + "\n  fix the manifest or the images and import again (a new import replaces this folder)",
        len(judged), rows)


def import_manifest(input: str, output: str, image_root: Optional[str] = None, embed_images: bool = False,
                    rows_per_shard: Optional[int] = None, require_image: bool = False,
                    max_image_pixels: Optional[int] = None,
                    max_error_fraction: float = MAX_ERROR_FRACTION, fmt: str = "auto", columns=None) -> dict:
    """Convert the manifest at ``input`` into Parquet shards under ``output``; return a summary.

    Bad rows are skipped, counted and written to ``output/_errors.parquet``; ``_SUCCESS`` is
    written last, holding the summary (with ``image_root``, absolute when local). Re-running into
    the same folder replaces an earlier import. ``max_image_pixels``: the decompression-bomb limit
    of ``embed_images`` (the labels job's ``data.max_image_pixels``; default PIL's
    ``Image.MAX_IMAGE_PIXELS``). More bad rows than ``max_error_fraction`` of the rows read (see
    the module docstring) raise :class:`~sea_ray.errors.TooManyErrors`, without ``_SUCCESS``.
    ``fmt`` and ``columns``: what ``input`` holds (``data.format``, ``data.columns``); the images
    of image-text shards (WebDataset, image Parquet) are always embedded, as with ``embed_images``."""
    try:
        source = shards.resolve(input, fmt)
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"cannot read the manifest {input}: {exc}") from exc
    embed_images = embed_images or source.is_shards  # a shard's image has no path to keep
    if rows_per_shard is None:
        rows_per_shard = DEFAULT_ROWS_PER_SHARD_EMBEDDED if embed_images else DEFAULT_ROWS_PER_SHARD
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    if not 0 <= max_error_fraction <= 1:
        raise ValueError(f"max_error_fraction must lie in [0, 1], got {max_error_fraction}")
    image_root = paths.absolute(image_root) or None
    started = time.time()
    try:
        manifest = read_manifest(input, require_image=require_image, fmt=fmt, columns=columns)
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"cannot read the manifest {input}: {exc}") from exc
    errors = list(manifest.errors)
    _clear_output(output)
    storage.makedirs(output)
    judged, rows = _judged(errors, manifest.num_read, require_image)
    if budget.over_budget(len(judged), rows, max_error_fraction):  # malformed rows alone: before any image
        raise _refuse(input, output, errors, judged, rows, max_error_fraction, image_root, embed_images,
                      early=embed_images and bool(manifest.rows))

    num_rows = num_shards = num_embedded = num_text_only = 0
    pool = ThreadPoolExecutor(IO_THREADS) if embed_images else None
    try:
        for start in range(0, len(manifest.rows), rows_per_shard):
            chunk = manifest.rows[start:start + rows_per_shard]
            if embed_images:
                todo = [r for r in chunk if (r["image"] or r["member"]) and not r["image_bytes"]]
                loaded = _check_images(todo, image_root, max_image_pixels, pool)
                bad = set()
                for row, (data, reason) in zip(todo, loaded):
                    if data is None:
                        errors.append(manifest_error(row["row"], row, reason, stage="decode"))
                        bad.add(id(row))
                    else:
                        row["image_bytes"] = data
                chunk = [r for r in chunk if id(r) not in bad]
                num_embedded += sum(1 for r in chunk if r["image_bytes"])
                judged, rows = _judged(errors, manifest.num_read, require_image)
                if budget.over_budget(len(judged), rows, max_error_fraction):
                    raise _refuse(input, output, errors, judged, rows, max_error_fraction, image_root, embed_images,
                                  early=start + rows_per_shard < len(manifest.rows))
            if not chunk:
                continue
            num_text_only += sum(1 for r in chunk if not r["image"] and not r["image_bytes"])
            _write_table(rows_to_table(chunk), output, f"shard-{num_shards:05d}.parquet")
            num_rows += len(chunk)
            num_shards += 1
            for r in chunk:  # free the image bytes of a written shard
                r["image_bytes"] = None
            log.info("import-manifest: %d shards, %d rows written", num_shards, num_rows)
    finally:
        if pool is not None:
            pool.shutdown()
    if num_shards == 0:  # an empty dataset still has a schema to read
        _write_table(rows_to_table([]), output, "shard-00000.parquet")
        num_shards = 1

    errors.sort(key=lambda e: e["row"])
    _write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), output, ERRORS_FILE)
    summary = {
        "input": str(input), "format": source.format, "output": str(output), "image_root": image_root,
        "embed_images": bool(embed_images),
        "require_image": bool(require_image), "rows_read": manifest.num_read, "rows_written": num_rows,
        "rows_skipped": len(errors), "text_only_rows": num_text_only, "images_embedded": num_embedded,
        "shards": num_shards, "rows_per_shard": rows_per_shard, "errors": storage.join(output, ERRORS_FILE),
        "seconds": round(time.time() - started, 3),
    }
    storage.mark_complete(output, json.dumps(summary, indent=1, sort_keys=True))
    if errors:
        log.warning("import-manifest: %d of %d rows skipped, reasons in %s", len(errors), manifest.num_read,
                    summary["errors"])
    return summary
