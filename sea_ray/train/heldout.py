"""Held-out LM loss: the training objective on rows the model does not train on.

:func:`heldout_lm` is the stage's ``loss_lm`` (the LLM's masked next-token loss over the
supervised tokens, with the visual tokens spliced in where each sample's image goes) over every
given row, token-weighted: the summed negative log-likelihood of all supervised tokens divided by
their number, not a mean of batch means. :func:`heldout_rows` preprocesses a manifest for it
exactly as the stage preprocesses its training rows (:class:`~sea_ray.train.data.Preprocess`,
through :func:`sea_ray.train.feed.materialize` in this process). ``sea-ray eval`` uses both; a
stage may call them every N steps for a validation loss::

    rows = heldout_rows(cfg, model.vision.image_size)          # cfg.data.val_manifest's rows
    heldout_lm(model, rows, tokenizer.pad_token_id, tower_normalize(model), device)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from sea_ray.constants import IGNORE_INDEX
from sea_ray.data.images import split_transform, to_model_input
from sea_ray.errors import DataError
from sea_ray.train.data import ManifestSource, manifest_items, manifest_rows, preprocess_kwargs
from sea_ray.train.feed import materialize, num_rows
from sea_ray.train.loop import to_model_batch


def tower_normalize(model) -> Callable:
    """The tensor part of the tower's transform, as the stage applies it to preprocessed rows
    (uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]``)."""
    tensor_part = split_transform(model.vision.transform)[1]
    return lambda images: to_model_input(images, tensor_part)


def heldout_rows(cfg, image_size: int, manifest: Optional[list[dict]] = None,
                 max_rows: Optional[int] = None) -> dict[str, np.ndarray]:
    """The preprocessed rows of a held-out manifest, as :func:`sea_ray.train.feed.materialize`
    returns them, for a stage-style config ``cfg`` (an align or instruct config: its ``job``
    decides captions (``plain``) or conversations (its ``template``), ``data.image_root`` and
    ``data.max_length`` apply).

    ``manifest``: rows already read (:func:`sea_ray.data.manifest.read_manifest`'s), else
    ``cfg.data.val_manifest`` or, without one, ``cfg.data.manifest`` is read (bad rows skipped and
    logged); ``max_rows``: only the first rows. Rows preprocessing drops (an unreadable image,
    nothing left to supervise) are absent; a manifest with no usable row is a DataError."""
    if manifest is None:
        uri = cfg.data.val_manifest or cfg.data.manifest
        manifest = manifest_rows(uri, require_image=cfg.job == "align", fmt=cfg.data.format,
                                 columns=cfg.data.columns).rows
    items = manifest_items(list(manifest)[:max_rows] if max_rows else list(manifest))
    if not items:
        raise DataError("no held-out rows to evaluate")
    return materialize(ManifestSource(items, len(items)), preprocess_kwargs(cfg, image_size), in_process=True)


def batch_nll(model, batch: dict) -> tuple[float, int]:
    """(summed negative log-likelihood, number) of the supervised tokens of one model batch
    (:func:`sea_ray.train.loop.to_model_batch`'s): the next-token targets of the spliced labels,
    as the LLM's loss takes them (shifted by one, visual and ignored positions left out)."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"])
    logits = out["logits"][:, :-1].float()
    target = out["labels"][:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    if not keep.any():
        return 0.0, 0
    return float(F.cross_entropy(logits[keep], target[keep], reduction="sum")), int(keep.sum())


@torch.no_grad()
def heldout_lm(model, rows: dict[str, np.ndarray], pad_id: int, normalize: Callable, device,
               batch_size: int = 32) -> dict:
    """The LM loss of ``model`` over every row of ``rows`` (:func:`heldout_rows` or
    :func:`~sea_ray.train.feed.materialize`), ``batch_size`` rows per forward pass, in eval mode
    (the model's mode is restored).

    Returns ``{"loss_lm", "ppl", "tokens", "rows"}``: the mean negative log-likelihood per
    supervised token over all rows, ``exp`` of it, the number of supervised tokens and of rows."""
    count = num_rows(rows)
    training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, count, batch_size):
            batch = {key: value[start:start + batch_size] for key, value in rows.items()}
            nll, n = batch_nll(model, to_model_batch(batch, pad_id, normalize, device))
            total, tokens = total + nll, tokens + n
    finally:
        model.train(training)
    if tokens == 0:
        raise DataError(f"{count} held-out rows without a supervised token")
    loss = total / tokens
    return {"loss_lm": loss, "ppl": math.exp(loss), "tokens": tokens, "rows": count}
