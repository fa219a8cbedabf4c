"""SEA (Supervised Embedding Alignment) core: targets, sampling, loss, diagnostics.

SEA adds token-level supervision to the adapter of a LLaVA-style model. Offline, a CLIP labeler
gives every image patch up to ``n`` vocabulary words with scores. Each word maps to the LLM's input
space as the mean of its token embeddings (paper Eq. 10, :func:`word_targets`). Each step takes one
random patch per ``k x k`` window (:func:`window_patch_indices`), draws one label per patch in
proportion to its scores (:func:`sample_labels`), keeps one pair per distinct label
(:func:`dedup_by_label`) and aligns the adapter outputs at those patches with the label targets by
a symmetric InfoNCE with a learnable, bounded temperature (paper Eq. 11, :class:`SeaLoss`), kept
outside the model as open_clip keeps ``ClipLoss`` (:func:`pair_loss` applies it to the model's
adapter outputs). The objective is ``L_lm + lambda * L_sea`` (:func:`lambda_at`).

Pure PyTorch; every random draw goes through the ``torch.Generator`` passed in. The collectives
live in :func:`gather_features` and :func:`average_gradients`, each with a world-size-1 fast path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "SCHEDULES",
    "SeaLoss",
    "average_gradients",
    "dedup_by_label",
    "gather_features",
    "lambda_at",
    "modality_gap",
    "nearest_word",
    "pair_loss",
    "sample_labels",
    "select_pairs",
    "tacs",
    "window_patch_indices",
    "word_targets",
]


# --------------------------------------------------------------------------------------------
# Word -> LLM space (paper Eq. 10)
# --------------------------------------------------------------------------------------------


def _word_token_ids(words: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each word as it appears mid-sentence (leading space, no special tokens).

    Encodes ``" " + word``; a first token that decodes to pure whitespace (a lone ``'▁'`` from
    some sentencepiece tokenizers) is dropped. Tokenizers that do not mark a leading space strip it
    themselves, so this also gives the word alone for them.
    """
    if not words:
        return []
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    ids = [list(map(int, e)) for e in encoded]
    firsts = [[e[0]] for e in ids if e]
    decoded = iter(tokenizer.batch_decode(firsts) if firsts else [])
    for e in ids:
        if e and next(decoded).strip() == "":
            del e[0]
    return ids


