"""The label vocabulary: words from the manifest's captions plus an optional word list.

Rules (DESIGN.md section 1.2): every caption (the answers, ``gpt`` turns, of each valid manifest
row; for a pretraining manifest that is its caption) is lower-cased and split into alphabetic
tokens (runs of letters, so ``don't`` gives ``don`` and ``t``); stop-words (the built-in English
list below, or ``vocab.stopwords``), tokens shorter than ``vocab.min_length`` and tokens seen
fewer than ``vocab.min_count`` times are dropped; the most frequent remaining tokens are kept
(ties broken alphabetically) so that, together with the ``vocab.extra_words`` list (added as is,
lower-cased, whatever its frequency), the vocabulary holds at most ``vocab.max_size`` words
(the extra words always stay, even beyond that size).

The stored word order is alphabetical; a label id is an index into it. The content hash is the
sha256 of the sorted words joined by newlines, so it identifies the vocabulary exactly and is
recorded in the labels' metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from sea_ray import storage

_TOKEN = re.compile(r"[^\W\d_]+")  # runs of letters (Unicode-aware), nothing else

# A common English stop-word list (NLTK's, plus a few modal verbs and prepositions).
STOPWORDS: frozenset[str] = frozenset("""
a about above after again against all am an and any are aren as at be because been before being below
between both but by can couldn d did didn do does doesn doing don down during each few for from further
had hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn it
its itself just ll m ma me mightn more most mustn my myself needn no nor not now o of off on once only or
other our ours ourselves out over own re s same shan she should shouldn so some such t than that the
their theirs them themselves then there these they this those through to too under until up ve very was
wasn we were weren what when where which while who whom why will with won wouldn y you your yours
yourself yourselves also could would may might must shall upon onto within without via per
""".split())


@dataclass
class Vocab:
    """The words (alphabetical; a label id indexes this list), their caption counts and hash."""

    words: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return vocab_hash(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def to_dict(self, config: Optional[dict] = None) -> dict:
        out = {"size": len(self.words), "hash": self.hash, "words": list(self.words),
               "counts": {w: self.counts.get(w, 0) for w in self.words}, "extra_words": list(self.extra)}
        if config is not None:
            out["config"] = config
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Vocab":
        vocab = cls(words=list(data["words"]), counts=dict(data.get("counts", {})),
                    extra=list(data.get("extra_words", [])))
        if "hash" in data and data["hash"] != vocab.hash:
            raise ValueError(f"vocabulary hash mismatch: stored {data['hash']}, words give {vocab.hash}")
        return vocab


def vocab_hash(words: Iterable[str]) -> str:
    """sha256 of the sorted words joined by newlines (order-independent, exact)."""
    return hashlib.sha256("\n".join(sorted(words)).encode("utf-8")).hexdigest()


def tokenize(text: str) -> list[str]:
    """Lower-cased alphabetic tokens of ``text``."""
    return _TOKEN.findall(text.lower())


def _read_word_file(uri: str) -> list[str]:
    """One word per line; blank lines and ``#`` comments skipped; lower-cased; order kept, deduplicated."""
    words: list[str] = []
    seen: set[str] = set()
    for line in storage.read_text(uri).splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word and word not in seen:
            seen.add(word)
            words.append(word)
    return words


def count_words(captions: Iterable[str], stopwords: frozenset[str] | set[str], min_length: int) -> Counter:
    counts: Counter = Counter()
    for caption in captions:
        counts.update(t for t in tokenize(caption or "") if len(t) >= min_length and t not in stopwords)
    return counts


def build_vocab(captions: Iterable[str], cfg) -> Vocab:
    """The vocabulary of ``captions`` under ``cfg`` (a :class:`sea_ray.config.schema.VocabConfig`)."""
    stopwords = frozenset(_read_word_file(cfg.stopwords)) if cfg.stopwords else STOPWORDS
    extra = _read_word_file(cfg.extra_words) if cfg.extra_words else []
    counts = count_words(captions, stopwords, cfg.min_length)
    extra_set = set(extra)
    ranked = sorted((w for w, c in counts.items() if c >= cfg.min_count and w not in extra_set),
                    key=lambda w: (-counts[w], w))
    room = max(0, cfg.max_size - len(extra))
    words = sorted(set(ranked[:room]) | extra_set)
    return Vocab(words=words, counts={w: counts.get(w, 0) for w in words}, extra=extra)


def captions_of(rows: Iterable[dict]) -> Iterable[str]:
    """The caption text of manifest rows: every answer (``gpt`` turn); a pretraining row has one."""
    for row in rows:
        for turn in row.get("conversations") or []:
            if turn.get("from") == "gpt":
                yield turn.get("value") or ""


def vocab_from_config(cfg, rows: Optional[list[dict]] = None) -> Vocab:
    """Build the vocabulary of a labels config (``rows``: already-read valid manifest rows)."""
    if rows is None:
        from sea_ray.data.manifest import read_manifest

        rows = read_manifest(cfg.data.manifest, require_image=True, fmt=cfg.data.format,
                             columns=cfg.data.columns).rows
    return build_vocab(captions_of(rows), cfg.vocab)


def save_vocab(vocab: Vocab, uri: str, config: Optional[dict] = None) -> None:
    storage.write_text(uri, json.dumps(vocab.to_dict(config), indent=1, ensure_ascii=False) + "\n")


def load_vocab(uri: str) -> Vocab:
    return Vocab.from_dict(json.loads(storage.read_text(uri)))
