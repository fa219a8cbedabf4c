"""Typed configurations for every sea_ray job, and the one validation pass.

A job config is YAML plus dotted overrides (``optim.lr=1e-4``). :func:`load_config` merges
them, expands a model preset, validates types and ranges with pydantic, then checks the
cross-field rules, and raises one :class:`~sea_ray.errors.ConfigError` that lists every
problem (unknown keys come with a did-you-mean). Nothing here touches Ray or a GPU.

Defaults live only in these classes: YAML recipes and worker code never repeat them.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sea_ray.errors import ConfigError
from sea_ray.presets import PRESETS, get_preset

ADAPTER_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- model


class VisionConfig(_Section):
    """The vision tower (and its paired CLIP text tower, used by the labeler)."""

    backend: Literal["open_clip", "hf"] = Field("open_clip", description="open_clip or Hugging Face (CLIP / SigLIP)")
    name: str = Field("ViT-L-14-336", description="open_clip architecture name, or a Hugging Face dir / hub id; "
                      "'custom' builds the tower from `custom`")
    weights: Optional[str] = Field(None, description="open_clip: a local file or dir, an s3:// URI, or a pretrained "
                                   "tag/hub name (online only); none = random init")
    custom: Optional[dict[str, Any]] = Field(None, description="architecture for name=custom: open_clip "
                                             "{embed_dim, vision_cfg, text_cfg} or a Hugging Face CLIPConfig dict")
    select_layer: int = Field(-2, description="hidden state giving the visual tokens (LLaVA: -2, penultimate)")


class AdapterConfig(_Section):
    type: str = Field("mlp2x_gelu", description="linear | mlp2x_gelu (LLaVA-1.5) | mlpNx_gelu (N >= 1 layers)")


class LLMConfig(_Section):
    name_or_path: Optional[str] = Field(None, description="Hugging Face causal LM: local dir, s3:// URI or hub id")
    config: Optional[dict[str, Any]] = Field(None, description="build a random-init LM from this config "
                                             "(needs model_type) instead of loading weights")
    tokenizer: Optional[str] = Field(None, description="tokenizer dir / hub id; 'world' builds one for the synthetic "
                                     "world; default: name_or_path")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype when loading")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class ModelConfig(_Section):
    preset: Optional[str] = Field(None, description="a named preset (expanded before validation)")
    vision: VisionConfig = VisionConfig()
    adapter: AdapterConfig = AdapterConfig()
    llm: LLMConfig = LLMConfig()


# --------------------------------------------------------------------------- shared sections


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="Ray cluster address; none = RAY_ADDRESS or a local Ray")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray (ignored on a cluster)")


class ScalingConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave room for data tasks")
    gpus_per_worker: float = Field(1.0, gt=0)


class RunConfig(_Section):
    name: str = Field("sea", pattern=r"^[A-Za-z0-9_.-]+$", description="run name; the same name resumes in place")
    storage: str = Field("./runs", description="run storage: local dir or s3:// URI")
    seed: int = 0


class SeaConfig(_Section):
    enabled: bool = Field(True, description="false = the plain LLaVA baseline, everything else identical")
    weight: float = Field(1.0, ge=0, description="lambda in L = L_lm + lambda * L_sea")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    init_temperature: float = Field(0.07, gt=0, description="initial InfoNCE temperature")
    min_temperature: float = Field(0.01, gt=0)
    max_temperature: float = Field(1.0, gt=0)
    learnable_temperature: bool = True
    top_n: int = Field(10, ge=1, description="labels per patch used for sampling (<= labels top_n)")
    window: int = Field(2, ge=1, description="k: one patch sampled per k x k window")
    negatives: Literal["local", "global"] = Field("local", description="global all-gathers negatives across workers")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; overrides epochs")


class BatchConfig(_Section):
    global_size: int = Field(256, ge=1, description="samples per optimizer step, over all workers")
    per_worker: int = Field(16, ge=1, description="micro-batch per worker; accumulation is derived")


class CheckpointConfig(_Section):
    every_n_steps: int = Field(500, ge=1)
    num_to_keep: Optional[int] = Field(2, ge=1)


class TrainDataConfig(_Section):
    manifest: str = Field(..., description="LLaVA JSON/JSONL or Parquet manifest (local or s3://)")
    image_root: Optional[str] = Field(None, description="folder the manifest's image paths are relative to")
    labels: Optional[str] = Field(None, description="labels dataset URI (align with SEA)")
    max_length: int = Field(512, ge=8, description="text tokens per sample (visual tokens not counted)")
    val_manifest: Optional[str] = None
    preprocess_actors: int = Field(1, ge=1, description="Ray Data actors that decode images and tokenize")
    preprocess_cpus: float = Field(0.5, gt=0, description="CPUs per preprocessing actor")


class TrainConfig(_Section):
    """Shared by ``align`` and ``instruct``."""

    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    scaling: ScalingConfig = ScalingConfig()
    model: ModelConfig = ModelConfig()
    data: TrainDataConfig
    optim: OptimConfig = OptimConfig()
    batch: BatchConfig = BatchConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    max_failures: int = Field(0, ge=-1, description="worker-group restarts (FailureConfig); -1 = unlimited")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    grad_checkpointing: bool = False
    log_every_n_steps: int = Field(10, ge=1)


class AlignConfig(TrainConfig):
    job: Literal["align"] = "align"
    sea: SeaConfig = SeaConfig()


class InstructOptimConfig(OptimConfig):
    """Stage 2 differs from stage 1 only in its defaults (LLaVA-1.5: lr 2e-5)."""

    lr: float = Field(2e-5, gt=0)


class InstructBatchConfig(BatchConfig):
    global_size: int = Field(128, ge=1, description="samples per optimizer step, over all workers")


class InstructConfig(TrainConfig):
    job: Literal["instruct"] = "instruct"
    init_adapter: Optional[str] = Field(None, description="align checkpoint URI the adapter starts from")
    train_vision: bool = False
    template: Literal["auto", "llava_v1", "chat"] = Field("auto", description="auto = the LLM's chat template if "
                                                           "it has one, else LLaVA v1")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="auto = FSDP on GPUs, DDP on CPU")
    optim: InstructOptimConfig = InstructOptimConfig()
    batch: InstructBatchConfig = InstructBatchConfig()


# --------------------------------------------------------------------------- labels


class VocabConfig(_Section):
    min_count: int = Field(5, ge=1, description="minimum caption frequency of a word")
    max_size: int = Field(20000, ge=1, description="most words kept (by frequency, then alphabetical); the extra "
                          "words always stay")
    min_length: int = Field(2, ge=1, description="shortest word kept (letters)")
    extra_words: Optional[str] = Field(None, description="word list file (one word per line), added as is")
    stopwords: Optional[str] = Field(None, description="stop-word file; default: the built-in English list")


class LabelerConfig(_Section):
    top_n: int = Field(10, ge=1, description="labels kept per patch (paper: 10)")
    templates: list[str] = Field(["a photo of a {}."], min_length=1, description="prompt templates; several = "
                                 "ensemble (mean of normalised text embeddings)")
    score_sign: Literal["raw", "negate"] = Field("raw", description="rank by cosine (raw) or negated cosine")
    features: Literal["joint", "dense"] = Field("joint", description="joint: final layer -> ln_post -> proj; "
                                                "dense: MaskCLIP value path in the last block")
    batch_size: int = Field(32, ge=1, description="images per labeler forward pass")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="image-tower autocast: auto = "
                                                               "fp16 on a GPU, fp32 on the CPU; scores are "
                                                               "always computed in fp32")
    text_batch_size: int = Field(256, ge=1, description="prompts per text-tower pass (vocabulary embedding)")


class LabelsComputeConfig(_Section):
    num_actors: int = Field(1, ge=1, description="labeler actors (one model copy each)")
    gpus_per_actor: float = Field(0.0, ge=0, description="> 0 on GPU clusters")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor; fractional is fine")
    cpu_fallback: bool = Field(True, description="label on CPUs when gpus_per_actor > 0 but the cluster shows no "
                               "GPU (false: wait for one, e.g. on an autoscaling cluster)")
    torch_threads: Optional[int] = Field(None, ge=1, description="intra-op threads per CPU actor; none = "
                                         "max(1, round(cpus_per_actor))")
    rows_per_shard: int = Field(1024, ge=1, description="manifest rows per output shard (fixed for a dataset)")
    decode_batch_size: Optional[int] = Field(None, ge=1, description="images per decode task batch; none = "
                                             "labeler.batch_size")
    cpus_per_decode_task: float = Field(1.0, gt=0, description="CPUs reserved per read+decode task")
    read_threads: int = Field(8, ge=1, description="parallel image reads per decode batch (object storage)")
    ship: Literal["uint8", "float32"] = Field("uint8", description="what decode tasks send to the labeler: "
                                              "resized uint8 pixels (4x smaller; normalised in the actor) or "
                                              "the transformed float tensor")


class LabelsDataConfig(_Section):
    manifest: str = Field(..., description="LLaVA JSON/JSONL or Parquet manifest (local or s3://)")
    image_root: Optional[str] = Field(None, description="folder (local or s3://) the manifest's image paths are "
                                      "relative to; none = paths as given")
    max_image_pixels: Optional[int] = Field(None, ge=1, description="decompression-bomb limit; none = PIL's "
                                            "Image.MAX_IMAGE_PIXELS (~89.5 Mpx). Larger JPEGs are decoded "
                                            "downscaled, other formats rejected")


class LabelsConfig(_Section):
    job: Literal["labels"] = "labels"
    output: str = Field(..., description="labels dataset URI (local dir or s3://)")
    seed: int = Field(0, description="seeds random-init towers so every actor (and every re-run) builds the same one")
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: LabelsDataConfig
    vocab: VocabConfig = VocabConfig()
    labeler: LabelerConfig = LabelerConfig()
    compute: LabelsComputeConfig = LabelsComputeConfig()


# --------------------------------------------------------------------------- tune


class SearchDim(_Section):
    type: Literal["uniform", "loguniform", "choice", "randint"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None


class AshaConfig(_Section):
    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="reports before a trial may be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class TuneConfig(_Section):
    job: Literal["tune"] = "tune"
    base: AlignConfig = Field(..., description="the align config every trial starts from")
    space: dict[str, SearchDim] = Field(..., description="dotted key of the base config -> search dimension")
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: str = "val_sea_loss"
    mode: Literal["min", "max"] = "min"
    report_every_n_steps: int = Field(10, ge=1)
    searcher: Literal["optuna", "random"] = "optuna"
    asha: AshaConfig = AshaConfig()
    trial_mode: Literal["auto", "in_process", "ray_train"] = "auto"
    max_trial_failures: int = Field(1, ge=0)
    seed: int = 0


# --------------------------------------------------------------------------- eval


class EvalConfig(_Section):
    job: Literal["eval"] = "eval"
    checkpoint: str = Field(..., description="checkpoint URI (align or instruct)")
    model: ModelConfig = ModelConfig()
    world: Optional[str] = Field(None, description="synthetic world dir (for ground-truth metrics)")
    split: Literal["train", "val", "test"] = "test"
    output: str = "./eval"
    max_samples: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    ray: RayConfig = RayConfig()


JOBS: dict[str, type[_Section]] = {
    "labels": LabelsConfig,
    "align": AlignConfig,
    "instruct": InstructConfig,
    "tune": TuneConfig,
    "eval": EvalConfig,
}


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (['a','b','c'], VALUE parsed as YAML so numbers, bools and lists work)."""
    if "=" not in item:
        raise ConfigError([f"override {item!r} is not of the form dotted.key=value"])
    key, _, raw = item.partition("=")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r} has an empty key"])
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_presets(raw: Any, problems: list[str], where: str = "") -> Any:
    """Replace every ``model: {preset: X, ...}`` by the preset merged with the keys beside it."""
    if not isinstance(raw, dict):
        return raw
    out = {}
    for key, value in raw.items():
        loc = f"{where}.{key}" if where else key
        if key == "model" and isinstance(value, dict) and value.get("preset"):
            name = value["preset"]
            if name not in PRESETS:
                close = difflib.get_close_matches(str(name), PRESETS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{loc}.preset: unknown preset {name!r}{hint}; valid: {', '.join(sorted(PRESETS))}")
                out[key] = {k: v for k, v in value.items() if k != "preset"}
            else:
                out[key] = _deep_merge(get_preset(name), value)
        else:
            out[key] = _expand_presets(value, problems, loc)
    return out


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section reached by following ``loc`` from ``cls``."""
    node: Any = cls
    for part in loc:
        if isinstance(part, int) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(part)
        if field is None:
            return []
        node = field.annotation
        args = getattr(node, "__args__", ())  # Optional[Section]
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            node = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _format_error(cls: type[BaseModel], err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc[:-1]), n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"{dotted}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{dotted}: required"
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def _drop(raw: dict, loc: tuple) -> None:
    node: Any = raw
    for part in loc[:-1]:
        if not isinstance(node, (dict, list)):
            return
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def validate(raw: dict, job: Optional[str] = None, source: Optional[str] = None):
    """Validate a raw config dict; return the typed config or raise ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping, got {type(raw).__name__}"], source)
    job = job or raw.get("job")
    if job not in JOBS:
        raise ConfigError([f"job: must be one of {', '.join(JOBS)} (got {job!r})"], source)
    cls = JOBS[job]
    raw = _expand_presets(dict(raw, job=job), problems)
    cfg = None
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems.extend(_format_error(cls, e) for e in errors)
        # Drop the bad fields and validate again, so the cross-field rules still run on the rest.
        partial = copy.deepcopy(raw)
        for e in errors:
            if e["type"] != "missing":
                _drop(partial, tuple(e["loc"]))
        try:
            cfg = cls.model_validate(partial)
        except ValidationError:
            cfg = None
    if cfg is not None:
        problems.extend(cross_field_problems(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, job: Optional[str] = None):
    """Read YAML, apply dotted overrides, validate. Raises ConfigError (never a bare exception)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping, got {type(raw).__name__}"], str(path))
    raw = apply_overrides(raw, overrides or [])
    if job is not None and raw.get("job") not in (None, job):
        raise ConfigError([f"job: this command runs {job!r} but the config says {raw.get('job')!r}"], str(path))
    return validate(raw, job=job, source=str(path))


def to_dict(cfg: BaseModel) -> dict:
    """The resolved config as plain data (what run folders record)."""
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------- cross-field rules


def _model_problems(model: ModelConfig, where: str) -> list[str]:
    problems = []
    if not ADAPTER_PATTERN.match(model.adapter.type):
        problems.append(f"{where}.adapter.type: unknown adapter {model.adapter.type!r}; "
                        "valid: linear, identity, mlp2x_gelu, mlpNx_gelu")
    elif model.adapter.type.startswith("mlp") and int(ADAPTER_PATTERN.match(model.adapter.type).group(2)) < 1:
        problems.append(f"{where}.adapter.type: mlpNx_gelu needs N >= 1")
    if (model.llm.name_or_path is None) == (model.llm.config is None):
        problems.append(f"{where}.llm: give exactly one of name_or_path (load weights) or config (random init)")
    if model.llm.config is not None and "model_type" not in model.llm.config:
        problems.append(f"{where}.llm.config: needs model_type (e.g. llama, qwen2, gemma, phi3)")
    if model.llm.config is not None and model.llm.tokenizer is None:
        problems.append(f"{where}.llm.tokenizer: required when the LLM is built from a config")
    if model.vision.name == "custom" and not model.vision.custom:
        problems.append(f"{where}.vision.custom: required when vision.name is 'custom'")
    if model.vision.backend == "hf" and model.vision.weights is not None:
        problems.append(f"{where}.vision.weights: the hf backend loads weights from vision.name (a dir or hub id)")
    return problems


def _train_problems(cfg: TrainConfig) -> list[str]:
    problems = _model_problems(cfg.model, "model")
    per_step = cfg.batch.per_worker * cfg.scaling.num_workers
    if cfg.batch.global_size % per_step:
        problems.append(f"batch.global_size: {cfg.batch.global_size} is not divisible by batch.per_worker x "
                        f"scaling.num_workers = {cfg.batch.per_worker} x {cfg.scaling.num_workers} = {per_step}")
    if cfg.scaling.use_gpu and cfg.precision == "fp32":
        pass  # allowed: fp32 on GPU is slow but valid
    if not cfg.scaling.use_gpu and cfg.precision == "bf16":
        problems.append("precision: bf16 needs scaling.use_gpu=true (CPU training runs in fp32)")
    return problems


def cross_field_problems(cfg: BaseModel) -> list[str]:
    """Rules that involve more than one field. Grid and label checks that need the tower's
    architecture or the labels' metadata live in :func:`sea_ray.checks.job_problems`."""
    problems: list[str] = []
    if isinstance(cfg, TrainConfig):
        problems += _train_problems(cfg)
    if isinstance(cfg, AlignConfig):
        sea = cfg.sea
        if sea.min_temperature > sea.max_temperature:
            problems.append(f"sea.min_temperature: {sea.min_temperature} > sea.max_temperature {sea.max_temperature}")
        elif not sea.min_temperature <= sea.init_temperature <= sea.max_temperature:
            problems.append(f"sea.init_temperature: {sea.init_temperature} is outside "
                            f"[{sea.min_temperature}, {sea.max_temperature}]")
        if sea.enabled and not cfg.data.labels:
            problems.append("data.labels: required when sea.enabled is true (run `sea-ray labels` first)")
    if isinstance(cfg, LabelsConfig):
        problems += _model_problems(cfg.model, "model")
        bad = [t for t in cfg.labeler.templates if t.count("{}") != 1]
        if bad:
            problems.append(f"labeler.templates: each template needs exactly one '{{}}' (bad: {bad})")
        if cfg.model.vision.backend == "hf" and cfg.model.vision.name == "custom":
            problems.append("model.vision: labeling with the hf backend needs a saved CLIPModel dir with its "
                            "tokenizer (vision.name=DIR); a random-init 'custom' hf tower has no tokenizer")
    if isinstance(cfg, EvalConfig):
        problems += _model_problems(cfg.model, "model")
    if isinstance(cfg, TuneConfig):
        base = cfg.base.model_dump()
        for key, dim in cfg.space.items():
            node: Any = base
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if node is KeyError:
                problems.append(f"space.{key}: not a key of the base align config")
            if dim.type in ("uniform", "loguniform", "randint"):
                if dim.low is None or dim.high is None or dim.low >= dim.high:
                    problems.append(f"space.{key}: {dim.type} needs low < high")
                elif dim.type == "loguniform" and dim.low <= 0:
                    problems.append(f"space.{key}: loguniform needs low > 0")
            elif not dim.values:
                problems.append(f"space.{key}: choice needs a non-empty values list")
    return problems
