"""Batching encoded samples into tensors for the VLM (``sea_ray.model.vlm.VLM.forward``).

A sample is a dict with ``input_ids`` and ``labels`` (lists, numpy arrays or tensors, as
produced by ``sea_ray.data.templates``), optionally an ``image`` (a preprocessed ``[3, H, W]``
array or tensor; ``None`` or absent for a text-only sample) and, for SEA, ``label_ids`` /
``label_scores`` (``[P, n]`` arrays, see ``sea_ray.labels.schema.to_arrays``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from sea_ray.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from sea_ray.labels.schema import PAD_ID


def _has_image(sample: dict) -> bool:
    return sample.get("image") is not None


def _as_long(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values,
                           dtype=torch.long).reshape(-1)


def collate(samples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    Returns ``input_ids`` [B, T] (padded with ``pad_id``), ``attention_mask`` [B, T],
    ``labels`` [B, T] (padded with ``IGNORE_INDEX``), ``num_tokens`` (0-dim: supervised tokens
    in the batch) and, when any sample has an image, ``images`` [N_img, 3, H, W] stacked in
    sample order (image samples only). When image samples carry ``label_ids``/``label_scores``
    they are stacked as ``label_ids`` [N_img, P, n] long and ``label_scores`` float32 (an image
    sample without labels gets ``-1``/``0``: no label). The sentinel count of each sample must
    match whether it has an image (one, or none)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids = [_as_long(s["input_ids"]) for s in samples]
    labs = [_as_long(s["labels"]) for s in samples]
    for b, (i, lab) in enumerate(zip(ids, labs)):
        if i.shape != lab.shape:
            raise ValueError(f"sample {b}: {i.numel()} input_ids but {lab.numel()} labels")
        n_sentinel = int((i == IMAGE_TOKEN_INDEX).sum())
        if n_sentinel != int(_has_image(samples[b])):
            raise ValueError(f"sample {b} has {n_sentinel} image placeholder(s) but "
                             f"{'an' if _has_image(samples[b]) else 'no'} image")
    length = max(i.numel() for i in ids)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for b, (i, lab) in enumerate(zip(ids, labs)):
        input_ids[b, : i.numel()] = i
        labels[b, : lab.numel()] = lab
        attention_mask[b, : i.numel()] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "num_tokens": (labels != IGNORE_INDEX).sum()}

    with_image = [s for s in samples if _has_image(s)]
    if with_image:
        out["images"] = torch.stack([torch.as_tensor(np.asarray(s["image"]) if not isinstance(s["image"], torch.Tensor)
                                                     else s["image"]) for s in with_image])
        labelled = [s for s in with_image if s.get("label_ids") is not None]
        if labelled:
            shape = np.asarray(labelled[0]["label_ids"]).shape
            label_ids, label_scores = [], []
            for s in with_image:
                if s.get("label_ids") is None:
                    label_ids.append(np.full(shape, PAD_ID, dtype=np.int64))
                    label_scores.append(np.zeros(shape, dtype=np.float32))
                    continue
                li, ls = np.asarray(s["label_ids"]), np.asarray(s["label_scores"])
                if li.shape != shape or ls.shape != shape:
                    raise ValueError(f"label arrays of shape {li.shape}/{ls.shape} in a batch of {shape}")
                label_ids.append(li.astype(np.int64, copy=False))
                label_scores.append(ls.astype(np.float32, copy=False))
            out["label_ids"] = torch.from_numpy(np.stack(label_ids))
            out["label_scores"] = torch.from_numpy(np.stack(label_scores))
    return out
