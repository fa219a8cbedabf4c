"""Evaluation metrics, pure functions (torch and the standard library only).

- :func:`normalize_answer` / :func:`qa_accuracy`: exact match after normalisation, overall and
  per question type;
- :func:`nearest_word_accuracy`: how often a visual token's nearest vocabulary word (argmax
  cosine against the words' LLM targets) is one of the patch's true words;
- :func:`tacs_mean`, :func:`modality_gap` (re-exported from :mod:`sea_ray.sea`): the paper's
  section-7 diagnostics;
- :func:`perplexity`: ``exp`` of the mean token negative log-likelihood.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Iterable, Sequence

import torch

from sea_ray.data.templates import adds_bos
from sea_ray.sea import modality_gap, nearest_word, tacs

__all__ = ["modality_gap", "nearest_word_accuracy", "normalize_answer", "perplexity", "qa_accuracy", "tacs_mean"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, whitespace collapsed (SQuAD/VQA style)."""
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_accuracy(predictions: Sequence[str], answers: Sequence[str], types: Sequence[str] | None = None) -> dict:
    """Exact match after :func:`normalize_answer`: ``{"accuracy", "count", "correct", "by_type"}``.

    ``by_type[t] = {"accuracy", "count", "correct"}``; an empty input gives accuracy None."""
    if len(predictions) != len(answers) or (types is not None and len(types) != len(answers)):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers"
                         + (f", {len(types)} types" if types is not None else ""))
    hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    groups: dict[str, list[bool]] = defaultdict(list)
    for hit, qtype in zip(hits, types if types is not None else [None] * len(hits)):
        if qtype is not None:
            groups[qtype].append(hit)

    def summary(values: list[bool]) -> dict:
        return {"accuracy": (sum(values) / len(values)) if values else None, "count": len(values),
                "correct": int(sum(values))}

    out = summary(hits)
    out["by_type"] = {t: summary(v) for t, v in sorted(groups.items())}
    return out


def nearest_word_accuracy(visual: torch.Tensor, vocab_targets: torch.Tensor,
                          truth: Sequence[Iterable[int]], groups: Sequence[str] | None = None) -> dict:
    """Nearest-word accuracy of visual tokens.

    Args:
        visual: ``[N, D]`` visual tokens (adapter outputs of N patches).
        vocab_targets: ``[V, D]`` the vocabulary words' LLM targets (:func:`sea_ray.sea.word_targets`).
        truth: per patch, the vocabulary indices of its true words (a patch with none is skipped).
        groups: optional per-patch group name (e.g. ``object`` / ``background``) for a breakdown.

    Returns ``{"accuracy", "patches", "chance", "by_group", "predicted"}``: ``chance`` is the
    accuracy of a uniformly random word (mean of ``|truth| / V``); ``predicted`` the argmax ids.
    """
    if visual.dim() != 2 or visual.shape[0] != len(truth):
        raise ValueError(f"visual must be [N, D] with N = {len(truth)} patches, got {tuple(visual.shape)}")
    if groups is not None and len(groups) != len(truth):
        raise ValueError(f"{len(groups)} groups for {len(truth)} patches")
    predicted = nearest_word(visual, vocab_targets).tolist()
    num_words = vocab_targets.shape[0]
    hits: list[bool] = []
    chance: list[float] = []
    by_group: dict[str, list[bool]] = defaultdict(list)
    for i, (pred, words) in enumerate(zip(predicted, truth)):
        words = set(words)
        if not words:
            continue
        hit = pred in words
        hits.append(hit)
        chance.append(len(words) / num_words)
        if groups is not None:
            by_group[groups[i]].append(hit)
    return {"accuracy": (sum(hits) / len(hits)) if hits else None, "patches": len(hits),
            "chance": (sum(chance) / len(chance)) if chance else None,
            "by_group": {g: {"accuracy": sum(v) / len(v), "patches": len(v)} for g, v in sorted(by_group.items())},
            "predicted": predicted}


def tacs_mean(visual_per_image: Sequence[torch.Tensor], text_per_image: Sequence[torch.Tensor],
              top_k: int = 10) -> float:
    """Mean over images of TACS (:func:`sea_ray.sea.tacs`): per image, the mean of the ``top_k``
    best visual-token-to-caption-token cosines."""
    if len(visual_per_image) != len(text_per_image) or not visual_per_image:
        raise ValueError("need one caption per image and at least one image")
    return sum(tacs(v, t, top_k) for v, t in zip(visual_per_image, text_per_image)) / len(visual_per_image)


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """``exp(nll_sum / num_tokens)``."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / num_tokens)


@torch.no_grad()
def lm_nll(llm, tokenizer, texts: Sequence[str], batch_size: int = 32, device=None) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens) of ``texts`` under a
    causal LM; each text is tokenized without special tokens (a bos is prepended when the
    tokenizer adds one by itself) and the first token is never predicted."""
    device = device or next(llm.parameters()).device
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    encoded = [bos + list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    encoded = [e for e in encoded if len(e) > 1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i:i + batch_size]
        length = max(len(e) for e in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for j, e in enumerate(batch):
            ids[j, :len(e)] = torch.tensor(e)
            mask[j, :len(e)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = llm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = mask[:, 1:].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total, count
