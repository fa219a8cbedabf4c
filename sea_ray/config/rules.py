"""The rules across fields of a job config: what pydantic's per-field types and ranges cannot say.

:func:`cross_field_problems` lists every broken rule of a validated config (the model section,
train batch and precision, SEA temperatures, labeler templates, an eval's data and metrics,
pipeline steps); it is run by :func:`sea_ray.config.loading.validate`, which also runs the search rules
(:func:`sea_ray.config.loading._tune_problems`: they validate each end of a search range, so they
live beside ``validate``). Grid and label checks that need the tower's architecture or the labels'
metadata live in :func:`sea_ray.checks.job_problems`.
"""

from __future__ import annotations

import difflib

from pydantic import BaseModel

from sea_ray.config.schema import (ADAPTER_PATTERN, EVAL_WORLD_METRICS, PIPELINE_STEPS, WORLD_TASK, AlignConfig,
                                   BenchmarkConfig, EvalConfig, LabelsConfig, ModelConfig, PipelineConfig,
                                   TrainConfig)


def _pipeline_problems(cfg: PipelineConfig) -> list[str]:
    """Pipeline-level rules; every step's own config is validated by ``sea_ray.pipeline.plan``."""
    problems = []
    unknown = [s for s in cfg.steps if s not in PIPELINE_STEPS]
    for step in unknown:
        close = difflib.get_close_matches(step, PIPELINE_STEPS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"steps: unknown step {step!r}{hint}; valid: {', '.join(PIPELINE_STEPS)}")
    known = [s for s in cfg.steps if s in PIPELINE_STEPS]
    if len(set(known)) != len(known):
        problems.append(f"steps: a step is listed twice: {cfg.steps}")
    elif known != sorted(known, key=PIPELINE_STEPS.index):
        problems.append(f"steps: must follow the order {' -> '.join(PIPELINE_STEPS)} (got {' -> '.join(known)})")
    has_world = bool(cfg.data.world) or "world" in known
    needs = {"pretrain": ("import", "labels", "tune", "align"), "instruct": ("import", "instruct")}
    for field, steps in needs.items():
        users = [s for s in steps if s in known]
        if users and not (getattr(cfg.data, field) or has_world):
            problems.append(f"data.{field}: required by the {', '.join(users)} step(s) (or give data.world)")
    return problems


def _model_problems(model: ModelConfig, where: str, needs_llm: bool = True) -> list[str]:
    """``needs_llm=False`` (the labels job, which uses only the vision tower and its text tower): an
    LLM section may be left empty; one that is given is checked all the same."""
    problems = []
    if not ADAPTER_PATTERN.match(model.adapter.type):
        problems.append(f"{where}.adapter.type: unknown adapter {model.adapter.type!r}; "
                        "valid: linear, identity, mlp2x_gelu, mlpNx_gelu")
    elif model.adapter.type.startswith("mlp") and int(ADAPTER_PATTERN.match(model.adapter.type).group(2)) < 1:
        problems.append(f"{where}.adapter.type: mlpNx_gelu needs N >= 1")
    llm_given = model.llm.name_or_path is not None or model.llm.config is not None
    if (needs_llm or llm_given) and (model.llm.name_or_path is None) == (model.llm.config is None):
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


