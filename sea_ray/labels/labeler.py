"""The patch labeler (pure PyTorch, no Ray): top-n vocabulary words per image patch.

For a vision tower with a paired text tower (open_clip or Hugging Face CLIP, see
:mod:`sea_ray.model.vision`):

1. every word is embedded once: each prompt template (``"a photo of a {}."``) filled with the
   word goes through the text tower; the embeddings are L2-normalised, averaged over templates
   (the CLIP prompt ensemble) and normalised again -> ``[V, D]``;
2. an image batch gives patch features in the joint space (``features="joint"``: final layer ->
   ln_post -> projection; ``"dense"``: the MaskCLIP value path in the last block), class token
   dropped, L2-normalised -> ``[B, P, D]``;
3. score = cosine between a patch and a word, times -1 when ``score_sign="negate"`` (the paper's
   reading of CLIP Surgery); for each patch the ``top_n`` highest scores that are > 0 are kept,
   the rest padded with id -1 and score 0.

Scores are computed in fp32 and stored as float16; a kept score that would round to 0 in float16
is stored as the smallest positive float16 instead, so "id >= 0 <=> score > 0" holds on disk too.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PAD_ID = -1
FP16_TINY = 2.0 ** -24  # the smallest positive float16 (subnormal)
_SIM_BUDGET = 1 << 25  # max elements of one [chunk, P, V] similarity block on the CPU (128 MiB in fp32)
_SIM_BUDGET_GPU = 1 << 28  # on a GPU (1 GiB): fewer, larger matmul + topk calls (about 8 % faster, H200)


@torch.no_grad()
def word_embeddings(encode_text: Callable[[list[str]], torch.Tensor], words: Sequence[str],
                    templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``[V, D]`` unit vectors: per word, the renormalised mean of its templates' unit embeddings."""
    if not words:
        raise ValueError("the vocabulary is empty")
    total = None
    for template in templates:
        prompts = [template.format(w) for w in words]
        parts = [F.normalize(encode_text(prompts[i:i + batch_size]).float(), dim=-1)
                 for i in range(0, len(prompts), batch_size)]
        emb = torch.cat(parts)
        total = emb if total is None else total + emb
    return F.normalize(total / len(templates), dim=-1)


def select_top_n(scores: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [..., V]`` -> ``(ids [..., top_n] int32, scores [..., top_n] float16)``.

    Keeps the ``top_n`` highest scores that are > 0 (in descending order); pads with id -1 and
    score 0. ``top_n`` may exceed V (the rest is padding).
    """
    k = min(top_n, scores.shape[-1])
    values, ids = scores.float().topk(k, dim=-1)
    keep = values > 0
    ids = torch.where(keep, ids, torch.full_like(ids, PAD_ID)).to(torch.int32)
    values = torch.where(keep, values.clamp_min(FP16_TINY), torch.zeros_like(values)).to(torch.float16)
    if k < top_n:
        pad = list(ids.shape[:-1]) + [top_n - k]
        ids = torch.cat([ids, torch.full(pad, PAD_ID, dtype=torch.int32, device=ids.device)], dim=-1)
        values = torch.cat([values, torch.zeros(pad, dtype=torch.float16, device=values.device)], dim=-1)
    return ids, values


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class PatchLabeler:
    """Labels image batches with the top-n vocabulary words per patch.

    ``tower``: anything with ``encode_text(list[str]) -> [N, D]`` and
    ``joint_patch_features(images, dense=bool) -> [B, P, D]`` (a :class:`~sea_ray.model.vision.VisionTower`).
    Text embeddings are computed once, here.
    """

    def __init__(self, tower, words: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 top_n: int = 10, score_sign: str = "raw", features: str = "joint", precision: str = "auto",
                 text_batch_size: int = 256):
        if score_sign not in ("raw", "negate"):
            raise ValueError(f"score_sign must be 'raw' or 'negate', got {score_sign!r}")
        if features not in ("joint", "dense"):
            raise ValueError(f"features must be 'joint' or 'dense', got {features!r}")
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        self.tower = tower
        self.words = list(words)
        self.templates = list(templates)
        self.top_n = int(top_n)
        self.score_sign = score_sign
        self.features = features
        self.precision = precision
        self.device = self._device()
        with self._autocast():
            self.text = word_embeddings(tower.encode_text, self.words, self.templates, text_batch_size)

    @classmethod
    def from_config(cls, tower, words: Sequence[str], labeler_cfg) -> "PatchLabeler":
        """From a :class:`sea_ray.config.schema.LabelerConfig`."""
        return cls(tower, words, templates=labeler_cfg.templates, top_n=labeler_cfg.top_n,
                   score_sign=labeler_cfg.score_sign, features=labeler_cfg.features,
                   precision=labeler_cfg.precision, text_batch_size=labeler_cfg.text_batch_size)

    def _device(self) -> torch.device:
        params = getattr(self.tower, "parameters", None)
        if params is not None:
            try:
                return next(iter(params())).device
            except StopIteration:
                pass
        return torch.device("cpu")

    def _autocast(self):
        return _autocast(self.device, self.precision)

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, P, D]`` unit patch features in the joint space (the configured variant)."""
        with self._autocast():
            feats = self.tower.joint_patch_features(images.to(self.device), dense=self.features == "dense")
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, P, V]`` signed cosine scores (``negate`` flips the sign)."""
        sim = self.patch_features(images) @ self.text.T
        return -sim if self.score_sign == "negate" else sim

    @torch.no_grad()
    def label_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-n labels of unit patch features ``[B, P, D]`` (chunked so [B, P, V] never gets huge)."""
        b, p, _ = feats.shape
        v = self.text.shape[0]
        budget = _SIM_BUDGET if feats.device.type == "cpu" else _SIM_BUDGET_GPU
        step = max(1, budget // max(1, p * v))
        ids, vals = [], []
        for i in range(0, b, step):
            sim = feats[i:i + step] @ self.text.T
            if self.score_sign == "negate":
                sim = sim.neg_()
            a, s = select_top_n(sim, self.top_n)
            ids.append(a)
            vals.append(s)
        return torch.cat(ids), torch.cat(vals)

    @torch.no_grad()
    def label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, H, W]`` (the tower's transform) -> ``(ids [B, P, n] int32, scores [B, P, n] float16)``."""
        ids, vals = self.label_features(self.patch_features(images))
        return ids.cpu(), vals.cpu()
