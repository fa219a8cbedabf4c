"""Reading and writing a labels dataset folder (layout in :mod:`sea_ray.labels.schema`).

All I/O goes through one pyarrow filesystem (local, or ``s3://`` with the endpoint from
``AWS_ENDPOINT_URL``), which has no listing cache, so what a re-run lists is what is stored.
Local writes go to a hidden temporary name and are renamed into place; an S3 PUT is atomic by
itself. Either way a file is never seen half-written.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sea_ray import storage
from sea_ray.labels.schema import ERRORS_SCHEMA, LABELS_SCHEMA

SHARDS, MARKERS, ERRORS = "shards", "markers", "errors"
CONFIG_FILE, VOCAB_FILE, META_FILE = "_config.json", "vocab.json", "_meta.json"
MANIFEST_ERRORS = "manifest"
_TMP_PREFIX = storage.TMP_PREFIX


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def part_name(first_row: int, rows: int) -> str:
    """A shard part's file name: its first manifest row and its row count. Parts of one shard hold
    disjoint runs of its rows, so the name says what the file holds, and a task that is retried
    writes the same name with the same rows."""
    return f"part-{first_row:010d}-{rows}.parquet"


def _shard_index(name: str) -> Optional[int]:
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("shard-") and stem[6:].isdigit():
        return int(stem[6:])
    return None


class LabelsDir:
    """A labels dataset folder: ``LabelsDir("s3://bucket/labels")`` or a local path."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = storage.pyarrow_fs(self.uri)
        self.root = self.root.rstrip("/")
        self.local = not storage.is_remote(self.uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # ------------------------------------------------------------------ primitive I/O

    def write_bytes(self, rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.uri, rel), data)  # atomic: a temporary file, then a rename

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n")

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel).decode("utf-8"))

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def list(self, rel_dir: str) -> list[str]:
        """File names directly under ``rel_dir`` (empty when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def list_tree(self, rel_dir: str) -> list[str]:
        """Paths (relative to the dataset) of every file under ``rel_dir``, sub-folders included,
        from one listing (empty when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=True)
        return sorted(posixpath.relpath(i.path, self.root) for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def clean_temporaries(self) -> int:
        """Remove half-written temporaries a killed run left behind (local only); returns how many."""
        removed = 0
        if self.local:
            rels = self.list_tree(SHARDS) + [posixpath.join(sub, n) for sub in (ERRORS, MARKERS, "")
                                             for n in self.list(sub)]
            for rel in rels:
                if posixpath.basename(rel).startswith(_TMP_PREFIX):
                    self.fs.delete_file(self.path(rel))
                    removed += 1
        return removed

    # ------------------------------------------------------------------ shards

    def completed_shards(self) -> set[int]:
        """Shards whose marker and every data file it names exist."""
        return set(self.markers())

    def markers(self) -> dict[int, dict]:
        """The markers of the completed shards (:meth:`completed_shards`), by shard index."""
        marked = sorted(i for i in (_shard_index(n) for n in self.list(MARKERS) if n.endswith(".json"))
                        if i is not None)
        if not marked:
            return {}
        stored = set(self.list_tree(SHARDS))
        found = {}
        for i in marked:
            marker = self.read_json(posixpath.join(MARKERS, shard_name(i) + ".json"))
            if all(rel in stored for rel, _ in shard_files(i, marker)):
                found[i] = marker
        return found

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def write_part(self, index: int, first_row: int, labels: pa.Table) -> str:
        """One part of shard ``index`` (a run of its rows, from manifest row ``first_row``), written
        whole; returns its file name, for the marker. Called by the pipeline's write tasks."""
        name = part_name(first_row, labels.num_rows)
        self.write_table(posixpath.join(SHARDS, shard_name(index), name), labels)
        return name

    def write_errors(self, index: int, errors: pa.Table) -> None:
        """The errors file of shard ``index`` (written before its marker)."""
        self.write_table(posixpath.join(ERRORS, shard_name(index) + ".parquet"), errors)

    def write_marker(self, index: int, marker: dict) -> None:
        """The shard's marker, written after its parts and errors file: ``parts`` lists the part
        files (``{"file", "rows"}``) in row order; only those are the shard's rows."""
        self.write_json(posixpath.join(MARKERS, shard_name(index) + ".json"), marker)

    def delete_marker(self, index: int) -> None:
        """Make a shard pending again (its files are rewritten by the next run)."""
        self.delete(posixpath.join(MARKERS, shard_name(index) + ".json"))

    def remove_shard_files(self, indices) -> int:
        """Delete the data files of the shards ``indices`` (pending ones: no marker), whatever an
        earlier run left of them (parts, a torn file, a single-file shard of the old layout), from
        one listing; returns how many. Call it after deleting their markers."""
        indices = set(indices)
        removed = 0
        for rel in self.list_tree(SHARDS):
            top = rel.split("/")[1] if rel.count("/") >= 1 else ""
            if _shard_index(top) in indices:
                self.fs.delete_file(self.path(rel))
                removed += 1
        return removed

    # ------------------------------------------------------------------ state

    def num_shards(self) -> Optional[int]:
        """The shards of the whole dataset: from ``_meta.json``, else from the fingerprint in
        ``_config.json`` (valid rows and rows per shard); None when neither tells."""
        for rel, count in ((META_FILE, lambda m: m["counts"]["shards"]),
                           (CONFIG_FILE, lambda c: -(-c["fingerprint"]["valid_rows"]
                                                     // c["fingerprint"]["rows_per_shard"]))):
            if self.exists(rel):
                try:
                    return int(count(self.read_json(rel)))
                except (KeyError, TypeError, ValueError, ZeroDivisionError):
                    continue
        return None

    def incomplete(self) -> Optional[str]:
        """None for a complete dataset (``_SUCCESS``); else why it cannot be read, for a message:
        ``not found`` (no folder, or one that no labels job wrote into) or ``not complete`` (a
        labels job started here: how many shards are done, and what to do)."""
        if self.exists(storage.MARKER):
            return None
        markers = self.markers()
        if not markers and not self.exists(CONFIG_FILE) and not self.exists(META_FILE):
            return (f"{self.uri}: labels dataset not found (no {CONFIG_FILE}, {META_FILE} or shard marker there); "
                    "run sea-ray labels with this output first")
        total = self.num_shards()
        labelled = sum(int(m.get("labelled", 0)) for m in markers.values())
        errors = sum(int(m.get("errors", 0)) for m in markers.values())
        done = f"{len(markers)} of {total}" if total is not None else f"{len(markers)}"
        rows = f", {labelled} rows labelled and {errors} error rows so far" if markers else ""
        hint = ("; if that run failed for too many error rows, fix the data (e.g. data.image_root) first: the "
                "shards with errors are redone") if markers and total == len(markers) else ""
        return (f"{self.uri}: labels dataset not complete (no {storage.MARKER}; {done} shards done{rows} — re-run "
                f"sea-ray labels to finish{hint})")

    def read_table(self, rel: str) -> pa.Table:
        # use_threads=False: pyarrow 26 sometimes aborts at interpreter exit after threaded reads
        return pq.read_table(io.BytesIO(self.read_bytes(rel)), use_threads=False)


def shard_files(index: int, marker: dict) -> list[tuple[str, int]]:
    """``(path relative to the dataset, rows)`` of the data files of shard ``index`` in row order,
    as its marker names them: the parts it lists, or for a marker without ``parts`` (written before
    shards were written in parts) the one file ``shards/shard-K.parquet``."""
    if "parts" not in marker:
        return [(posixpath.join(SHARDS, shard_name(index) + ".parquet"), int(marker["labelled"]))]
    return [(posixpath.join(SHARDS, shard_name(index), p["file"]), int(p["rows"])) for p in marker["parts"]]


def labels_table(image_ids: list[str], grid: tuple[int, int], top_n: int, ids: np.ndarray,
                 scores: np.ndarray) -> pa.Table:
    """A LABELS_SCHEMA table from ``ids [N, P * top_n]`` int32 and ``scores [N, P * top_n]`` float16."""
    n = len(image_ids)
    width = int(grid[0]) * int(grid[1]) * int(top_n)
    ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(n, width)
    scores = np.ascontiguousarray(scores, dtype=np.float16).reshape(n, width)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, pa.int32())
    return pa.Table.from_arrays([
        pa.array(image_ids, pa.string()),
        pa.array(np.full(n, grid[0], np.int16), pa.int16()),
        pa.array(np.full(n, grid[1], np.int16), pa.int16()),
        pa.array(np.full(n, top_n, np.int16), pa.int16()),
        pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float16())),
    ], schema=LABELS_SCHEMA)


def errors_table(errors: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: e.get(k) for k in ERRORS_SCHEMA.names} for e in errors], schema=ERRORS_SCHEMA)


