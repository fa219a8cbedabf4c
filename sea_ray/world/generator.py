"""The synthetic world: coloured shapes on textured backgrounds, with exact ground truth.

The embedded default dataset. It makes the whole SEA pipeline run offline and makes it
measurable: label precision of the patch labeler against the true word of every patch,
nearest-word accuracy of visual tokens, and QA accuracy on unambiguous short-answer questions.

A *record* (one image) is a plain dict, everything needed to re-render the image exactly::

    {"id": "world_000123", "image": "world_000123.png", "split": "train", "image_size": 224,
     "background": "gray", "texture_seed": 123456,
     "objects": [{"color": "red", "shape": "circle", "size": "large", "position": "left",
                  "cx": 40.31, "cy": 112.87, "radius": 31.5}, ...],
     "caption": "a large red circle on the left, on a gray background"}

Geometry is in pixels. ``cx, cy`` is the object's centre and ``radius`` the half side of its
bounding square. A pixel ``(x, y)`` is tested at its centre ``(x + 0.5, y + 0.5)``; masks are
antialias-free, so each pixel belongs to exactly one owner: the last object drawn whose mask
covers it, else the background. Objects never overlap (their bounding squares are kept apart).

Patch grids: a ``grid_h x grid_w`` grid over an ``S x S`` image has row ``i`` covering pixel
rows ``[floor(i * S / grid_h), floor((i + 1) * S / grid_h))`` (columns alike). For a grid that
divides ``S`` these are the usual equal patches; otherwise patch sizes differ by at most one
pixel and every pixel belongs to exactly one patch. A patch belongs to an object when that object
owns strictly more than ``min_fraction`` (default one half) of the patch's pixels; otherwise it
is a background patch. Its ground-truth words are ``[colour, shape]`` for an object patch and
``[background colour]`` for a background patch.

Everything is deterministic: image ``i`` of seed ``s`` draws its scene from
``numpy.random.default_rng([s, i, 0])``, its caption from ``default_rng([s, i, 1])`` and its
instruction and QA from ``default_rng([s, i, 2])``, so it depends neither on ``num_images`` nor
on the split fractions (text-only samples of split ``j`` use ``default_rng([s, j, 3])``).
``generate_world`` writes byte-identical files for the same arguments.

Files written by :func:`generate_world` under ``out_dir``::

    images/world_000000.png ...         the images (RGB PNG, image_size x image_size)
    <split>/pretrain.json                LLaVA blip_laion_cc_sbu_558k.json layout (caption turns)
    <split>/instruct.json                LLaVA llava_v1_5_mix665k.json layout (QA turns + text-only)
    <split>/qa.jsonl                     flat QA for evaluation: one question per line
    ground_truth.parquet                 one row per image: the record (objects as JSON)
    world.json                           parameters, counts, words; written last (completion mark)

for ``split`` in ``train``, ``val``, ``test``. Manifest ``image`` paths are relative to
``out_dir/images``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sea_ray import storage

WORLD_VERSION = 1

# --------------------------------------------------------------------------- the vocabulary

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: tuple[str, ...] = ("gray", "brown", "pink", "teal")  # never an object colour

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "brown": (120, 78, 40),
    "pink": (240, 165, 190),
    "teal": (20, 128, 128),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")
QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "existence", "position")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Anchor (x, y) of each position as a fraction of the image side.
_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.18), "bottom": (0.5, 0.82),
    "center": (0.5, 0.5),
}
_HALF_EXTENT = {"small": 0.08, "large": 0.14}  # bounding-square half side / image side
_SIZE_JITTER = 0.1  # +-10 % within a size class: classes never meet (0.088 < 0.126)
_POS_JITTER = 0.025  # +- anchor jitter, fraction of the side
_GAP = 0.02  # minimum gap between bounding squares, fraction of the side
_MAX_OBJECTS = 3
_TEXTURE_AMPLITUDE = 14  # low-frequency background texture, +- levels
_TEXTURE_KNOTS = 5  # the texture is bilinear between a 5 x 5 grid of random values
_NOISE_AMPLITUDE = 1  # per-pixel background luminance noise, +- levels

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}

_CAPTION_TEMPLATES = (
    "{objects}, on a {background} background",
    "{objects} against a {background} background",
    "a {background} background with {objects}",
    "an image of {objects} against a {background} background",
    "a picture showing {objects}, on a {background} background",
)
PRETRAIN_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Write a terse but informative summary of the picture.",
)
_QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {ref}?", "What is the color of the {ref}?"),
    "shape": ("What shape is the {ref}?", "Which shape is the {ref}?"),
    "count": ("How many objects are there?", "How many objects are in the image?",
              "How many shapes can you see?"),
    "existence": ("Is there {article} {color} {shape}?",
                  "Is there {article} {color} {shape} in the image?"),
    "position": ("Where is the {ref}?", "In which part of the image is the {ref}?"),
}
# Text-only samples (mix665k has text-only conversations): true facts in the world's words.
_TEXT_FACTS: tuple[tuple[str, str], ...] = (
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and blue?", "purple"),
    ("What color do you get by mixing black and white?", "gray"),
    ("What color do you get by mixing red and white?", "pink"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many sides does a diamond have?", "four"),
    ("How many corners does a circle have?", "zero"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("What is the opposite of top?", "bottom"),
    ("What is the opposite of bottom?", "top"),
    ("What is the opposite of small?", "large"),
    ("What is the opposite of large?", "small"),
    ("Is red a color or a shape?", "color"),
    ("Is a circle a color or a shape?", "shape"),
    ("Is a cross a color or a shape?", "shape"),
    ("Is teal a color or a shape?", "color"),
)
_TEXT_EVERY = 20  # one text-only sample per this many image samples (at least one per split)

_WORD_RE = re.compile(r"[a-z]+")


def _words_of(text: str) -> list[str]:
    return _WORD_RE.findall(re.sub(r"\{[^}]*\}", " ", text).lower())


def world_words() -> list[str]:
    """Every word that can appear in any caption, instruction, question or answer, sorted."""
    words: set[str] = set()
    for group in (COLORS, SHAPES, SIZES, POSITIONS, BACKGROUNDS, NUMBER_WORDS, ("yes", "no")):
        words.update(group)
    texts = [*_WHERE.values(), *_CAPTION_TEMPLATES, *PRETRAIN_INSTRUCTIONS, " and ",
             "object", *(t for ts in _QUESTION_TEMPLATES.values() for t in ts),
             *(q + " " + a for q, a in _TEXT_FACTS)]
    for text in texts:
        words.update(_words_of(text))
    return sorted(words)


def patch_words() -> list[str]:
    """Every word a patch's ground truth can hold (object colours, shapes, backgrounds), sorted."""
    return sorted({*COLORS, *SHAPES, *BACKGROUNDS})


