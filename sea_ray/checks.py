"""Checks that need more than the config itself: the tower's patch grid (from its architecture,
without building it) and the metadata of an existing labels dataset (its grid, labels per patch
and image geometry). The job table
(:mod:`sea_ray.jobs`) runs them for every job before any Ray resource is requested."""

from __future__ import annotations

import difflib
import json
import logging
import os
from typing import Optional

from sea_ray import storage
from sea_ray.config.schema import AdapterConfig, AlignConfig, ModelConfig
from sea_ray.paths import names_a_path

LABELS_META = "_meta.json"
log = logging.getLogger(__name__)


def tower_grid(vision) -> tuple[Optional[tuple[int, int]], list[str]]:
    """(rows, cols) of the tower's visual tokens from its architecture alone, or None when only
    the weights can tell (a hub id not on this machine). Also returns problems found."""
    size, problems = tower_image_size(vision)
    if size is None:
        return None, problems
    return (size[0] // size[1], size[0] // size[1]), problems


def tower_image_size(vision) -> tuple[Optional[tuple[int, int]], list[str]]:
    """((image size, patch size), problems) from the tower's architecture alone."""
    if vision.backend == "open_clip":
        if vision.name == "custom":
            vc = (vision.custom or {}).get("vision_cfg", {})
            size, patch = vc.get("image_size", 224), vc.get("patch_size", 16)
        else:
            import open_clip

            cfg = open_clip.get_model_config(vision.name)
            if cfg is None:
                close = difflib.get_close_matches(vision.name, open_clip.list_models(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return None, [f"model.vision.name: unknown open_clip architecture {vision.name!r}{hint}"]
            vc = cfg["vision_cfg"]
            if vc.get("timm_model_name"):
                return None, []
            size, patch = vc.get("image_size", 224), vc.get("patch_size", 16)
    else:
        if vision.name == "custom":
            vc = (vision.custom or {}).get("vision_config", vision.custom or {})
        else:
            path = os.path.join(vision.name, "config.json")
            if not os.path.exists(path):
                return None, []
            with open(path) as f:
                cfg = json.load(f)
            vc = cfg.get("vision_config", cfg)
        size, patch = vc.get("image_size", 224), vc.get("patch_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if size % patch:
        return None, [f"model.vision: image size {size} is not a multiple of patch size {patch}"]
    return (size, patch), []


def read_labels_meta(uri: str) -> Optional[dict]:
    """The labels' metadata, or None when it does not exist yet or cannot be reached from here
    (e.g. a bucket only the cluster has credentials for: the job checks again when it starts)."""
    meta_uri = storage.join(uri, LABELS_META)
    try:
        if not storage.exists(meta_uri):
            return None
        return json.loads(storage.read_text(meta_uri))
    except Exception as exc:  # unreachable storage is not a config error
        log.warning("cannot read %s (%s); the grid check runs when the job starts", meta_uri, type(exc).__name__)
        return None


def labels_aspect_problem(meta: dict, image_aspect: str, uri: Optional[str]) -> Optional[str]:
    """Why labels with metadata ``meta`` (at ``uri``) cannot train a config of ``data.image_aspect``
    ``image_aspect``, or None. The labels record their geometry as ``transform.resize``
    (:data:`sea_ray.data.images.ASPECT_RULES`); labels written before ``image_aspect`` existed
    record the crop rule (or no transform at all) and count as ``crop``."""
    from sea_ray.data.images import ASPECT_RULES, RESIZE_RULE  # (PIL and numpy: not for every check)

    recorded = (meta.get("transform") or {}).get("resize", RESIZE_RULE)
    if recorded == ASPECT_RULES[image_aspect]:
        return None
    made = next((a for a, rule in ASPECT_RULES.items() if rule == recorded), None)
    where = f"the labels at {uri}" if uri else "the labels"
    if made is None:
        return (f"data.image_aspect: {where} were made with the image transform {recorded!r}, which this version "
                f"does not know; re-run the labels job (data.image_aspect={image_aspect}) into a new output")
    return (f"data.image_aspect: {where} were made with image_aspect={made} ({recorded}) but this config has "
            f"image_aspect={image_aspect} ({ASPECT_RULES[image_aspect]}): labels and training must see the same "
            f"pixels; re-run the labels job with data.image_aspect={image_aspect} into a new output, or set "
            f"data.image_aspect={made}")


def _model_grid(model: ModelConfig, problems: list[str]):
    grid, found = tower_grid(model.vision)
    problems.extend(found)
    return grid


def job_problems(cfg, labels_meta: Optional[dict] = None) -> list[str]:
    """Every problem found; empty when the job may start. ``labels_meta``: the labels' metadata
    when the caller already read it (checking many variants of one config)."""
    problems: list[str] = []
    model = getattr(cfg, "model", None) or getattr(getattr(cfg, "base", None), "model", None)
    grid = _model_grid(model, problems) if model is not None else None
    align = cfg if isinstance(cfg, AlignConfig) else getattr(cfg, "base", None)
    if isinstance(align, AlignConfig) and align.sea.enabled:
        if grid is not None and align.sea.window > min(grid):
            problems.append(f"sea.window: {align.sea.window} is larger than the {grid[0]} x {grid[1]} patch grid")
        meta = labels_meta or (read_labels_meta(align.data.labels) if align.data.labels else None)
        if meta is not None:
            if grid is not None and tuple(meta.get("grid", ())) != tuple(grid):
                problems.append(f"data.labels: labels were computed on a {meta.get('grid')} grid but the vision "
                                f"tower gives {list(grid)}: label grid must equal the tower's patch grid")
            if meta.get("top_n", align.sea.top_n) < align.sea.top_n:
                problems.append(f"sea.top_n: {align.sea.top_n} > the {meta['top_n']} labels stored per patch")
            aspect = labels_aspect_problem(meta, align.data.image_aspect, align.data.labels)
            if aspect:
                problems.append(aspect)
    if getattr(cfg, "job", None) == "instruct" and cfg.init_adapter:
        trained = _checkpoint_adapter(cfg.init_adapter)
        wanted = cfg.model.adapter.model_dump(mode="json")
        if trained is not None and trained != wanted:
            problems.append(f"init_adapter: {cfg.init_adapter} holds a {trained} adapter but model.adapter is "
                            f"{wanted}: give instruct the align run's adapter")
    return problems


def _checkpoint_adapter(uri: str) -> Optional[dict]:
    """``model.adapter`` of the newest complete checkpoint at ``uri`` (a run or a checkpoint), or
    None when there is none yet (a pipeline validates instruct before align has run) or it
    cannot be reached from here (the job loads it when it starts)."""
    from sea_ray.train import checkpoint as ckpt

    try:
        config = json.loads(storage.read_text(storage.join(ckpt.resolve(uri), "config.json")))
    except FileNotFoundError:
        return None
    except Exception as exc:  # unreachable storage is not a config error
        log.warning("cannot read the checkpoint %s (%s); its adapter is checked when the job starts", uri,
                    type(exc).__name__)
        return None
    try:  # with today's defaults filled in, to compare like with like
        return AdapterConfig.model_validate(config.get("model", {}).get("adapter", {})).model_dump(mode="json")
    except ValueError:
        return None


# --------------------------------------------------------------------------- inputs

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.ckpt")


def _exists(uri: str) -> Optional[bool]:
    """Whether ``uri`` exists; None when its storage cannot be reached from here."""
    try:
        return storage.exists(uri)
    except Exception as exc:  # unreachable storage is not a config error: the job checks it again
        log.warning("cannot check %s from here (%s); the job checks it when it starts", uri, type(exc).__name__)
        return None


def _tokenizer_problems(key: str, uri: str) -> list[str]:
    if storage.is_remote(uri):
        return []
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(os.path.expanduser(uri))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return [f"{key}: no tokenizer loads from {uri} ({type(exc).__name__}: {first})"]
    return []


def _model_dir_problems(key: str, uri: str) -> list[str]:
    """A weights file, or a model folder: a Hugging Face config (not for open_clip weights) and weights."""
    local = None if storage.is_remote(uri) else os.path.expanduser(uri)
    if local is not None and os.path.isfile(local):
        return []
    if not key.endswith("vision.weights") and _exists(storage.join(uri, "config.json")) is False:
        return [f"{key}: {uri} holds no config.json (not a Hugging Face model folder)"]
    if local is not None:
        import glob

        if not any(glob.glob(os.path.join(local, pattern)) for pattern in WEIGHT_PATTERNS):
            return [f"{key}: {uri} holds no weights ({', '.join(WEIGHT_PATTERNS)})"]
    return []


def input_problems(fields: list[tuple[str, str, str]]) -> list[str]:
    """Every input path (``(key, value, role)``, roles as in :func:`sea_ray.config.loading.path_fields`)
    that does not exist, every model folder that is not one, an LLM without a tokenizer that
    loads, and a labels dataset that is not complete."""
    problems = []
    keys = {key for key, _, _ in fields}
    for key, value, role in fields:
        if role == "model":
            if not names_a_path(value):
                continue  # a hub id, an architecture name, the built-in world tokenizer
            found = _exists(os.path.expanduser(value))
            if found is False:
                problems.append(f"{key}: {value} does not exist")
            elif found and key.endswith("llm.tokenizer"):
                problems += _tokenizer_problems(key, value)
            elif found:
                found_here = _model_dir_problems(key, value)
                problems += found_here
                tokenizer_key = key[: -len("name_or_path")] + "tokenizer"
                if not found_here and key.endswith("llm.name_or_path") and tokenizer_key not in keys:
                    problems += _tokenizer_problems(key, value)
        elif role == "input":
            found = _exists(value)
            if found is False:
                problems.append(f"{key}: {value} does not exist")
            elif found and key.endswith("data.labels") and _exists(storage.join(value, "_SUCCESS")) is False:
                problems.append(f"{key}: {value} is not a complete labels dataset (no _SUCCESS): run or finish "
                                "the labels job first")
    return problems
