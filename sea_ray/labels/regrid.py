"""Labels made on one patch grid, used by a tower with another (``data.label_grid: resample``).

The paper trains towers whose grid differs from the labeller's (Table 5: DINOv2 with CLIP-L
labels; SigLIP-SO400M/14-384 has 27 x 27 patches against CLIP-L/14-336's 24 x 24). A labels row
holds, for every patch of its grid (row-major), up to ``top_n`` (word id, score) pairs with scores
> 0 (padding: id -1, score 0). Both grids cover the same square of the image (the labels job and
the training stage fit an image to the square the same way, ``data.image_aspect``), so target
patch ``t`` overlaps source patch ``s`` on a fraction ``w[t, s]`` of its area (each row of ``w``
sums to 1; the overlap is separable: rows' overlap times columns'). The resampled score of word
``v`` on target patch ``t`` is::

    score_t(v) = sum_s w[t, s] * score_s(v)        (score_s(v) = 0 where v is not in s's top-n)

and ``t`` keeps its ``top_n`` best words by that score (descending; ties: the lower word id
first). A word that every overlapped source patch names keeps its score; a word only a sliver of
the patch carries is scaled down by the sliver's area. On equal grids the labels are returned
unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PAD_ID = -1


def overlap_1d(source: int, target: int) -> np.ndarray:
    """``[target, source]``: the fraction of each of ``target`` equal cells of [0, 1] covered by
    each of ``source`` equal cells (every row sums to 1)."""
    if source < 1 or target < 1:
        raise ValueError(f"grid sides must be >= 1, got {source} and {target}")
    s = np.arange(source + 1) / source
    t = np.arange(target + 1) / target
    covered = np.minimum(t[1:, None], s[None, 1:]) - np.maximum(t[:-1, None], s[None, :-1])
    return np.clip(covered, 0.0, None) * target


@lru_cache(maxsize=16)
def _pairs(source: tuple[int, int], target: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero entries of ``w`` (target patch, source patch, weight), row-major patches."""
    weights = np.kron(overlap_1d(source[0], target[0]), overlap_1d(source[1], target[1]))
    t, s = np.nonzero(weights > 1e-12)
    return t, s, weights[t, s]


def area_weights(source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """``w`` as a dense ``[target patches, source patches]`` array (for tests and reading)."""
    return np.kron(overlap_1d(source[0], target[0]), overlap_1d(source[1], target[1]))


def resample(ids: np.ndarray, scores: np.ndarray, source: tuple[int, int], target: tuple[int, int],
             top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's labels on the ``source`` grid -> ``(ids [Pt * top_n] int32, scores [Pt * top_n]
    float32)`` on the ``target`` grid (``ids``/``scores``: flat or ``[Ps, top_n]``, row-major)."""
    source, target = tuple(int(x) for x in source), tuple(int(x) for x in target)
    ids = np.asarray(ids).reshape(source[0] * source[1], top_n)
    scores = np.asarray(scores, dtype=np.float64).reshape(ids.shape)
    if source == target:
        return ids.reshape(-1).astype(np.int32), scores.reshape(-1).astype(np.float32)
    t, s, w = _pairs(source, target)
    cand_t = np.repeat(t, top_n)
    cand_v = ids[s].reshape(-1).astype(np.int64)
    cand_w = (scores[s] * w[:, None]).reshape(-1)
    keep = (cand_v >= 0) & (cand_w > 0)
    cand_t, cand_v, cand_w = cand_t[keep], cand_v[keep], cand_w[keep]
    patches = target[0] * target[1]
    out_ids = np.full((patches, top_n), PAD_ID, dtype=np.int32)
    out_scores = np.zeros((patches, top_n), dtype=np.float32)
    if not len(cand_v):
        return out_ids.reshape(-1), out_scores.reshape(-1)
    span = int(cand_v.max()) + 1
    keys, inverse = np.unique(cand_t * span + cand_v, return_inverse=True)
    summed = np.bincount(inverse, weights=cand_w)
    patch, word = keys // span, keys % span
    order = np.lexsort((word, -summed, patch))  # by patch, then score descending, then word id
    patch, word, summed = patch[order], word[order], summed[order]
    first = np.searchsorted(patch, patch, side="left")
    rank = np.arange(len(patch)) - first
    top = rank < top_n
    out_ids[patch[top], rank[top]] = word[top]
    out_scores[patch[top], rank[top]] = summed[top]
    return out_ids.reshape(-1), out_scores.reshape(-1)
