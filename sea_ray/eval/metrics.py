"""Evaluation metrics, pure functions (torch and the standard library only).

- :func:`normalize_answer` / :func:`qa_accuracy`: exact match after normalisation, overall and
  per question type;
- :func:`normalize_vqa_answer` / :func:`vqa_accuracy`: the VQAv2 evaluation's answer
  normalisation and its accuracy, ``min(1, matches / 3)`` averaged over the references;
- :func:`nearest_word_accuracy`: how often a visual token's nearest vocabulary word (argmax
  cosine against the words' LLM targets) is one of the patch's true words;
- :func:`word_accuracy`: the same from nearest-word ids computed batch by batch;
- :func:`tacs_mean`, :func:`modality_gap` (re-exported from :mod:`sea_ray.sea`): the paper's
  section-7 diagnostics; :class:`ModalityGap`: the gap over batches;
- :func:`perplexity`: ``exp`` of the mean token negative log-likelihood.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from sea_ray.data.templates import adds_bos
from sea_ray.sea import modality_gap, nearest_word, tacs

__all__ = ["ModalityGap", "modality_gap", "nearest_word_accuracy", "normalize_answer", "normalize_vqa_answer",
           "perplexity", "qa_accuracy", "tacs_mean", "vqa_accuracy", "word_accuracy"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, whitespace collapsed (SQuAD/VQA style)."""
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --------------------------------------------------------------------------- VQA accuracy
#
# The normalisation of the VQAv2 evaluation, written from its description: the answer with
# newlines and tabs as spaces and stripped; then punctuation: each of the characters below is
# deleted when it touches a space, or when the answer holds a digit-comma-digit group ("1,000"),
# and becomes a space otherwise; a period is deleted unless a digit follows it ("2.5" stays);
# then per word, lower-cased: number words up to ten (and "none") become digits, the articles
# a / an / the are dropped, and an apostrophe-less contraction ("dont") becomes the contraction.

_VQA_PUNCT = tuple(";/[]\"{}()=+\\_-><@`,?!")
_VQA_DIGIT_COMMA = re.compile(r"\d,\d")
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = frozenset(("a", "an", "the"))
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd", "i'd've",
    "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've",
    "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't",
    "she'd", "she'd've", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
    "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd",
    "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who're", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've")
# The apostrophe-less spelling of each (the VQA evaluation's contraction map), except where that
# spelling is itself a word (it's -> its, we'll -> well, i'd -> id, she'd -> shed, let's -> lets ...).
_WORDS = frozenset(("its", "well", "were", "hell", "ill", "id", "shed", "wed", "shell", "lets", "whore"))
_VQA_CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTIONS if c.replace("'", "") not in _WORDS}


def normalize_vqa_answer(text: str) -> str:
    """An answer normalised as the VQAv2 evaluation normalises answers (its processPunctuation then
    processDigitArticle): ``"Two dogs."`` -> ``"2 dogs"``, ``"the cat"`` -> ``"cat"``,
    ``"dont"`` -> ``"don't"``, ``"1,000"`` -> ``"1000"``."""
    text = (text or "").replace("\n", " ").replace("\t", " ").strip()
    glued = bool(_VQA_DIGIT_COMMA.search(text))
    out = text
    for mark in _VQA_PUNCT:
        touches = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if glued or touches else " ")
    out = _VQA_PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction: with several references, the mean over each reference left
    out of ``min(1, matches among the others / 3)`` (the VQAv2 evaluation); with a single
    reference, 1.0 when the normalised strings are equal, else 0.0."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


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
    return word_accuracy(nearest_word(visual, vocab_targets).tolist(), vocab_targets.shape[0], truth, groups)


def word_accuracy(predicted: Sequence[int], num_words: int, truth: Sequence[Iterable[int]],
                  groups: Sequence[str] | None = None) -> dict:
    """:func:`nearest_word_accuracy` of nearest-word ids already computed (``predicted``, one per
    patch, out of ``num_words`` words), e.g. batch by batch."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted words for {len(truth)} patches")
    if groups is not None and len(groups) != len(truth):
        raise ValueError(f"{len(groups)} groups for {len(truth)} patches")
    predicted = list(predicted)
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


class ModalityGap:
    """:func:`sea_ray.sea.modality_gap` over batches: the distance between the centroids of the
    L2-normalised visual and text embeddings, from running sums (float64)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = {"visual": 0, "text": 0}

    def add(self, visual: torch.Tensor, text: torch.Tensor) -> None:
        for name, x in (("visual", visual), ("text", text)):
            if x.dim() != 2:
                raise ValueError(f"{name} must be [N, D], got {tuple(x.shape)}")
            part = F.normalize(x.detach().float(), dim=-1).double().sum(dim=0)
            self.sums[name] = part if name not in self.sums else self.sums[name] + part
            self.counts[name] += x.shape[0]

    def value(self) -> float:
        if not self.counts["visual"] or not self.counts["text"]:
            raise ValueError("the modality gap needs visual and text embeddings")
        centroids = [self.sums[n] / self.counts[n] for n in ("visual", "text")]
        return float(torch.linalg.vector_norm(centroids[0] - centroids[1]))


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
