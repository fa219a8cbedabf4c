"""Oracle labels: a labels dataset built from the synthetic world's ground truth, in the exact
schema the labels job writes. The upper bound of label quality, for experiments and tests that
must not depend on a CLIP run."""

import numpy as np
import pyarrow as pa

from sea_ray.labels.dataset import write_labels
from sea_ray.labels.schema import LABELS_SCHEMA, SCHEMA_VERSION
from sea_ray.world.generator import load_ground_truth, patch_ground_truth, patch_words


def write_oracle_labels(world_dir, out: str, grid: int, transform: dict, top_n: int = 3, split: str = "train",
                        rows_per_shard: int = 0):
    """Write the labels of ``split`` to ``out``, in one shard or in shards of ``rows_per_shard``
    rows; returns the number of images."""
    words = patch_words()
    index = {w: i for i, w in enumerate(words)}
    rows = []
    for record in load_ground_truth(world_dir):
        if record["split"] != split:
            continue
        truth = patch_ground_truth(record, grid, grid)
        ids = np.full((grid * grid, top_n), -1, dtype=np.int32)
        scores = np.zeros((grid * grid, top_n), dtype=np.float16)
        for p, patch in enumerate(truth):
            for j, word in enumerate(patch[:top_n]):
                ids[p, j], scores[p, j] = index[word], 1.0
        rows.append({"image_id": record["id"], "grid_h": grid, "grid_w": grid, "top_n": top_n,
                     "label_ids": ids.ravel(), "label_scores": scores.ravel()})
    meta = {"schema_version": SCHEMA_VERSION, "vocab": {"words": words, "hash": "oracle"}, "grid": [grid, grid],
            "top_n": top_n, "transform": transform, "counts": {"images": len(rows)}}
    write_labels(out, pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), meta, rows_per_shard, oracle=True)
    return len(rows)