def read_labels(uri: str, require_complete: bool = True) -> pa.Table:
    """Every labels row of a dataset (shards with a marker), in shard order.

    ``require_complete``: refuse a dataset whose ``_SUCCESS`` marker is missing (not found; or
    still being written, killed part-way or failed: :meth:`LabelsDir.incomplete` says which)."""
    out = LabelsDir(uri)
    why = out.incomplete() if require_complete else None
    if why:
        raise FileNotFoundError(why)
    tables = [out.read_table(rel) for i, m in out.markers().items() for rel, _ in shard_files(i, m)]
    if not tables:
        return LABELS_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def read_errors(uri: str) -> pa.Table:
    """The whole errors table: malformed manifest rows, then each completed shard's errors."""
    out = LabelsDir(uri)
    names = [MANIFEST_ERRORS] if out.exists(posixpath.join(ERRORS, MANIFEST_ERRORS + ".parquet")) else []
    names += [shard_name(i) for i in sorted(out.completed_shards())]
    tables = [out.read_table(posixpath.join(ERRORS, n + ".parquet")) for n in names]
    if not tables:
        return ERRORS_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def completed_shard_rows(uri: str) -> list[tuple[str, int]]:
    """``(URI, rows)`` of every data file of the completed shards, in shard and row order (rows
    from the markers)."""
    out = LabelsDir(uri)
    return [(storage.join(out.uri, rel), rows) for i, m in out.markers().items() for rel, rows in shard_files(i, m)]


def write_labels(uri: str, labels: pa.Table, meta: dict, rows_per_shard: int = 0, **marker) -> None:
    """A complete labels dataset from an in-memory table (oracle labels, a held-out copy): shards
    of ``rows_per_shard`` rows (0: one shard), each one part with an empty errors file and its
    marker (``marker`` adds fields to it), then ``_meta.json`` and ``_SUCCESS``."""
    out = LabelsDir(uri)
    size = rows_per_shard or max(1, labels.num_rows)
    for k, start in enumerate(range(0, max(1, labels.num_rows), size)):
        shard = labels.slice(start, size)
        part = out.write_part(k, start, shard)
        out.write_errors(k, errors_table([]))
        out.write_marker(k, {"shard": k, "rows": shard.num_rows, "labelled": shard.num_rows, "errors": 0,
                             "parts": [{"file": part, "rows": shard.num_rows}], **marker})
    out.write_json(META_FILE, meta)
    storage.mark_complete(uri)
