"""The held-out alignment metric every trial reports, and the data around it.

Why this metric and not the training loss: trials differ in the very things that move the
training loss without better alignment: the temperature (a lower one sharpens every logit), the
window ``k`` and ``top_n`` (other pairs, other negatives), lambda. So every trial is measured
with one fixed protocol on images no trial trains on:

- **the same images**: ``validation.num_images`` labelled images drawn with ``validation.seed``
  from ``base.data.labels`` (then excluded from every trial's training data) or from
  ``validation.labels`` (the labels of ``base.data.val_manifest``). They are copied once into
  ``<experiment>/validation/labels``, so a resumed search measures on the same images.
- **the same pairs**: one patch per ``k x k`` window and one label per patch drawn in proportion
  to its scores, then one pair per distinct label per batch, exactly as in training, with a fixed
  generator per batch and fixed ``k``, ``top_n`` and batch size (``validation.window``,
  ``validation.top_n``, ``validation.batch_size``; default: the base config's), whatever the
  trial samples for its own training.
- **the same temperature**: ``val_sea_loss`` is the symmetric InfoNCE of those pairs at a fixed
  temperature (``validation.temperature``, default the base's ``sea.init_temperature``), not the
  trial's learned one; it measures the adapter's geometry only.

Reported at every logging step (``evaluate`` of :func:`sea_ray.train.loop.run_stage`) by
:class:`sea_ray.train.validation.Evaluator` (the training stage's own validation reports the same
metrics on ``data.val_labels``):

- ``val_sea_loss`` (min): the loss above, averaged over pairs;
- ``val_word_acc`` (max): over every labelled held-out patch, the share whose nearest vocabulary
  word (cosine to the word targets, paper section 7) is one of the patch's labels; no sampling,
  no temperature;
- ``val_lm_loss`` (min, with ``validation.lm_loss``): the caption next-token loss of the held-out
  images, the L_lm half of the objective (``val_sea_loss`` alone rewards a large lambda even if
  captioning suffers; use this one, or look at both, when lambda is searched).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from sea_ray import storage
from sea_ray.errors import DataError

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
# --------------------------------------------------------------------------- held-out images


def label_image_ids(labels_uri: str) -> list[str]:
    """Every image id of a (complete) labels dataset, in shard order."""
    from sea_ray.labels.dataset import read_labels

    return read_labels(labels_uri).column("image_id").to_pylist()


def write_holdout(source_uri: str, out_uri: str, num_images: int, seed: int, reuse: bool = True) -> list[str]:
    """Copy ``num_images`` rows of the labels dataset ``source_uri`` (drawn with ``seed``) into a
    labels dataset at ``out_uri``; returns their image ids, sorted. With ``reuse``, a complete
    copy is kept as it is (a resumed search validates on the very same images)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sea_ray.labels.dataset import read_labels, write_labels

    if reuse and storage.is_complete(out_uri):
        return sorted(label_image_ids(out_uri))
    source = read_labels(source_uri)
    ids = sorted(set(source.column("image_id").to_pylist()))
    if not ids:
        raise DataError(f"{source_uri}: no labelled images to validate on")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(ids, size=min(num_images, len(ids)), replace=False).tolist())
    table = source.filter(pc.is_in(source.column("image_id"), value_set=pa.array(chosen)))
    meta = json.loads(storage.read_text(storage.join(source_uri, "_meta.json")))
    meta["counts"] = {"images": table.num_rows, "held_out_from": source_uri, "seed": seed}
    write_labels(out_uri, table, meta, held_out_from=source_uri, seed=seed)
    log.info("validation: %d held-out images of %s -> %s", table.num_rows, source_uri, out_uri)
    return chosen
