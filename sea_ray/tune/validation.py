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

Reported at every logging step (``evaluate`` of :func:`sea_ray.train.loop.run_stage`):

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
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from sea_ray import storage
from sea_ray.errors import DataError
from sea_ray.sea import SeaLoss, nearest_word

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


# --------------------------------------------------------------------------- rows in memory


def take(rows: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in rows.items()}


# --------------------------------------------------------------------------- the metric


class Evaluator:
    """``evaluate(model, step) -> {val_sea_loss, val_word_acc[, val_lm_loss]}`` on fixed held-out
    rows. Built per trial; everything that does not depend on the weights (batches, pairs, word
    targets) is prepared once, on the first call."""

    def __init__(self, rows: dict[str, np.ndarray], labels_uri: str, trial_cfg, *, temperature: float,
                 window: int, top_n: int, batch_size: int, seed: int, lm_loss: bool):
        self.rows, self.labels_uri, self.cfg = rows, labels_uri, trial_cfg
        self.temperature, self.window, self.top_n = temperature, window, top_n
        self.batch_size, self.seed, self.lm_loss = batch_size, seed, lm_loss
        self._prepared: Optional[list] = None

    @classmethod
    def from_config(cls, rows, labels_uri: str, tune_cfg, trial_cfg) -> "Evaluator":
        v, base = tune_cfg.validation, tune_cfg.base
        return cls(rows, labels_uri, trial_cfg,
                   temperature=v.temperature or base.sea.init_temperature, window=v.window or base.sea.window,
                   top_n=v.top_n or base.sea.top_n, batch_size=v.batch_size or base.batch.per_worker,
                   seed=v.seed, lm_loss=v.lm_loss)

    def _prepare(self, model, device):
        from sea_ray.data.images import split_transform, to_model_input
        from sea_ray.train.loop import sea_pairs_for, sea_setup, to_model_batch

        cfg = self.cfg.model_copy(update={"data": self.cfg.data.model_copy(update={"labels": self.labels_uri})})
        self.targets, row_of, _ = sea_setup(model, cfg, device)
        tensor_part = split_transform(model.vision.transform)[1]
        grid = tuple(model.vision.transform_spec()["grid"])
        pad_id = model.tokenizer.pad_token_id
        t = self.temperature
        self.head = SeaLoss(init_temperature=t, min_temperature=t, max_temperature=t, learnable=False).to(device)
        sampling = SimpleNamespace(sea=SimpleNamespace(window=self.window, top_n=self.top_n))
        prepared = []
        n = len(self.rows["position"])
        for i, start in enumerate(range(0, n, self.batch_size)):
            part = take(self.rows, slice(start, start + self.batch_size))
            b = to_model_batch(part, pad_id, lambda x: to_model_input(x, tensor_part), device)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            pairs = sea_pairs_for(b, row_of, self.targets, grid, sampling, generator)
            n_img, top_n = b["label_ids"].shape[0], b["top_n"]
            ids = b["label_ids"].view(n_img, -1, top_n)[..., : self.top_n]
            scores = b["label_scores"].view(n_img, -1, top_n)[..., : self.top_n]
            rows = torch.where(ids >= 0, row_of[ids.clamp(min=0)], torch.full_like(ids, -1))
            valid = (rows >= 0) & (scores > 0)
            prepared.append((b, pairs, rows.to(device), valid.to(device)))
        self._prepared = prepared

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict:
        device = next(model.adapter.parameters()).device
        if self._prepared is None:
            self._prepare(model, device)
        sea_sum = pairs_n = correct = labelled = lm_sum = tokens = 0.0
        for b, (image_index, patch_index, targets), rows, valid in self._prepared:
            visual = model.encode_images(b["images"]).float()
            if len(image_index) >= 2:
                parts = self.head(visual[image_index, patch_index], targets.float())
                sea_sum += float(parts["loss"]) * parts["num_pairs"]
                pairs_n += parts["num_pairs"]
            nearest = nearest_word(visual.reshape(-1, visual.shape[-1]), self.targets).view(visual.shape[:2])
            hit = ((rows == nearest.unsqueeze(-1)) & valid).any(-1)
            has_label = valid.any(-1)
            correct += float(hit[has_label].sum())
            labelled += float(has_label.sum())
            if self.lm_loss:
                out = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
                lm_sum += float(out["loss_lm"]) * b["num_tokens"]
                tokens += b["num_tokens"]
        metrics = {"val_sea_loss": sea_sum / pairs_n if pairs_n else float("nan"),
                   "val_word_acc": correct / labelled if labelled else float("nan")}
        if self.lm_loss:
            metrics["val_lm_loss"] = lm_sum / tokens if tokens else float("nan")
        return metrics
