"""The labels dataset: one versioned definition of its Parquet schema and its metadata.

A labels dataset is a folder (local or ``s3://``)::

    _config.json                     the resolved config and the fingerprint re-runs must match (written first)
    vocab.json                       the vocabulary (words, counts, hash), written before any shard
    shards/shard-00000/part-0000000000-32.parquet ...
                                     a shard's rows (schema below), in parts: each part a run of its rows
                                     in manifest order, named by its first manifest row and its row count,
                                     written by the pipeline's workers
    errors/manifest.parquet          malformed manifest rows (ERRORS_SCHEMA)
    errors/shard-00000.parquet ...   rows of that shard that could not be read, decoded or labelled
    markers/shard-00000.json ...     a shard's completion marker, written after its parts and errors file;
                                     its ``parts`` list the shard's part files in row order
    _meta.json                       vocabulary, model, transform, grid, counts (written at the end)
    _SUCCESS                         written last: the whole dataset is complete, within its error budget

Shard ``k`` holds the valid manifest rows ``[k * rows_per_shard, (k + 1) * rows_per_shard)`` (valid
= passed manifest validation, in manifest order): the parts its marker lists, in that order. Only
shards with a marker count, and only the files their marker names; a re-run deletes and rewrites
every shard without one, so each image id appears in exactly one part file exactly once. A marker
without ``parts`` (written before shards were written in parts) names the one file
``shards/shard-00000.parquet``; such datasets read the same (:func:`sea_ray.labels.dataset.shard_files`).

Per image, ``label_ids`` and ``label_scores`` are flat row-major ``[P * top_n]`` arrays
(P = grid_h * grid_w patches); a patch with fewer than ``top_n`` positive scores is padded with
id -1 and score 0. Ids index the vocabulary stored in ``_meta.json`` (not LLM token ids), so
one labels run serves every LLM.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
PAD_ID = -1

LABELS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("grid_h", pa.int16(), nullable=False),
    pa.field("grid_w", pa.int16(), nullable=False),
    pa.field("top_n", pa.int16(), nullable=False),
    # list children are named "element", as Parquet's compliant nested types store and read them back
    pa.field("label_ids", pa.list_(pa.field("element", pa.int32())), nullable=False),
    pa.field("label_scores", pa.list_(pa.field("element", pa.float16())), nullable=False),
], metadata={"sea_ray.labels.schema_version": str(SCHEMA_VERSION)})

ERRORS_SCHEMA = pa.schema([
    pa.field("row", pa.int64()),          # position in the manifest (-1 when unknown)
    pa.field("image_id", pa.string()),    # may be null for a malformed row
    pa.field("image", pa.string()),       # the manifest's image reference, if any
    pa.field("stage", pa.string()),       # manifest | read | decode | label
    pa.field("reason", pa.string()),
])

META_KEYS = ("schema_version", "vocab", "model", "transform", "grid", "top_n", "score_sign", "features",
             "templates", "counts")


def to_arrays(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(label_ids [P, n] int64, label_scores [P, n] float32)`` of one labels row."""
    p = int(row["grid_h"]) * int(row["grid_w"])
    n = int(row["top_n"])
    ids = np.asarray(row["label_ids"], dtype=np.int64).reshape(p, n)
    scores = np.asarray(row["label_scores"], dtype=np.float32).reshape(p, n)
    return ids, scores