def _lora_problems(cfg: TrainConfig) -> list[str]:
    """LoRA trains instruct's LLM; QLoRA's 4-bit base needs GPUs, weights to quantize and one copy
    of the base per worker (bitsandbytes' 4-bit weights are not sharded by FSDP here). Whether the
    target modules exist in the LLM and bitsandbytes is installed: :func:`sea_ray.checks.job_problems`."""
    lora, llm = cfg.model.llm.lora, cfg.model.llm
    problems = []
    if lora.qlora and not lora.enabled:
        problems.append("model.llm.lora.qlora: QLoRA trains LoRA weights on a 4-bit base: set "
                        "model.llm.lora.enabled=true too")
    if not lora.enabled:
        return problems
    if cfg.job != "instruct":
        problems.append(f"model.llm.lora.enabled: {cfg.job} keeps the LLM frozen, so there is nothing to train with "
                        "LoRA: set it in the instruct config")
    if lora.target_modules != "all-linear" and not lora.target_modules:
        problems.append("model.llm.lora.target_modules: give at least one module name (e.g. [q_proj, v_proj]) or "
                        "all-linear")
    if lora.qlora:
        if not cfg.scaling.use_gpu:
            problems.append("model.llm.lora.qlora: QLoRA's 4-bit base runs on CUDA GPUs only (bitsandbytes); this "
                            "config trains on CPUs (scaling.use_gpu=false): set scaling.use_gpu=true, or "
                            "model.llm.lora.qlora=false for LoRA on the full-precision base")
        if llm.name_or_path is None:
            problems.append("model.llm.lora.qlora: needs model.llm.name_or_path (weights are quantized to 4 bits as "
                            "they load; a random-init model.llm.config LLM has none)")
        if getattr(cfg, "strategy", "ddp") == "fsdp":
            problems.append("model.llm.lora.qlora: not with strategy fsdp (the 4-bit base is not sharded here): "
                            "use strategy ddp or auto, which is ddp with QLoRA")
    return problems


def _train_problems(cfg: TrainConfig) -> list[str]:
    problems = _model_problems(cfg.model, "model") + _lora_problems(cfg)
    for workers in cfg.scaling.world_sizes:  # an elastic group: every size it may run with
        per_step = cfg.batch.per_worker * workers
        if cfg.batch.global_size % per_step:
            size = f"{workers} (of the range {list(cfg.scaling.num_workers)})" if cfg.scaling.elastic else workers
            problems.append(f"batch.global_size: {cfg.batch.global_size} is not divisible by batch.per_worker x "
                            f"scaling.num_workers = {cfg.batch.per_worker} x {size} = {per_step}")
    if cfg.scaling.use_gpu and cfg.precision == "fp32":
        pass  # allowed: fp32 on GPU is slow but valid
    if not cfg.scaling.use_gpu and cfg.precision == "bf16":
        problems.append("precision: bf16 needs scaling.use_gpu=true (CPU training runs in fp32)")
    if cfg.data.val_labels and not cfg.data.val_manifest:
        problems.append("data.val_labels: needs data.val_manifest (the manifest those labels are of)")
    if cfg.data.val_labels and cfg.job != "align":
        problems.append("data.val_labels: only align measures SEA metrics; instruct validates on "
                        "data.val_manifest alone")
    return problems


def cross_field_problems(cfg: BaseModel) -> list[str]:
    """Rules that involve more than one field (a search's rules, which validate each end of a
    search range, are :func:`sea_ray.config.loading._tune_problems`, run beside these by
    :func:`~sea_ray.config.loading.validate`). Grid and label checks that need the tower's
    architecture or the labels' metadata live in :func:`sea_ray.checks.job_problems`."""
    problems: list[str] = []
    if isinstance(cfg, TrainConfig):
        problems += _train_problems(cfg)
    if isinstance(cfg, AlignConfig):
        sea = cfg.sea
        if sea.min_temperature > sea.max_temperature:
            problems.append(f"sea.min_temperature: {sea.min_temperature} > sea.max_temperature {sea.max_temperature}")
        elif sea.learnable_temperature and not sea.min_temperature < sea.init_temperature < sea.max_temperature:
            # strict, as in SeaLoss: a learnable temperature must start off its bounds
            problems.append(f"sea.init_temperature: {sea.init_temperature} must lie strictly inside "
                            f"(sea.min_temperature, sea.max_temperature) = "
                            f"({sea.min_temperature}, {sea.max_temperature})")
        elif not sea.min_temperature <= sea.init_temperature <= sea.max_temperature:
            problems.append(f"sea.init_temperature: {sea.init_temperature} is outside "
                            f"[{sea.min_temperature}, {sea.max_temperature}]")
        if sea.enabled and not cfg.data.labels:
            problems.append("data.labels: required when sea.enabled is true (run `sea-ray labels` first)")
    if isinstance(cfg, LabelsConfig):
        problems += _model_problems(cfg.model, "model", needs_llm=False)
        bad = [t for t in cfg.labeler.templates if t.count("{}") != 1]
        if bad:
            problems.append(f"labeler.templates: each template needs exactly one '{{}}' (bad: {bad})")
        if cfg.model.vision.backend == "hf" and cfg.model.vision.name == "custom":
            problems.append("model.vision: labeling with the hf backend needs a saved CLIPModel dir with its "
                            "tokenizer (vision.name=DIR); a random-init 'custom' hf tower has no tokenizer")
    if isinstance(cfg, EvalConfig):
        problems += _eval_problems(cfg)
    if isinstance(cfg, PipelineConfig):
        problems += _pipeline_problems(cfg)
    if isinstance(cfg, BenchmarkConfig):
        problems += _benchmark_problems(cfg)
    return problems