# --------------------------------------------------------------------------- scenes


def _boxes_apart(a: dict, b: dict, gap: float) -> bool:
    reach = a["radius"] + b["radius"] + gap
    return abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach


def _sample_objects(rng: np.random.Generator, size: int) -> list[dict]:
    n_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    for _attempt in range(64):
        objects = []
        for p in rng.permutation(len(POSITIONS))[:n_objects]:
            position = POSITIONS[int(p)]
            size_word = SIZES[int(rng.integers(len(SIZES)))]
            radius = _HALF_EXTENT[size_word] * size * (1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
            ax, ay = _ANCHORS[position]
            cx = (ax + rng.uniform(-_POS_JITTER, _POS_JITTER)) * size
            cy = (ay + rng.uniform(-_POS_JITTER, _POS_JITTER)) * size
            cx = min(max(cx, radius + 1.0), size - radius - 1.0)
            cy = min(max(cy, radius + 1.0), size - radius - 1.0)
            objects.append({
                "color": COLORS[int(rng.integers(len(COLORS)))],
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "size": size_word,
                "position": position,
                "cx": round(float(cx), 2),
                "cy": round(float(cy), 2),
                "radius": round(float(radius), 2),
            })
        gap = max(1.0, _GAP * size)
        if all(_boxes_apart(a, b, gap) for i, a in enumerate(objects) for b in objects[i + 1:]):
            return objects
        if _attempt % 16 == 15:  # very rarely: no layout found, try one object fewer
            n_objects = max(1, n_objects - 1)
    return objects[:1]  # pragma: no cover - one object always fits


def sample_record(seed: int, index: int, image_size: int = 224) -> dict:
    """The record of image ``index`` of world ``seed``: scene, caption, texture seed (no split)."""
    _check_seed(seed)
    _check_image_size(image_size)
    rng = np.random.default_rng([seed, index, 0])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    texture_seed = int(rng.integers(2**31))
    objects = _sample_objects(rng, image_size)
    image_id = f"world_{index:06d}"
    record = {"id": image_id, "image": f"{image_id}.png", "split": None, "image_size": image_size,
              "background": background, "texture_seed": texture_seed, "objects": objects,
              "caption": ""}
    record["caption"] = make_caption(record, np.random.default_rng([seed, index, 1]))
    return record


# --------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "triangle":  # apex at the top, base at the bottom of the bounding square
        return (dy >= -r) & (dy <= r) & (ax <= (dy + r) / 2.0)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        t = 0.34 * r
        return ((ax <= r) & (ay <= t)) | ((ax <= t) & (ay <= r))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render_owner_map(record: dict) -> np.ndarray:
    """Pixel owners, ``int16`` of shape (S, S): object index, or -1 for background."""
    size = int(record["image_size"])
    owner = np.full((size, size), -1, dtype=np.int16)
    for k, obj in enumerate(record["objects"]):
        cx, cy, r = float(obj["cx"]), float(obj["cy"]), float(obj["radius"])
        x0, x1 = max(0, math.floor(cx - r) - 1), min(size, math.ceil(cx + r) + 1)
        y0, y1 = max(0, math.floor(cy - r) - 1), min(size, math.ceil(cy + r) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
        mask = _shape_mask(obj["shape"], dx, dy, r)
        owner[y0:y1, x0:x1][mask] = k
    return owner


def _interp_matrix(size: int, knots: int) -> np.ndarray:
    """(size, knots) weights of linear interpolation from ``knots`` evenly spaced values."""
    t = np.linspace(0.0, knots - 1.0, size)
    i0 = np.minimum(t.astype(np.int64), knots - 2)
    frac = t - i0
    weights = np.zeros((size, knots))
    weights[np.arange(size), i0] = 1.0 - frac
    weights[np.arange(size), i0 + 1] = frac
    return weights


def _background(record: dict) -> np.ndarray:
    """Background colour + smooth low-frequency luminance texture + mild per-pixel noise."""
    size = int(record["image_size"])
    rng = np.random.default_rng(int(record["texture_seed"]))
    coarse = rng.uniform(-1.0, 1.0, size=(_TEXTURE_KNOTS, _TEXTURE_KNOTS))
    weights = _interp_matrix(size, _TEXTURE_KNOTS)
    # bilinear upsampling (stays within [-1, 1]); explicit sums, not BLAS, so every machine
    # rounds alike
    columns = sum(weights[:, k, None] * coarse[None, k, :] for k in range(_TEXTURE_KNOTS))
    field = sum(columns[:, k, None] * weights[None, :, k] for k in range(_TEXTURE_KNOTS))
    reach = _TEXTURE_AMPLITUDE + _NOISE_AMPLITUDE
    # row of the colour table: texture rounded half up, plus noise; always within [0, 2 * reach]
    rows = (_TEXTURE_AMPLITUDE * field + (reach + 0.5)).astype(np.intp)
    rows += rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(size, size))
    base = np.array(BACKGROUND_RGB[record["background"]], dtype=np.int16)
    table = np.clip(base[None, :] + np.arange(-reach, reach + 1, dtype=np.int16)[:, None], 0, 255)
    return np.take(table.astype(np.uint8), rows, axis=0)  # (S, S, 3)


def render_image(record: dict) -> np.ndarray:
    """The RGB image of a record, ``uint8`` of shape (S, S, 3); objects are flat colours."""
    img = _background(record)
    owner = render_owner_map(record)
    for k, obj in enumerate(record["objects"]):
        img[owner == k] = COLOR_RGB[obj["color"]]
    return img


# --------------------------------------------------------------------------- ground truth per patch


def patch_bounds(size: int, n: int) -> list[int]:
    """Pixel boundaries of ``n`` patches along a side of ``size``: ``floor(i * size / n)``."""
    if not 1 <= n <= size:
        raise ValueError(f"a grid of {n} patches does not fit a side of {size} pixels")
    return [(i * size) // n for i in range(n + 1)]


def patch_coverage(record: dict, grid_h: int, grid_w: int) -> np.ndarray:
    """Fraction of each patch's pixels per owner: float array (grid_h, grid_w, 1 + n_objects).

    Channel 0 is the background, channel ``k + 1`` object ``k``. Boundaries: :func:`patch_bounds`.
    """
    size = int(record["image_size"])
    rows, cols = patch_bounds(size, grid_h), patch_bounds(size, grid_w)
    owner = render_owner_map(record).astype(np.int64) + 1
    onehot = (owner[:, :, None] == np.arange(1 + len(record["objects"]))).astype(np.int64)
    counts = np.add.reduceat(np.add.reduceat(onehot, rows[:-1], axis=0), cols[:-1], axis=1)
    area = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    return counts / area[:, :, None]


def patch_owner(record: dict, grid_h: int, grid_w: int, min_fraction: float = 0.5) -> np.ndarray:
    """Owner of each patch, ``int64`` of shape (grid_h, grid_w): object index or -1 (background).

    An object owns a patch when it covers strictly more than ``min_fraction`` of its pixels.
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    objects = patch_coverage(record, grid_h, grid_w)[:, :, 1:]
    if objects.shape[2] == 0:
        return np.full((grid_h, grid_w), -1, dtype=np.int64)
    best = objects.argmax(axis=2)
    best_fraction = np.take_along_axis(objects, best[:, :, None], axis=2)[:, :, 0]
    return np.where(best_fraction > min_fraction, best, -1).astype(np.int64)


def patch_ground_truth(record: dict, grid_h: int, grid_w: int,
                       min_fraction: float = 0.5) -> list[list[str]]:
    """The true words of every patch, row-major (``grid_h * grid_w`` lists).

    An object patch gets ``[colour, shape]``; a background patch ``[background colour]``.
    Ownership as in :func:`patch_owner`.
    """
    owner = patch_owner(record, grid_h, grid_w, min_fraction)
    objects = record["objects"]
    return [[objects[k]["color"], objects[k]["shape"]] if k >= 0 else [record["background"]]
            for k in owner.reshape(-1).tolist()]


# --------------------------------------------------------------------------- texts


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(record: dict, rng: np.random.Generator) -> str:
    """A caption naming every object's size, colour, shape and position, and the background."""
    order = rng.permutation(len(record["objects"]))
    phrases = []
    for k in order:
        obj = record["objects"][int(k)]
        phrases.append(f"a {obj['size']} {obj['color']} {obj['shape']} {_WHERE[obj['position']]}")
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    return template.format(objects=_join(phrases), background=record["background"])


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _unique(objects: list[dict], obj: dict, keys: Sequence[str]) -> bool:
    return sum(all(o[k] == obj[k] for k in keys) for o in objects) == 1


def _question(qtype: str, record: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """One unambiguous (question, answer) of a type, or None when the scene allows none."""
    objects = record["objects"]
    templates = _QUESTION_TEMPLATES[qtype]
    if qtype == "count":
        return _pick(rng, templates), NUMBER_WORDS[len(objects)]
    if qtype == "existence":
        present = {(o["color"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            color, shape = _pick(rng, sorted(present))
            answer = "yes"
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
            color, shape = _pick(rng, near if near and rng.random() < 0.5 else absent)
            answer = "no"
        article = "an" if color[0] in "aeiou" else "a"
        return _pick(rng, templates).format(article=article, color=color, shape=shape), answer
    obj = objects[int(rng.integers(len(objects)))]
    where = _WHERE[obj["position"]]  # positions are distinct within an image
    if qtype == "color":
        ref = obj["shape"] if _unique(objects, obj, ["shape"]) else f"{obj['shape']} {where}"
        return _pick(rng, templates).format(ref=ref), obj["color"]
    if qtype == "shape":
        ref = (f"{obj['color']} object" if _unique(objects, obj, ["color"])
               else f"{obj['color']} object {where}")
        return _pick(rng, templates).format(ref=ref), obj["shape"]
    if qtype == "position":
        candidates = [o for o in objects if _unique(objects, o, ["color", "shape", "size"])]
        if not candidates:
            return None
        obj = candidates[int(rng.integers(len(candidates)))]
        if _unique(objects, obj, ["color", "shape"]):
            ref = f"{obj['color']} {obj['shape']}"
        else:
            ref = f"{obj['size']} {obj['color']} {obj['shape']}"
        return _pick(rng, templates).format(ref=ref), obj["position"]
    raise ValueError(f"unknown QA type {qtype!r}; valid: {', '.join(QA_TYPES)}")


def make_qa(record: dict, rng: np.random.Generator) -> list[dict]:
    """2-4 question/answer pairs of distinct types: [{"question", "answer", "type"}, ...]."""
    n_turns = int(rng.integers(2, 5))
    qas = []
    for t in rng.permutation(len(QA_TYPES)):
        if len(qas) == n_turns:
            break
        qa = _question(QA_TYPES[int(t)], record, rng)
        if qa is not None:
            qas.append({"question": qa[0], "answer": qa[1], "type": QA_TYPES[int(t)]})
    return qas


def _texts(seed: int, index: int, record: dict) -> tuple[str, list[dict]]:
    """(pretrain instruction, QA pairs) of image ``index``, from its text stream."""
    rng = np.random.default_rng([seed, index, 2])
    instruction = _pick(rng, PRETRAIN_INSTRUCTIONS)
    return instruction, make_qa(record, rng)


def _conversation(turns: list[tuple[str, str]], with_image: bool) -> list[dict]:
    conv = []
    for i, (question, answer) in enumerate(turns):
        value = ("<image>\n" + question) if (i == 0 and with_image) else question
        conv.append({"from": "human", "value": value})
        conv.append({"from": "gpt", "value": answer})
    return conv


def _text_only(seed: int, split_index: int, split: str, n: int) -> list[dict]:
    rng = np.random.default_rng([seed, split_index, 3])
    samples = []
    for j in range(n):
        n_turns = int(rng.integers(1, 3))
        facts = [_TEXT_FACTS[int(i)] for i in rng.permutation(len(_TEXT_FACTS))[:n_turns]]
        samples.append({"id": f"world_text_{split}_{j:04d}",
                        "conversations": _conversation(facts, with_image=False)})
    return samples


# --------------------------------------------------------------------------- generation


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")


def split_counts(num_images: int, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Images per split: contiguous index blocks, boundaries ``round(n * cumulative fraction)``."""
    if len(splits) != len(SPLITS) or any(not (f >= 0) for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be {len(SPLITS)} non-negative fractions with a positive "
                         f"sum ({', '.join(SPLITS)}), got {tuple(splits)!r}")
    total = float(sum(splits))
    bounds = [0] + [round(num_images * sum(splits[: k + 1]) / total) for k in range(len(SPLITS))]
    bounds[-1] = num_images
    return {name: bounds[k + 1] - bounds[k] for k, name in enumerate(SPLITS)}


def _dump_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG", compress_level=1, optimize=False)


def _write_ground_truth(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([r["id"] for r in records], pa.string()),
        "split": pa.array([r["split"] for r in records], pa.string()),
        "image": pa.array([r["image"] for r in records], pa.string()),
        "image_size": pa.array([r["image_size"] for r in records], pa.int32()),
        "background": pa.array([r["background"] for r in records], pa.string()),
        "texture_seed": pa.array([r["texture_seed"] for r in records], pa.int64()),
        "objects": pa.array([json.dumps(r["objects"]) for r in records], pa.string()),
        "caption": pa.array([r["caption"] for r in records], pa.string()),
    })
    pq.write_table(table, path, compression="snappy")


def generate_world(out_dir: str | os.PathLike, num_images: int, seed: int, image_size: int = 224,
                   splits: Sequence[float] = (0.8, 0.1, 0.1)) -> dict:
    """Write the world under ``out_dir`` (layout in the module docstring); return its summary.

    Splits are contiguous blocks of image indices (train first). ``world.json`` is removed first
    and written last, so its presence marks a complete world. Stale ``world_*.png`` files of an
    earlier, larger world in the same folder are removed.
    """
    _check_seed(seed)
    _check_image_size(image_size)
    if not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if storage.is_remote(str(out_dir)):  # made here, then copied up, world.json last
        with tempfile.TemporaryDirectory(prefix="sea-world-") as local:
            summary = generate_world(local, num_images, seed, image_size, splits)
            storage.put_tree(local, str(out_dir), "world.json")
        return dict(summary, out_dir=str(out_dir))
    counts = split_counts(num_images, splits)
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)

    records: list[dict] = []
    per_split: dict[str, dict[str, list]] = {
        name: {"pretrain": [], "instruct": [], "qa": []} for name in SPLITS}
    split_of = [name for name in SPLITS for _ in range(counts[name])]
    for index in range(num_images):
        record = sample_record(seed, index, image_size)
        record["split"] = split_of[index]
        records.append(record)
        _write_png(images_dir / record["image"], render_image(record))
        instruction, qas = _texts(seed, index, record)
        bucket = per_split[record["split"]]
        bucket["pretrain"].append({"id": record["id"], "image": record["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + instruction},
            {"from": "gpt", "value": record["caption"]}]})
        bucket["instruct"].append({"id": record["id"], "image": record["image"], "conversations":
                                   _conversation([(q["question"], q["answer"]) for q in qas], True)})
        for j, q in enumerate(qas):
            bucket["qa"].append({"id": record["id"], "question_id": f"{record['id']}_q{j}",
                                 "image": record["image"], "question": q["question"],
                                 "answer": q["answer"], "type": q["type"]})

    keep = {r["image"] for r in records}
    for stale in images_dir.glob("world_*.png"):
        if stale.name not in keep and re.fullmatch(r"world_\d+\.png", stale.name):
            stale.unlink()

    num_text: dict[str, int] = {}
    num_qa: dict[str, int] = {}
    manifests: dict[str, dict[str, str]] = {}
    for split_index, split in enumerate(SPLITS):
        bucket = per_split[split]
        n = len(bucket["instruct"])
        texts = _text_only(seed, split_index, split, max(1, n // _TEXT_EVERY) if n else 0)
        instruct: list[dict] = []
        slots = [((j + 1) * n) // (len(texts) + 1) for j in range(len(texts))]  # spread evenly
        for i, sample in enumerate(bucket["instruct"]):
            instruct.append(sample)
            while texts and slots and slots[0] == i + 1:
                instruct.append(texts.pop(0))
                slots.pop(0)
        instruct.extend(texts)
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        _dump_json(split_dir / "pretrain.json", bucket["pretrain"])
        _dump_json(split_dir / "instruct.json", instruct)
        (split_dir / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in bucket["qa"]),
                                            encoding="utf-8")
        num_text[split] = len(instruct) - n
        num_qa[split] = len(bucket["qa"])
        manifests[split] = {"pretrain": f"{split}/pretrain.json", "instruct": f"{split}/instruct.json",
                            "qa": f"{split}/qa.jsonl"}

    _write_ground_truth(out / "ground_truth.parquet", records)
    summary = {
        "version": WORLD_VERSION, "seed": int(seed), "num_images": int(num_images),
        "image_size": int(image_size), "splits": [float(f) for f in splits], "counts": counts,
        "num_qa": num_qa, "num_text_only": num_text, "images": "images",
        "ground_truth": "ground_truth.parquet", "manifests": manifests, "words": world_words(),
    }
    _dump_json(out / "world.json", summary, indent=1)
    return dict(summary, out_dir=str(out))


def ensure_world(out_dir: str | os.PathLike, num_images: int, seed: int, image_size: int = 224,
                 splits: Sequence[float] = (0.8, 0.1, 0.1)) -> dict:
    """The summary of the world at ``out_dir``, generating it unless a complete one with these
    exact parameters is already there (``world.json`` present and matching)."""
    meta_path = Path(out_dir) / "world.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        wanted = {"version": WORLD_VERSION, "seed": seed, "num_images": num_images,
                  "image_size": image_size, "splits": [float(f) for f in splits]}
        if isinstance(meta, dict) and all(meta.get(k) == v for k, v in wanted.items()):
            return dict(meta, out_dir=str(Path(out_dir)))
    return generate_world(out_dir, num_images, seed, image_size=image_size, splits=splits)


def load_ground_truth(path: str | os.PathLike) -> list[dict]:
    """Records from ``ground_truth.parquet`` (or a world folder holding it), objects parsed."""
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.parquet"
    rows = pq.read_table(p).to_pylist()
    for row in rows:
        row["objects"] = json.loads(row["objects"])
    return rows