def word_targets(
    words: list[str], tokenizer: Any, embedding: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Mean input-embedding row of each word's tokens (paper Eq. 10).

    Args:
        words: vocabulary words.
        tokenizer: a Hugging Face tokenizer of the LLM.
        embedding: the LLM's frozen input-embedding weight, ``[vocab, D]``.

    Returns:
        ``(targets [num_mapped, D] float32, indices of the mapped words in ``words``, unmapped
        words)``. A word is unmapped when it is blank, gives no tokens, or any of its token ids is
        the unk id or outside the embedding's rows.
    """
    if embedding.dim() != 2:
        raise ValueError(f"embedding must be [vocab, D], got shape {tuple(embedding.shape)}")
    num_rows = embedding.shape[0]
    unk_id = getattr(tokenizer, "unk_token_id", None)

    candidates = [i for i, w in enumerate(words) if w.strip()]
    token_ids = dict(zip(candidates, _word_token_ids([words[i] for i in candidates], tokenizer)))

    rows: list[torch.Tensor] = []
    mapped: list[int] = []
    unmapped: list[str] = []
    for i, word in enumerate(words):
        ids = token_ids.get(i, [])
        if not ids or any(t == unk_id or not 0 <= t < num_rows for t in ids):
            unmapped.append(word)
            continue
        index = torch.tensor(ids, dtype=torch.long, device=embedding.device)
        rows.append(embedding.detach()[index].float().mean(dim=0))
        mapped.append(i)

    if rows:
        targets = torch.stack(rows)
    else:
        targets = embedding.new_zeros((0, embedding.shape[1]), dtype=torch.float32)
    return targets, mapped, unmapped


# --------------------------------------------------------------------------------------------
# Per-step sampling
# --------------------------------------------------------------------------------------------


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` float64 draws in ``[0, 1)`` from ``generator`` (on its device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device)


def window_patch_indices(
    grid_h: int, grid_w: int, k: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """One uniformly random patch per ``k x k`` window of a ``grid_h x grid_w`` patch grid.

    Windows are taken row-major; edge windows are partial when the grid is not divisible by ``k``.
    Returns flat row-major patch indices, one per window, in window order (CPU).
    """
    if grid_h < 1 or grid_w < 1 or k < 1:
        raise ValueError(f"need grid_h, grid_w, k >= 1, got {grid_h}, {grid_w}, {k}")
    rows_of_windows = math.ceil(grid_h / k)
    cols_of_windows = math.ceil(grid_w / k)
    top = torch.arange(rows_of_windows).repeat_interleave(cols_of_windows) * k
    left = torch.arange(cols_of_windows).repeat(rows_of_windows) * k
    height = (grid_h - top).clamp(max=k)
    width = (grid_w - left).clamp(max=k)

    n = top.numel()
    cpu = torch.device("cpu")
    dr = (_uniform(n, generator, cpu) * height).long().clamp_(max=height - 1)
    dc = (_uniform(n, generator, cpu) * width).long().clamp_(max=width - 1)
    return (top + dr) * grid_w + (left + dc)


def sample_labels(
    label_ids: torch.LongTensor,
    label_scores: torch.Tensor,
    patch_idx: torch.LongTensor,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Draw one label id per chosen patch with probability proportional to its scores.

    Args:
        label_ids: ``[P, n]`` word ids per patch; ``< 0`` is padding.
        label_scores: ``[P, n]`` scores; entries ``<= 0`` (or not finite) are never drawn.
        patch_idx: ``[m]`` chosen patches (rows of ``label_ids``).

    Returns:
        ``[m]`` drawn ids; ``-1`` for a patch with no valid entry.
    """
    if label_ids.dim() != 2 or label_ids.shape != label_scores.shape:
        raise ValueError(
            "label_ids and label_scores must both be [P, n], got "
            f"{tuple(label_ids.shape)} and {tuple(label_scores.shape)}"
        )
    patch_idx = patch_idx.to(label_ids.device)
    ids = label_ids[patch_idx]
    scores = label_scores[patch_idx].to(torch.float64)
    valid = (ids >= 0) & (scores > 0) & torch.isfinite(scores)
    weights = torch.where(valid, scores, torch.zeros_like(scores))

    # Inverse-CDF draw: the first column whose cumulative weight exceeds u * total. Zero-weight
    # columns never exceed their predecessor, so they are never drawn; keeping the target strictly
    # below the total keeps the pick inside the row.
    u = _uniform(ids.shape[0], generator, ids.device).unsqueeze(1)
    if ids.shape[1] == 0:
        return torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    col = torch.searchsorted(cdf, target, right=True).clamp_(max=ids.shape[1] - 1)
    drawn = ids.gather(1, col).squeeze(1).long()
    return torch.where(valid.any(dim=1), drawn, torch.full_like(drawn, -1))


def dedup_by_label(
    labels: torch.LongTensor, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Indices keeping exactly one random element per distinct label ``>= 0``, ascending."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n = labels.numel()
    gen_device = generator.device if generator is not None else labels.device
    perm = torch.randperm(n, generator=generator, device=gen_device).to(labels.device)
    shuffled = labels[perm]
    # After a stable sort of the shuffled labels, the first of each run is a uniform pick.
    sorted_labels, order = torch.sort(shuffled, stable=True)
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    keep = perm[order[first & (sorted_labels >= 0)]]
    return keep.sort().values


def select_pairs(
    label_ids: torch.Tensor,
    label_scores: torch.Tensor,
    grid: tuple[int, int],
    k: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """One step's SEA pairs for a batch: ``(image_index, patch_index, label)``, one entry each.

    ``label_ids``/``label_scores`` are ``[B, P, n]`` (padding: id < 0). Per image: one random patch
    per ``k x k`` window, one label per patch drawn by score; patches without a label are
    skipped; over the whole batch one pair per distinct label is kept.
    """
    images, patches, labels = [], [], []
    for b in range(label_ids.shape[0]):
        idx = window_patch_indices(grid[0], grid[1], k, generator)
        drawn = sample_labels(label_ids[b], label_scores[b], idx, generator)
        keep = drawn >= 0
        images.append(torch.full((int(keep.sum()),), b, dtype=torch.long))
        patches.append(idx[keep])
        labels.append(drawn[keep])
    if not labels:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    image_index, patch_index, label = torch.cat(images), torch.cat(patches), torch.cat(labels).cpu()
    keep = dedup_by_label(label, generator)
    return image_index[keep], patch_index[keep], label[keep]


# --------------------------------------------------------------------------------------------
# Loss (paper Eq. 11)
# --------------------------------------------------------------------------------------------


class SeaLoss(torch.nn.Module):
    """Symmetric InfoNCE between visual tokens and word targets, in-batch negatives.

    The temperature is a CLIP-style logit scale ``log(1/T)``, used unclamped in the loss so its
    gradient never vanishes at a bound. As in open_clip, the training recipe calls :meth:`clamp_`
    after every optimizer step, which clamps the parameter in place to
    ``[log(1/max_temperature), log(1/min_temperature)]``; a temperature that reaches a bound can
    therefore move off it again. A learnable temperature must start strictly inside
    ``(min_temperature, max_temperature)``; a fixed one (``learnable=False``) never moves, so it may
    sit on a bound (``min_temperature == init_temperature == max_temperature`` pins it).
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if learnable and not 0 < min_temperature < init_temperature < max_temperature:
            raise ValueError(
                "a learnable temperature needs 0 < min_temperature < init_temperature < "
                f"max_temperature, got {min_temperature}, {init_temperature}, {max_temperature}"
            )
        if not learnable and not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "need 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.learnable = learnable
        self.log_inv_temperature = torch.nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable
        )

    def _logit_scale(self) -> torch.Tensor:
        return self.log_inv_temperature.exp()

    @torch.no_grad()
    def clamp_(self) -> "SeaLoss":
        """Clamp the temperature parameter in place to its bounds; call after each optimizer step."""
        low, high = math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        self.log_inv_temperature.clamp_(low, high)
        return self

    @property
    def temperature(self) -> float:
        """Current temperature (within its bounds once :meth:`clamp_` has run)."""
        return float(1.0 / self._logit_scale().detach())

    def forward(
        self,
        visual: torch.Tensor,
        targets: torch.Tensor,
        all_visual: torch.Tensor | None = None,
        all_targets: torch.Tensor | None = None,
        rank_offset: int = 0,
    ) -> dict[str, Any]:
        """Loss parts for ``N`` local pairs ``(visual[i], targets[i])``.

        With ``all_visual``/``all_targets`` (gathered from all workers, local rows starting at
        ``rank_offset``), the local rows are scored against every gathered column. Fewer than two
        candidates give a zero loss that keeps every input in the graph.
        """
        if visual.dim() != 2 or visual.shape != targets.shape:
            raise ValueError(
                "visual and targets must both be [N, D], got "
                f"{tuple(visual.shape)} and {tuple(targets.shape)}"
            )
        if (all_visual is None) != (all_targets is None):
            raise ValueError("pass both all_visual and all_targets, or neither")
        if all_visual is None or all_targets is None:
            all_visual, all_targets, rank_offset = visual, targets, 0
        elif all_visual.shape != all_targets.shape or all_visual.shape[1:] != visual.shape[1:]:
            raise ValueError(
                "all_visual and all_targets must both be [G, D] with the local D, got "
                f"{tuple(all_visual.shape)} and {tuple(all_targets.shape)}"
            )
        n, num_columns = visual.shape[0], all_visual.shape[0]
        if not 0 <= rank_offset <= num_columns - n:
            raise ValueError(
                f"rank_offset {rank_offset} does not place {n} local rows in {num_columns}"
            )

        scale = self._logit_scale()
        temperature = (1.0 / scale).detach()
        if n == 0 or num_columns < 2:
            zero = (visual.sum() + targets.sum() + all_visual.sum() + all_targets.sum()) * 0
            zero = zero.float() + scale * 0
            return {
                "loss": zero,
                "loss_v2t": zero.detach(),
                "loss_t2v": zero.detach(),
                "temperature": temperature,
                "num_pairs": n,
            }

        v = F.normalize(visual.float(), dim=-1)
        t = F.normalize(targets.float(), dim=-1)
        if all_visual is visual:
            all_v, all_t = v, t
        else:
            all_v = F.normalize(all_visual.float(), dim=-1)
            all_t = F.normalize(all_targets.float(), dim=-1)
        labels = torch.arange(n, device=v.device) + rank_offset
        loss_v2t = F.cross_entropy(scale * v @ all_t.T, labels)
        loss_t2v = F.cross_entropy(scale * t @ all_v.T, labels)
        return {
            "loss": (loss_v2t + loss_t2v) / 2,
            "loss_v2t": loss_v2t.detach(),
            "loss_t2v": loss_t2v.detach(),
            "temperature": temperature,
            "num_pairs": n,
        }


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x [N, D]`` across the default process group; ``N`` may differ per rank.

    Gradients flow back to every rank's slice (``torch.distributed.nn.functional.all_gather``), so
    each worker's local-rows loss gives the full gradient. Returns ``(gathered, rank_offset)``, the
    index where this rank's rows begin. Not initialised or world size 1: ``(x, 0)``.

    Every rank must call it (it is a collective), also ranks with ``N == 0``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    offset = sum(counts[:rank])
    longest = max(counts)
    if longest == 0:
        return x, 0
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0]))
    parts = all_gather(padded.contiguous())
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts)])
    return gathered, offset


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return 1.0 - progress


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
}


def lambda_at(step: int, total_steps: int, weight: float, schedule: str = "constant") -> float:
    """SEA weight at ``step``: ``weight`` times a factor decaying from 1 (step 0) to 0 (end)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lambda schedule {schedule!r}; valid: {sorted(SCHEDULES)}")
    if schedule == "constant":
        return float(weight)
    if total_steps <= 0:
        raise ValueError(f"schedule {schedule!r} needs total_steps > 0, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return float(weight) * SCHEDULES[schedule](progress)


def pair_loss(loss_fn: "SeaLoss", visual: torch.Tensor | None, pairs: tuple, negatives: str = "local") -> dict:
    """The SEA loss parts of one micro-batch: ``pairs = (image_index, patch_index, targets)``
    picks the adapter outputs ``visual [B, P, D]`` that are scored against their targets;
    ``negatives="global"`` scores them against every worker's pairs (:func:`gather_features`, a
    collective: every rank calls it, also one without images)."""
    image_index, patch_index, targets = pairs
    if visual is None:
        chosen = targets.new_zeros((0, targets.shape[-1]))
    else:
        chosen = visual[image_index, patch_index]
    targets = targets.to(chosen.dtype)
    if negatives == "global":
        all_visual, offset = gather_features(chosen)
        all_targets, _ = gather_features(targets)
        return loss_fn(chosen, targets, all_visual, all_targets, rank_offset=offset)
    return loss_fn(chosen, targets)


def average_gradients(params) -> None:
    """Average the gradients of ``params`` across the default process group (parameters that
    live outside the DDP-wrapped model, such as the SEA temperature). World size 1: nothing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= dist.get_world_size()


# --------------------------------------------------------------------------------------------
# Diagnostics (paper section 7)
# --------------------------------------------------------------------------------------------


def _non_empty_2d(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got {tuple(x.shape)}")
    return F.normalize(x.detach().float(), dim=-1)


@torch.no_grad()
def nearest_word(visual: torch.Tensor, vocab_targets: torch.Tensor) -> torch.LongTensor:
    """Index of the vocabulary target with the highest cosine to each visual token, ``[N]``."""
    w = _non_empty_2d("vocab_targets", vocab_targets)
    v = F.normalize(visual.detach().float(), dim=-1)
    return (v @ w.T).argmax(dim=1)


@torch.no_grad()
def modality_gap(visual: torch.Tensor, text: torch.Tensor) -> float:
    """Distance between the centroids of the L2-normalised visual and text embeddings."""
    v = _non_empty_2d("visual", visual)
    t = _non_empty_2d("text", text)
    return float(torch.linalg.vector_norm(v.mean(dim=0) - t.mean(dim=0)))


@torch.no_grad()
def tacs(visual_tokens: torch.Tensor, text_tokens: torch.Tensor, top_k: int = 10) -> float:
    """Mean of the ``top_k`` largest best-caption-token cosines over the visual tokens."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    v = _non_empty_2d("visual_tokens", visual_tokens)
    t = _non_empty_2d("text_tokens", text_tokens)
    best = (v @ t.T).max(dim=1).values
    return float(best.topk(min(top_k, best.numel())).values.mean())
