"""The error budget of the jobs that skip bad rows: the labels job and ``sea-ray import-manifest``,
and the pre-flight check of a labels dataset that align reads.

A job skips every bad row and lists it in its errors table (DESIGN.md section 4), but when its
error rows exceed ``max_error_fraction`` of its input rows it fails instead of completing: a
forgotten ``data.image_root`` makes every row an error, and an output made of errors is of no use
to the jobs after it. :func:`over_budget` is the one rule; :func:`describe` is what a refusal
prints (:class:`sea_ray.errors.TooManyErrors`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from itertools import islice
from typing import Iterable, Optional

NO_IMAGE = "no image"  # the reason of a row without an image where one is required (a filter, see importer)
EXAMPLES = 3           # example rows in a summary
KINDS = 8              # reason kinds listed in a summary

_PATH = re.compile(r"\S*(?:://|/)\S*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def over_budget(errors: int, rows: int, max_fraction: float) -> bool:
    """Whether ``errors`` error rows among ``rows`` input rows are more than ``max_fraction`` of
    them (exactly the fraction is still within the budget; ``max_fraction=0`` allows none)."""
    return errors > max_fraction * rows


def fraction(errors: int, rows: int) -> str:
    """``errors`` of ``rows`` as a percentage for messages."""
    return f"{100.0 * errors / rows:.1f}%" if rows else "n/a"


def reason_kind(reason: Optional[str]) -> str:
    """A reason without what differs row by row (paths, quoted ids, exception details), which is
    what a summary counts by: ``missing file: /data/x.jpg`` -> ``missing file``."""
    text = str(reason or "unknown")
    head = re.split(r": | \(", text, maxsplit=1)[0]
    head = _QUOTED.sub("'...'", _PATH.sub("...", head)).strip()
    return head or text[:80]


def describe(errors: Iterable[dict], image_root_key: Optional[str] = None, image_root: Optional[str] = None) -> str:
    """The summary of error rows (``ERRORS_SCHEMA`` dicts), a few indented lines: counts by stage,
    counts by stage and reason kind (the most frequent first), an example row (id, image, reason)
    of each of the most frequent kinds, and a hint when image files were missing and no image root
    was set (``image_root_key``: the setting that gives one, e.g. ``data.image_root``)."""
    errors = list(errors)
    stages = Counter(e.get("stage") or "?" for e in errors)
    kinds: Counter = Counter()
    first: dict[tuple[str, str], dict] = {}
    for e in errors:
        key = (e.get("stage") or "?", reason_kind(e.get("reason")))
        kinds[key] += 1
        first.setdefault(key, e)
    lines = ["  by stage: " + ", ".join(f"{s} {n}" for s, n in sorted(stages.items(), key=lambda x: (-x[1], x[0])))]
    lines.append("  by reason:")
    lines += [f"    {n:>8}  {stage}: {kind}" for (stage, kind), n in kinds.most_common(KINDS)]
    if len(kinds) > KINDS:
        lines.append(f"    ... and {len(kinds) - KINDS} other reason(s)")
    examples = [first[key] for key, _ in kinds.most_common(EXAMPLES)]
    examples += list(islice((e for e in errors if all(e is not x for x in examples)), EXAMPLES - len(examples)))
    lines.append("  examples:")
    lines += [f"    row {e.get('row')}, id {e.get('image_id')}, image {e.get('image')}: {e.get('reason')}"
              for e in examples]
    if image_root_key and not image_root and any(kind == "missing file" for _, kind in kinds):
        lines.append(f"  hint: {image_root_key} is not set, so relative image paths resolve against the working "
                     f"directory ({os.getcwd()}); set {image_root_key} to the folder the images are in")
    return "\n".join(lines)
