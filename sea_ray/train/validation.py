"""Validation of a training stage on held-out data: what it measures, and where it runs.

**What.** With ``data.val_manifest`` every checkpoint of a stage is measured on the held-out rows
(the first ``validation.max_rows`` of that manifest, preprocessed exactly as training rows):

- ``val_loss_lm`` and ``val_ppl``: the training objective's LM loss, token-weighted over every
  supervised token (:func:`sea_ray.train.heldout.heldout_lm`), and ``exp`` of it;
- for align with SEA and ``data.val_labels`` (the labels dataset of the validation manifest), the
  metrics every tune trial reports (:class:`Evaluator`): ``val_sea_loss`` (the symmetric InfoNCE
  of pairs drawn with a fixed generator, at the fixed ``sea.init_temperature``) and
  ``val_word_acc`` (the share of labelled patches whose nearest vocabulary word is one of their
  labels).

**Where.** On Ray Train the measurement is Ray's own checkpoint validation: each worker reports
its checkpoint with ``validation=True`` and Ray runs :func:`validate_checkpoint` as a task of its
own (``validation.cpus``/``gpus``) beside training, so no worker waits for it. The task rebuilds
the stage's model from the run's config, loads the checkpoint's tensors, measures, and logs the
metrics at the checkpoint's step under ``val/`` in the run's TensorBoard; Ray attaches them to the
checkpoint (the driver's summary lists them per step). In one process (tune trials, your own
loops), :class:`StageValidator` is the ``evaluate`` callback of
:func:`sea_ray.train.loop.run_stage`.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from sea_ray.data.images import split_transform, to_model_input
from sea_ray.sea import SeaLoss, nearest_word
from sea_ray.train import checkpoint as ckpt
from sea_ray.train.data import preprocess_kwargs, source_of
from sea_ray.train.feed import materialize
from sea_ray.train.heldout import heldout_lm, heldout_rows, tower_normalize
from sea_ray.train.loop import build_model, parse_config, sea_pairs_for, sea_setup, to_model_batch

log = logging.getLogger(__name__)


def take(rows: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in rows.items()}


# --------------------------------------------------------------------------- the SEA metrics (tune's too)


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


# --------------------------------------------------------------------------- a stage's validation


def _val_cfg(cfg):
    """``cfg`` reading the validation manifest (and its labels) instead of the training data."""
    data = cfg.data.model_copy(update={"manifest": cfg.data.val_manifest, "labels": cfg.data.val_labels})
    return cfg.model_copy(update={"data": data})


class StageValidator:
    """``validator(model, step) -> {val_loss_lm, val_ppl[, val_sea_loss, val_word_acc]}`` on a
    stage's held-out data (module docstring); the rows are preprocessed once, on the first call."""

    def __init__(self, cfg):
        if not cfg.data.val_manifest:
            raise ValueError("a stage validator needs data.val_manifest")
        self.cfg = cfg
        self._rows: Optional[dict] = None
        self._sea: Optional[Evaluator] = None

    def _prepare(self, model) -> None:
        cfg, v = self.cfg, self.cfg.validation
        self._rows = heldout_rows(cfg, model.vision.image_size, max_rows=v.max_rows)
        if cfg.job == "align" and cfg.sea.enabled and cfg.data.val_labels:
            val = _val_cfg(cfg)
            rows = materialize(source_of(val, ()), preprocess_kwargs(val, model.vision.image_size), in_process=True)
            if v.max_rows:
                rows = take(rows, slice(0, v.max_rows))
            self._sea = Evaluator(rows, cfg.data.val_labels, val, temperature=cfg.sea.init_temperature,
                                  window=cfg.sea.window, top_n=cfg.sea.top_n, batch_size=v.batch_size,
                                  seed=cfg.run.seed, lm_loss=False)

    def __call__(self, model, step: int) -> dict:
        if self._rows is None:
            self._prepare(model)
        device = next(model.adapter.parameters()).device
        lm = heldout_lm(model, self._rows, model.tokenizer.pad_token_id, tower_normalize(model), device,
                        batch_size=self.cfg.validation.batch_size)
        metrics = {"val_loss_lm": lm["loss_lm"], "val_ppl": lm["ppl"]}
        if self._sea is not None:
            was = model.training
            model.eval()
            try:
                metrics.update(self._sea(model, step))
            finally:
                model.train(was)
        return metrics


def validate_checkpoint(checkpoint, cfg: dict) -> dict:
    """Ray Train's validation function (``ValidationConfig(fn=...)``): the stage's model with the
    tensors of ``checkpoint`` (a ``ray.train.Checkpoint``), measured by :class:`StageValidator`;
    returns the metrics Ray attaches to the checkpoint (with ``val_step``, its step)."""
    stage = parse_config(cfg)
    model, _ = build_model(stage)
    with checkpoint.as_directory() as folder:
        state = {k: v for k, v in ckpt.load_model_state(folder).items() if not k.startswith("sea_head.")}
        step = int(json.loads(open(os.path.join(folder, ckpt.STATE_FILE)).read())["step"])
    model.load_state_dict(state, strict=False)
    device = torch.device("cuda" if stage.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    metrics = StageValidator(stage)(model, step)
    print(f"{stage.job} validation at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
          flush=True)  # the task's line in the job's output
    return dict(metrics, val_step=step)