def eval_inputs_missing(cfg: EvalConfig, metric: str) -> list[str]:
    """The own-data inputs (``data.*`` keys) ``metric`` needs that ``cfg`` does not give (none on a
    world, which holds every input)."""
    data = cfg.data
    if cfg.world is not None:
        return []
    if metric == "alignment":
        return [key for key, value in (("data.manifest", data.manifest), ("data.labels", data.labels)) if not value]
    if metric == "qa":
        return [] if data.conversations else ["data.conversations"]
    return [] if data.manifest or data.conversations else ["data.manifest or data.conversations"]


def eval_metrics(cfg: EvalConfig) -> list[str]:
    """What an eval computes: ``metrics`` when given, else for a world alignment, qa and perplexity,
    for own data lm_loss and every other metric but perplexity whose inputs are given."""
    if cfg.metrics:
        return list(dict.fromkeys(cfg.metrics))
    if cfg.world is not None:
        return list(EVAL_WORLD_METRICS)
    return [m for m in ("lm_loss", "alignment", "qa") if not eval_inputs_missing(cfg, m)]


def _eval_problems(cfg: EvalConfig) -> list[str]:
    problems = _model_problems(cfg.model, "model") if cfg.model is not None else []
    data_given = any(value is not None for key, value in cfg.data.model_dump().items()
                     if key != "label_grid")  # a setting with a default, not data
    if (cfg.world is None) != data_given:
        problems.append("world, data: give exactly one: world (a synthetic world folder, from sea-ray world) or "
                        "data (your own held-out data: data.manifest and/or data.conversations, data.image_root, "
                        "data.labels)" + (" (both are given)" if data_given else ""))
        return problems
    if cfg.world is not None:
        return problems
    if not (cfg.data.manifest or cfg.data.conversations):
        problems.append("data: give data.manifest (captions) and/or data.conversations (conversations with "
                        "reference answers)")
        return problems
    for metric in cfg.metrics or []:
        missing = eval_inputs_missing(cfg, metric)
        if missing:
            problems.append(f"metrics: {metric} on own data needs {' and '.join(missing)}")
    if cfg.vocab:
        problems.append("vocab: own data is decoded over its labels' vocabulary (data.labels); vocab applies to a "
                        "world only")
    return problems


def _benchmark_problems(cfg: BenchmarkConfig) -> list[str]:
    problems = []
    names = [m.name for m in cfg.models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"models: each name once (twice: {', '.join(twice)})")
    if cfg.baseline is not None and cfg.baseline not in names:
        problems.append(f"baseline: {cfg.baseline!r} is none of the models ({', '.join(names)})")
    if WORLD_TASK in cfg.tasks and not cfg.world:
        problems.append(f"world: required by the {WORLD_TASK} task (a folder made by sea-ray world)")
    return problems


# Top-level sections of the base config a search may not change: they locate the data and the
# run, or decide the trial's shape (every trial trains on the same data with the same workers).
# Both constants are read by the search's rules, sea_ray.config.loading._tune_problems.
TUNE_FIXED_SECTIONS = ("job", "run", "ray", "data", "scaling")
TUNE_MODES = {"val_word_acc": "max"}  # every other metric is a loss (min)
