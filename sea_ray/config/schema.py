"""The typed configurations of every sea_ray job: one pydantic class per section and per job.

Path fields are marked by role (:data:`INPUT_PATH`, :data:`OUTPUT_PATH`, :data:`MODEL_PATH`,
:data:`WORLD_PATH`); :data:`JOBS` maps each job name to its config class (what validation reads).
Defaults live only in these classes: YAML recipes and worker code never repeat them. Validation
itself is :func:`sea_ray.config.loading.validate`; the rules across fields are in
:mod:`sea_ray.config.rules`. Nothing here touches Ray or a GPU.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sea_ray.presets import SHIPPED_TEXTS

ADAPTER_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")

# The error budget of every job that skips bad rows (labels, import-manifest) and of the jobs that
# read their output (align's labels): a share of the input rows, judged by
# sea_ray.data.budget.over_budget. One default, used by every field and flag that sets it.
MAX_ERROR_FRACTION = 0.05


# Path fields are marked by role, so code that moves a config to another machine (sea-ray submit)
# finds every path in one walk (path_fields): inputs are read, outputs written; a model path may
# also be a hub id or a registered name; the pipeline's world folder is written by its world step.
INPUT_PATH = {"path": "input"}
OUTPUT_PATH = {"path": "output"}
MODEL_PATH = {"path": "model"}
WORLD_PATH = {"path": "world"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- model


class VisionConfig(_Section):
    """The vision tower (and its paired CLIP text tower, used by the labeler)."""

    backend: Literal["open_clip", "hf"] = Field("open_clip", description="open_clip or Hugging Face (CLIP / SigLIP)")
    name: str = Field("ViT-L-14-336", json_schema_extra=MODEL_PATH,
                      description="open_clip architecture name, or a Hugging Face dir / hub id; "
                      "'custom' builds the tower from `custom`")
    weights: Optional[str] = Field(None, json_schema_extra=MODEL_PATH,
                                   description="open_clip: a local file or dir, an s3:// URI, or a pretrained "
                                   "tag/hub name (online only); none = random init")
    custom: Optional[dict[str, Any]] = Field(None, description="architecture for name=custom: open_clip "
                                             "{embed_dim, vision_cfg, text_cfg} or a Hugging Face CLIPConfig dict")
    select_layer: int = Field(-2, description="hidden state giving the visual tokens (LLaVA: -2, penultimate)")


class AdapterConfig(_Section):
    type: str = Field("mlp2x_gelu", description="linear | mlp2x_gelu (LLaVA-1.5) | mlpNx_gelu (N >= 1 layers)")
    hidden_size: Optional[int] = Field(None, ge=1, description="width of an mlpNx_gelu's hidden layers (N >= 2; "
                                       "default: the LLM's width, as in LLaVA-1.5); ignored by linear")


class LoraConfig(_Section):
    """LoRA on the LLM (instruct; PEFT): the base LLM stays frozen, its LoRA weights train with the
    adapter (and the vision tower with train_vision); a checkpoint holds only those, export merges
    them (docs/instruct.md#lora-and-qlora)."""

    enabled: bool = Field(False, description="train LoRA weights instead of the whole LLM (instruct only: align "
                          "keeps the LLM frozen)")
    rank: int = Field(16, ge=1, description="r, the rank of each LoRA update (LLaVA-1.5's LoRA recipe: 128)")
    alpha: float = Field(32.0, gt=0, description="lora_alpha: the update is scaled by alpha / rank (LLaVA-1.5: "
                         "256)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input (lora_dropout)")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="the LLM's modules that get LoRA weights: all-linear (every linear layer but the "
        "output layer, as LLaVA-1.5's LoRA) or names, each matching the modules whose dotted name is it or ends "
        "with it (PEFT's rule; e.g. [q_proj, v_proj]); each name must match a module of the LLM")
    qlora: bool = Field(False, description="QLoRA: the base LLM is loaded in 4-bit NF4 (bitsandbytes: double "
                        "quantization, bf16 compute) on each GPU worker; needs scaling.use_gpu, weights "
                        "(name_or_path), the bitsandbytes package (the qlora extra) and strategy ddp. Validation, "
                        "eval and export load the base unquantized (dtype) with the LoRA weights")


class LLMConfig(_Section):
    name_or_path: Optional[str] = Field(None, json_schema_extra=MODEL_PATH,
                                        description="Hugging Face causal LM: local dir, s3:// URI or hub id")
    config: Optional[dict[str, Any]] = Field(None, description="build a random-init LM from this config "
                                             "(needs model_type) instead of loading weights")
    tokenizer: Optional[str] = Field(None, json_schema_extra=MODEL_PATH,
                                     description="tokenizer dir / hub id; 'world' builds one for the synthetic "
                                     "world; default: name_or_path")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype when loading; "
                                                             "the GPU recipes load a frozen LLM in bfloat16 "
                                                             "(a 7B LLM is 28 GB per GPU in float32)")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="sdpa: PyTorch's scaled dot-product "
                                                          "attention, which runs FlashAttention-2 kernels on "
                                                          "GPUs for bf16/fp16 (the flash-attn package is not "
                                                          "needed, nor in the cluster image)")
    lora: LoraConfig = Field(LoraConfig(), description="LoRA / QLoRA adapters on the LLM (instruct)")


class ModelConfig(_Section):
    preset: Optional[str] = Field(None, description="a built-in preset's name (sea-ray presets), or a YAML file "
                                  "of a model block (a path ending .yaml/.yml, relative to the config file that "
                                  "names it); expanded before validation, the keys beside it win")
    vision: VisionConfig = VisionConfig()
    adapter: AdapterConfig = AdapterConfig()
    llm: LLMConfig = LLMConfig()


# --------------------------------------------------------------------------- shared sections


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="Ray cluster address; none = RAY_ADDRESS or a local Ray")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray (ignored on a cluster)")


def _worker_bounds(num_workers) -> tuple[int, int]:
    """(min, max) of ``scaling.num_workers``: a number or an elastic [min, max]."""
    return (num_workers, num_workers) if isinstance(num_workers, int) else tuple(num_workers)


class ScalingConfig(_Section):
    num_workers: Union[int, tuple[int, int]] = Field(
        1, description="Ray Train workers: a number, or [min, max] for an elastic group that Ray Train shrinks when "
        "nodes are lost and grows back when room returns, each resize a restart from the newest checkpoint; the "
        "global batch stays fixed (gradient accumulation follows the live number of workers: docs/clusters.md#elastic)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker needs besides its CPUs/GPUs (a node "
        "label such as {trainer_slot: 1}: with one slot per node, one worker per node; an elastic group counts "
        "its room in these)")
    resize_interval_s: float = Field(60.0, gt=0, description="an elastic group: how often Ray Train looks for "
                                     "room to grow while training runs")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave room for data tasks")
    gpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the workers' placement group puts them (Ray's strategies): PACK fills a node "
        "first (GPU jobs: one 8-GPU node), SPREAD puts them on distinct nodes where it can; the STRICT_ forms wait "
        "until they can, also after a node is lost (docs/clusters.md#nodes-lost)")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value):
        low, high = _worker_bounds(value)
        if low < 1 or high < low:
            raise ValueError("needs a number >= 1 or [min, max] with 1 <= min <= max")
        return value

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value):
        if {"CPU", "GPU"} & set(value):
            raise ValueError("CPUs and GPUs are cpus_per_worker and gpus_per_worker; this holds custom resources")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def world_sizes(self) -> range:
        """Every number of workers the group may run with."""
        low, high = _worker_bounds(self.num_workers)
        return range(low, high + 1)


class RunConfig(_Section):
    name: str = Field("sea", pattern=r"^[A-Za-z0-9_.-]+$", description="run name; the same name resumes in place")
    storage: str = Field("./runs", json_schema_extra=OUTPUT_PATH, description="run storage: local dir or s3:// URI")
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
    num_to_keep: Optional[int] = Field(2, ge=1, description="checkpoints a run keeps, the newest complete ones "
                                       "(none: all); after the run, older and incomplete step folders an "
                                       "interrupted run left are deleted too")
    format: Literal["auto", "full", "sharded"] = Field(
        "auto", description="auto = sharded under FSDP, else full. full: rank 0 gathers the trainable tensors and the "
        "optimizer state and writes model.safetensors and optimizer.pt; sharded: every rank writes its own shard "
        "(torch.distributed.checkpoint), nothing is gathered. Both resume on any number of workers and load in eval, "
        "export and generate (docs/align.md#outputs-and-resuming)")
    upload: Literal["async", "sync"] = Field(
        "async", description="async: training goes on while Ray Train uploads a checkpoint to the run storage (it "
        "waits for the upload before the stage ends; a failed upload fails the worker, which resumes from the newest "
        "complete checkpoint); sync: every rank waits for its upload")
    on_preemption: bool = Field(
        True, description="a just-in-time checkpoint (uploaded before training goes on) as soon as Ray Train "
        "reports that a node of the group is being preempted, i.e. drained with a deadline (docs/clusters.md#preemption)")
    preemption_check_every_n_steps: int = Field(
        1, ge=1, description="how often the workers ask Ray Train for a preemption notice (a small collective)")


ImageAspect = Literal["pad", "crop"]


def _image_aspect() -> Any:
    """``data.image_aspect``: one definition for the labels job's data section and the stages'."""
    return Field("crop", description="how an image becomes the tower's square: crop = resize the short side, "
                 "centre crop (the CLIP processor's; the long sides of a non-square photo are cut off); pad = "
                 "LLaVA-1.5's image_aspect_ratio pad, first padded to a square of the tower's mean colour (the "
                 "whole photo is kept). Labels and align must use the same (docs/data.md)")


LabelGrid = Literal["exact", "resample"]


def _label_grid() -> Any:
    """``data.label_grid``: one definition for align's data section and eval's."""
    return Field("exact", description="labels made on another patch grid than the tower's (another tower: "
                 "SigLIP-384's 27 x 27 with CLIP-L-336's 24 x 24 labels): resample moves each patch's label "
                 "scores onto the tower's grid by area (docs/labels.md); exact refuses a grid that differs")


ManifestFormat = Literal["auto", "llava", "webdataset", "parquet"]


def _manifest_format() -> Any:
    """``data.format``: one definition for the labels job's data section and the stages'."""
    return Field("auto", description="what data.manifest holds: llava (LLaVA JSON/JSONL, or Parquet with a "
                 "conversations column, as sea-ray import-manifest writes), webdataset (.tar shards: <key>.jpg with "
                 "<key>.txt and/or <key>.json, img2dataset's webdataset output), parquet (image-text Parquet: an "
                 "image-bytes column, img2dataset's parquet output or a Hugging Face image struct); auto decides "
                 "by file names and columns (docs/data.md)")


class ShardColumnsConfig(_Section):
    """The columns (Parquet) or member extensions (WebDataset) of image-text shards; none = detect."""

    id: Optional[str] = Field(None, description="Parquet id column; none = key, else id (WebDataset: the "
                              "member key)")
    image: Optional[str] = Field(None, description="Parquet image column (bytes or a {bytes, path} struct) or "
                                 "WebDataset image extension; none = the first of jpg, jpeg, png, webp, image, "
                                 "image_bytes, img (WebDataset: jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
    caption: Optional[str] = Field(None, description="Parquet caption column or WebDataset caption extension; "
                                   "none = caption, txt, text, TEXT (WebDataset: txt, caption, text, else the "
                                   "caption of the .json member)")


def _shard_columns() -> Any:
    """``data.columns``: one definition for the labels job's data section and the stages'."""
    return Field(ShardColumnsConfig(), description="image-text shards: which columns (members) hold the id, "
                 "image and caption")


def _manifest_field() -> Any:
    """``data.manifest``: one definition for the labels job's data section and the stages'."""
    return Field(..., json_schema_extra=INPUT_PATH,
                 description="the samples (local or s3://): a LLaVA JSON/JSONL file, a Parquet file, a folder of "
                 "Parquet (an imported manifest) or of image-text shards (.tar, .parquet), or a glob of shards "
                 "(data.format)")


class TrainDataConfig(_Section):
    manifest: str = _manifest_field()
    format: ManifestFormat = _manifest_format()
    columns: ShardColumnsConfig = _shard_columns()
    image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH, description="folder the manifest's image "
                                      "paths are relative to; none = the image root sea-ray import-manifest "
                                      "recorded for an imported manifest, else paths as given")
    labels: Optional[str] = Field(None, json_schema_extra=INPUT_PATH, description="labels dataset URI (align with SEA)")
    label_grid: LabelGrid = _label_grid()
    image_aspect: ImageAspect = _image_aspect()
    max_error_fraction: float = Field(MAX_ERROR_FRACTION, ge=0, le=1,
                                      description="align with SEA: refuse data.labels when more than this share "
                                      "of its input rows are error rows (the counts in its _meta.json); a labels "
                                      "dataset with no labelled row is always refused")
    max_length: int = Field(512, ge=8, description="text tokens per sample (visual tokens not counted)")
    val_manifest: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                        description="held-out manifest (the training one's format): every "
                                        "checkpoint is measured on it (val_loss_lm, val_ppl; docs/align.md)")
    val_labels: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                      description="align with SEA: the labels dataset of val_manifest; adds "
                                      "val_sea_loss and val_word_acc")
    shuffle_window: int = Field(8192, ge=1, description="rows shuffled together: the feed visits windows of this "
                                "many consecutive rows in a seeded order and permutes each (docs/data.md)")
    preprocess_actors: int = Field(1, ge=1, description="Ray Data actors per Train worker that decode images and "
                                   "tokenize")
    preprocess_cpus: float = Field(0.5, gt=0, description="CPUs per preprocessing actor")


class StageValidationConfig(_Section):
    """How a stage measures its checkpoints on ``data.val_manifest`` (sea_ray/train/validation.py)."""

    max_rows: Optional[int] = Field(256, ge=1, description="held-out rows measured (the manifest's first); "
                                    "none = all")
    batch_size: int = Field(16, ge=1, description="rows per forward pass")
    cpus: float = Field(0.5, gt=0, description="CPUs of Ray's validation task (it runs beside training)")
    gpus: float = Field(0.0, ge=0, description="GPUs of Ray's validation task")


class MlflowConfig(_Section):
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking server or store (http(s)://, "
                                        "databricks, sqlite:///PATH); none = MLFLOW_TRACKING_URI, else a SQLite "
                                        "store beside the runs, sqlite:///<run.storage>/mlflow.db (local "
                                        "run.storage only)")
    experiment: Optional[str] = Field(None, description="experiment name; none = the job (align, instruct)")


class WandbConfig(_Section):
    project: Optional[str] = Field(None, description="none = WANDB_PROJECT, else W&B's default")
    entity: Optional[str] = Field(None, description="team or user; none = WANDB_ENTITY, else your default")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(None, description="none = WANDB_MODE, else "
                                                                     "online; offline writes the run to `dir` "
                                                                     "for a later `wandb sync`")
    dir: Optional[str] = Field(None, json_schema_extra=OUTPUT_PATH,
                               description="folder W&B writes its files under (wandb/); none = WANDB_DIR, else the "
                               "run folder when it is local, else W&B's default (the working directory)")


class TrackingConfig(_Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        ["tensorboard"], description="where rank 0 logs the metrics (train/<name> at every logged step); mlflow "
        "and wandb need the `tracking` extra (docs/align.md#experiment-trackers-tracking)")
    mlflow: MlflowConfig = MlflowConfig()
    wandb: WandbConfig = WandbConfig()


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
    tracking: TrackingConfig = TrackingConfig()
    max_failures: int = Field(0, ge=-1, description="worker-group restarts (FailureConfig); -1 = unlimited")
    max_preemptions: int = Field(-1, ge=-1, description="worker-group restarts after a node preemption, counted "
                                 "apart from max_failures (FailureConfig.max_preemption_failures); -1 = unlimited")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    grad_checkpointing: bool = False
    log_every_n_steps: int = Field(10, ge=1)
    validation: StageValidationConfig = Field(StageValidationConfig(), description="with data.val_manifest: "
                                              "held-out metrics at every checkpoint")
    stall_timeout_s: Optional[float] = Field(1800, gt=0, description="a stage that makes no optimizer step for "
                                             "this long fails with what it waits for (data, a collective, a "
                                             "save); none = wait forever")


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
    init_adapter: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                        description="align checkpoint URI the adapter starts from")
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
    extra_words: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                       description="word list file (one word per line), added as is")
    stopwords: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                     description="stop-word file; default: the built-in English list")


class LabelerConfig(_Section):
    top_n: int = Field(10, ge=1, description="labels kept per patch (paper: 10)")
    templates: list[str] = Field(["a photo of a {}."], min_length=1, description="prompt templates; several = "
                                 "ensemble (mean of normalised text embeddings)")
    score_sign: Literal["raw", "negate"] = Field("raw", description="rank by cosine (raw) or negated cosine")
    features: Literal["joint", "dense"] = Field("dense", description="dense: MaskCLIP value path in the last "
                                                "block (the label audit's best, docs/labels.md); joint: final "
                                                "layer -> ln_post -> proj")
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
    ship: Literal["uint8", "float32"] = Field("uint8", description="what decode tasks send to the labeler: "
                                              "resized uint8 pixels (4x smaller; normalised in the actor) or "
                                              "the transformed float tensor")
    stall_timeout_s: Optional[float] = Field(None, gt=0, description="the pipeline is stopped when nothing moves "
                                             "through it for this long; none = Ray Data's no-progress timeout "
                                             "(RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S, 1800 s by default). "
                                             "Stopped before its first shard is written, it is started once "
                                             "more; a second stall, or one after shards are written, fails the "
                                             "job (a re-run keeps the finished shards)")


class LabelsDataConfig(_Section):
    manifest: str = _manifest_field()
    format: ManifestFormat = _manifest_format()
    columns: ShardColumnsConfig = _shard_columns()
    image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                      description="folder (local or s3://) the manifest's image paths are "
                                      "relative to; none = the image root sea-ray import-manifest recorded for "
                                      "an imported manifest, else paths as given")
    image_aspect: ImageAspect = _image_aspect()
    max_image_pixels: Optional[int] = Field(None, ge=1, description="decompression-bomb limit; none = PIL's "
                                            "Image.MAX_IMAGE_PIXELS (~89.5 Mpx). Larger JPEGs are decoded "
                                            "downscaled, other formats rejected")
    max_error_fraction: float = Field(MAX_ERROR_FRACTION, ge=0, le=1,
                                      description="the job fails (no _SUCCESS; finished shards are kept) when more "
                                      "than this share of the manifest's rows are error rows, counted over the "
                                      "whole dataset; a dataset with no labelled row always fails")


class LabelsConfig(_Section):
    job: Literal["labels"] = "labels"
    output: str = Field(..., json_schema_extra=OUTPUT_PATH, description="labels dataset URI (local dir or s3://)")
    seed: int = Field(0, description="seeds random-init towers so every actor (and every re-run) builds the same one")
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: LabelsDataConfig
    vocab: VocabConfig = VocabConfig()
    labeler: LabelerConfig = LabelerConfig()
    compute: LabelsComputeConfig = LabelsComputeConfig()


# --------------------------------------------------------------------------- tune


class SearchDim(_Section):
    """One search dimension. uniform / loguniform: a float in [low, high]; randint: an integer in
    [low, high] (both ends included); choice: one of ``values``."""

    type: Literal["uniform", "loguniform", "choice", "randint"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None


class AshaConfig(_Section):
    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="reports before a trial may be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class OptunaConfig(_Section):
    n_startup_trials: int = Field(4, ge=0, description="random trials before TPE takes over")
    multivariate: bool = Field(True, description="multivariate TPE (models parameter interactions)")
    gamma: Optional[float] = Field(0.25, gt=0, lt=1, description="share of the trials TPE models as good (at "
                                   "most 25 trials); none = Optuna's 10%, a single trial below ten, very greedy "
                                   "on the small budgets of a search")


class TuneValidationConfig(_Section):
    """The held-out metric every trial reports: same images, same sampled pairs, same temperature
    in every trial, so trials are compared on one yardstick."""

    labels: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                  description="labels dataset of base.data.val_manifest; none = hold out "
                                  "num_images images of base.data.labels (never trained on by any trial)")
    num_images: int = Field(32, ge=1, description="held-out labelled images (drawn with seed)")
    seed: int = Field(0, description="draws the held-out images and the fixed SEA pairs (windows, labels)")
    temperature: Optional[float] = Field(None, gt=0, description="fixed InfoNCE temperature of val_sea_loss; "
                                         "none = base.sea.init_temperature (a constant across trials)")
    window: Optional[int] = Field(None, ge=1, description="k of the fixed pairs; none = base.sea.window")
    top_n: Optional[int] = Field(None, ge=1, description="labels per patch used; none = base.sea.top_n")
    batch_size: Optional[int] = Field(None, ge=2, description="images per contrastive batch (its negatives); "
                                      "none = base.batch.per_worker")
    lm_loss: bool = Field(True, description="also report val_lm_loss (caption loss; needs an LLM forward)")


TUNE_METRICS = ("val_sea_loss", "val_word_acc", "val_lm_loss", "loss_lm", "loss_sea")


class TuneConfig(_Section):
    job: Literal["tune"] = "tune"
    base: AlignConfig = Field(..., description="the align config every trial starts from; the experiment "
                              "folder is <base.run.storage>/<base.run.name>")
    space: dict[str, SearchDim] = Field(..., description="dotted key of the base config -> search dimension")
    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    metric: str = Field("val_sea_loss", description="val_sea_loss | val_word_acc | val_lm_loss (held out) or "
                        "loss_lm | loss_sea (training windows)")
    mode: Literal["min", "max"] = "min"
    report_every_n_steps: int = Field(10, ge=1, description="validation + report cadence (the trials' "
                                      "log_every_n_steps)")
    searcher: Literal["optuna", "random"] = "optuna"
    optuna: OptunaConfig = OptunaConfig()
    asha: AshaConfig = AshaConfig()
    validation: TuneValidationConfig = TuneValidationConfig()
    trial_mode: Literal["auto", "in_process", "ray_train"] = Field("auto", description="auto: ray_train on a "
                                                                   "cluster with a dashboard and several nodes, "
                                                                   "GPUs or many CPUs; else in_process")
    auto_ray_train_min_cpus: int = Field(16, ge=1, description="auto: a one-node CPU-only Ray needs this many "
                                         "CPUs for ray_train")
    trial_cpus: float = Field(1.0, gt=0, description="in_process: CPUs per trial (also its torch threads)")
    max_trial_failures: int = Field(1, ge=0, description="retries of a failed trial (resumes from its "
                                    "newest checkpoint)")
    worker_group_start_timeout_s: float = Field(120.0, gt=0, description="ray_train: a trial whose workers "
                                                "cannot start fails after this long instead of hanging")
    state_save_period_s: float = Field(2.0, ge=0, description="how often Tune snapshots the experiment state "
                                       "(what a resume restarts from)")
    plots: bool = True
    seed: int = 0


# --------------------------------------------------------------------------- eval


EVAL_METRICS = ("alignment", "qa", "perplexity", "lm_loss")
EVAL_WORLD_METRICS = ("alignment", "qa", "perplexity")  # what a world is evaluated on when `metrics` is not given


class EvalDataConfig(_Section):
    """Your own held-out data, instead of a synthetic world: LLaVA-format manifests (JSON, JSONL or
    Parquet; local or s3://), their images and, for the SEA diagnostics, a labels dataset."""

    manifest: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                    description="captions manifest (LLaVA pretrain layout: the first answer is "
                                    "the caption): held-out LM loss as align computes it, the captions of TACS "
                                    "and the modality gap, and the images the labels describe")
    conversations: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                         description="conversations manifest (LLaVA instruct layout): held-out LM "
                                         "loss as instruct computes it, and QA by generation (every human turn "
                                         "asked, its gpt turn the reference answer)")
    image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                      description="folder (local or s3://) the manifests' image paths are "
                                      "relative to; none = the image root sea-ray import-manifest recorded for "
                                      "an imported manifest, else paths as given")
    conversations_image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                                    description="image folder of the conversations manifest, "
                                                    "when it differs; none = image_root (when given, else "
                                                    "the one sea-ray import-manifest recorded for it)")
    labels: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                  description="labels dataset of data.manifest's images (sea-ray labels): the "
                                  "nearest words of the visual tokens against its CLIP labels, over its "
                                  "vocabulary (_meta.json)")
    label_grid: LabelGrid = _label_grid()


class EvalConfig(_Section):
    """``sea-ray eval``: a checkpoint on held-out data, a split of the synthetic world or your own
    manifests (see docs/eval.md)."""

    job: Literal["eval"] = "eval"
    checkpoint: str = Field(..., json_schema_extra=INPUT_PATH,
                            description="checkpoint URI, or a run URI (its newest complete checkpoint); "
                            "align or instruct")
    model: Optional[ModelConfig] = Field(None, description="the model; none = the checkpoint's own config.json")
    world: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                 description="synthetic world folder (sea-ray world): images, ground truth, QA; "
                                 "give world or data")
    data: EvalDataConfig = Field(EvalDataConfig(), description="your own held-out data (manifests, images, "
                                 "labels); give world or data")
    split: Literal["train", "val", "test"] = Field("test", description="the world's split (world only)")
    output: str = Field("./eval", json_schema_extra=OUTPUT_PATH,
                        description="report folder (local or s3://): report.json, report.md, plots/, "
                        "predictions.jsonl")
    max_samples: Optional[int] = Field(None, ge=1, description="world: held-out images evaluated (their patches "
                                       "and their questions); data: the first rows of each manifest; none = all")
    metrics: Optional[list[Literal["alignment", "qa", "perplexity", "lm_loss"]]] = Field(
        None, min_length=1, description="alignment: nearest-word accuracy (world ground truth, or agreement with "
        "data.labels), TACS, modality gap; qa: accuracy by generation (exact match; own data also VQA "
        "accuracy); perplexity: the LLM alone on held-out text before vs after; lm_loss: the training "
        "objective (masked LM loss with the images) and its perplexity, for the model training started from "
        "and the checkpoint. none = a world: alignment, qa, perplexity; data: lm_loss, and alignment with "
        "data.labels, qa with data.conversations")
    vocab: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                 description="nearest-word vocabulary: a labels dataset (its _meta.json) or "
                                 "a vocab.json; none = the world's training captions under the labels job's "
                                 "vocabulary rules (the vocab section's defaults). World only: own data is "
                                 "decoded over its labels' vocabulary")
    perplexity_texts: list[str] = Field([], json_schema_extra=INPUT_PATH,
                                        description="text files (one passage per line) on which `perplexity` "
                                        "also measures the LLM alone before vs after: language retention beyond "
                                        "the held-out data; `english` = the ~200 generic English sentences "
                                        "shipped with sea_ray")
    top_k: int = Field(10, ge=1, description="TACS: the best visual-token cosines averaged per image")
    template: Literal["auto", "llava_v1", "chat"] = Field("auto", description="QA prompt template; auto = the "
                                                           "instruct checkpoint's own, else resolved from the "
                                                           "tokenizer as the instruct stage does")
    max_new_tokens: int = Field(8, ge=1, description="QA: greedy decoding stops at eos or after this many tokens")
    batch_size: int = Field(32, ge=1, description="images (or questions) per forward pass")
    curves: list[str] = Field([], json_schema_extra=INPUT_PATH,
                              description="extra run folders whose TensorBoard loss curves join the report "
                              "(the checkpoint's run and, for instruct, its align run are always plotted)")
    audit: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                 description="a label-audit JSON (sea-ray audit-labels) plotted in the "
                                 "report; none = <vocab>/_audit.json (own data: <data.labels>/_audit.json) when "
                                 "that labels dataset has one")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    ray: RayConfig = Field(RayConfig(), description="unused: evaluation runs in this process (kept so pipeline "
                           "wiring can pass its Ray section)")

    @field_validator("perplexity_texts")
    @classmethod
    def _shipped_texts(cls, texts: list[str]) -> list[str]:
        return [SHIPPED_TEXTS.get(t, t) for t in texts]


# --------------------------------------------------------------------------- quickstart


class QuickstartWorldConfig(_Section):
    num_images: int = Field(1200, ge=10, description="world images (80/10/10 train/val/test)")
    seed: int = Field(0, description="the world's seed (the shipped backbones were trained on other seeds)")
    image_size: int = Field(64, ge=32, description="pixels per side; the world presets' towers take 64")


class QuickstartAlignConfig(_Section):
    max_steps: int = Field(250, ge=1, description="optimizer steps (about 2 epochs of the 960 training images)")
    lr: float = Field(2e-3, gt=0)
    global_batch: int = Field(8, ge=1, description="samples per step (one process: no accumulation)")


class QuickstartInstructConfig(_Section):
    max_steps: int = Field(450, ge=1, description="optimizer steps (about 3.5 epochs of the conversations)")
    lr: float = Field(1e-3, gt=0)
    global_batch: int = Field(8, ge=1, description="samples per step (one process: no accumulation)")


class QuickstartConfig(_Section):
    """``sea-ray quickstart``: world -> labels -> align (baseline and +SEA) -> instruct -> eval for
    several seeds, and the paper's table in miniature (see docs/quickstart.md). Every job config
    it runs is built from the job classes above plus the values here, and written into its run
    folder."""

    job: Literal["quickstart"] = "quickstart"
    output: str = Field("./out/quickstart", json_schema_extra=OUTPUT_PATH,
                        description="root of every output (local dir)")
    preset: str = Field("world-clip-llama", description="model preset (its CLIP labels the patches)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="one baseline and one +SEA model per seed")
    world: QuickstartWorldConfig = QuickstartWorldConfig()
    arms: list[Literal["baseline", "+SEA"]] = Field(["baseline", "+SEA"], min_length=1, description="which arms "
                                                     "to train (investigations may run one)")
    labels: Literal["clip", "oracle"] = Field("clip", description="clip: the labels job with the preset's CLIP; "
                                              "oracle: the world's ground-truth patch words in the labels schema "
                                              "(the upper bound of label quality)")
    labels_top_n: int = Field(5, ge=1, description="labels kept per patch")
    labeler_features: Literal["joint", "dense"] = Field("dense", description="the labeler's patch features: the "
                                                        "label audit of the shipped world CLIP measured dense "
                                                        "(MaskCLIP) best (docs/eval.md)")
    align: QuickstartAlignConfig = QuickstartAlignConfig()
    instruct: QuickstartInstructConfig = QuickstartInstructConfig()
    sea: SeaConfig = Field(SeaConfig(), description="the +SEA arm's SEA section (the baseline: enabled=false)")
    set: dict[str, dict[str, Any]] = Field({}, description="per job (labels, align, instruct, eval): dotted "
                                           "values applied last to every config of that job")
    eval_max_samples: Optional[int] = Field(None, ge=1, description="test images evaluated; none = all")
    mode: Literal["tasks", "ray_train"] = Field("tasks", description="tasks: each seed x arm trains in one Ray task "
                                                "(in-process recipe, Ray Data ingest), several at once; ray_train: "
                                                "every stage is a TorchTrainer run, one after the other")
    cpus_per_task: float = Field(1.0, gt=0, description="tasks mode: CPUs (and torch threads) per seed x arm")
    ray: RayConfig = RayConfig()


# --------------------------------------------------------------------------- study


class StudyComparisonConfig(_Section):
    """One comparison of a study: a quickstart (baseline and +SEA, every seed) with its own settings."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="its folder under output and its "
                      "row in the report")
    question: str = Field("", description="the question it answers; the report groups comparisons by it (e.g. "
                          "retention, llm_size, sensitivity)")
    set: dict[str, Any] = Field({}, description="dotted quickstart keys applied over the study's base (preset, "
                                "seeds, sea.weight, instruct.lr, set.instruct, ...)")
    llm_layers: Optional[int] = Field(None, ge=1, description="use as the LLM of align and instruct a world "
                                      "Llama of this many decoder layers, trained on world text as the shipped "
                                      "4-layer one was: the shipped one for 2, 4 and 8 layers (where its recipe "
                                      "is llm_train's), else trained once (sea_ray.world.backbones."
                                      "train_world_llm) and cached under <output>/llms")
    baseline_from: Optional[str] = Field(None, description="another comparison whose baseline arm this one pairs "
                                         "with (it then trains only +SEA); allowed when the two differ only in "
                                         "SEA settings, which the baseline does not use")


class StudyLlmTrainConfig(_Section):
    num_images: int = Field(16000, ge=10, description="world images whose text trains the world Llamas of "
                            "llm_layers (the shipped LLM's recipe)")
    epochs: int = Field(4, ge=1)


class StudyConfig(_Section):
    """``sea-ray study``: comparisons of SEA against the baseline, each a quickstart over several
    seeds, and one report of the paired differences (see docs/study.md)."""

    job: Literal["study"] = "study"
    output: str = Field("./out/study", json_schema_extra=OUTPUT_PATH, description="root of every output (local "
                        "dir): a folder per comparison, study.md, study.json, plots/")
    base: dict[str, Any] = Field({}, description="dotted quickstart keys for every comparison (world size, steps, "
                                 "seeds, ...)")
    comparisons: list[StudyComparisonConfig] = Field(..., min_length=1)
    llm_train: StudyLlmTrainConfig = StudyLlmTrainConfig()
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the differences' confidence intervals")
    ray: RayConfig = RayConfig()


# --------------------------------------------------------------------------- benchmark

# lmms-eval task presets: the paper's eight benchmarks (Table 2), with the splits that score offline.
BENCHMARK_PRESETS = {
    "paper8": ("vqav2_val", "textvqa_val", "gqa", "scienceqa_img", "mmbench_en_dev", "pope", "vizwiz_vqa_val",
               "mmvet"),
}
WORLD_TASK = "world_qa"  # the synthetic world's questions as an lmms-eval task (needs `world`)


class BenchmarkModelConfig(_Section):
    """One model of a benchmark: a column of the table."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="its column in the table")
    path: str = Field(..., json_schema_extra=INPUT_PATH,
                      description="an exported LLaVA folder (sea-ray export), or a checkpoint or run folder, "
                      "exported first into <output>/exports/<name>; local or s3://")


class BenchmarkConfig(_Section):
    """``sea-ray benchmark``: lmms-eval on exported models, one Ray task per model, and one table
    with a column per model and the mean relative gain over the baseline (see docs/export.md)."""

    job: Literal["benchmark"] = "benchmark"
    models: list[BenchmarkModelConfig] = Field(..., min_length=1, description="the models, baseline first "
                                               "unless `baseline` names another")
    baseline: Optional[str] = Field(None, description="the model the relative gains are measured against "
                                    "(default: the first)")
    tasks: list[str] = Field([WORLD_TASK], min_length=1,
                             description="lmms-eval task names and presets: paper8 (" +
                             ", ".join(BENCHMARK_PRESETS["paper8"]) + f"), {WORLD_TASK} (the world's questions, "
                             "scored as sea-ray eval scores them)")
    world: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                 description=f"synthetic world folder of the {WORLD_TASK} task")
    split: Literal["train", "val", "test"] = Field("test", description=f"the world split {WORLD_TASK} asks about")
    max_samples: Optional[int] = Field(None, ge=1, description=f"{WORLD_TASK}: the split's first images (as "
                                       "sea-ray eval's max_samples)")
    max_new_tokens: int = Field(8, ge=1, description=f"{WORLD_TASK}: greedy decoding length (sea-ray eval's)")
    limit: Optional[int] = Field(None, ge=1, description="documents per task (lmms-eval --limit), for a quick look")
    output: str = Field("./benchmark", json_schema_extra=OUTPUT_PATH,
                        description="report folder (local or s3://): report.md, report.json, <model>/results.json, "
                        "exports/")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when the cluster has GPUs")
    gpus_per_model: float = Field(1.0, gt=0, description="GPUs of each model's Ray task when device is cuda")
    batch_size: int = Field(1, ge=1, description="lmms-eval's batch size")
    model_args: dict[str, str] = Field({}, description="extra arguments of lmms-eval's llava_hf model, e.g. "
                                       "attn_implementation: sdpa")
    ray: RayConfig = RayConfig()


# --------------------------------------------------------------------------- pipeline

PIPELINE_STEPS = ("world", "import", "labels", "tune", "align", "instruct", "eval")


class PipelineDataConfig(_Section):
    """The pipeline's input data; every URI is a local path or ``s3://``."""

    world: Optional[str] = Field(None, json_schema_extra=WORLD_PATH,
                                 description="synthetic world folder: the manifests, image root and ground "
                                 "truth below default to it; the `world` step generates it (default there: "
                                 "<output>/world)")
    pretrain: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                    description="caption manifest of labels and align; default: "
                                    "<world>/train/pretrain.json")
    instruct: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                    description="conversation manifest of instruct; default: "
                                    "<world>/train/instruct.json")
    val: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                               description="held-out caption manifest (tune); default: "
                               "<world>/val/pretrain.json")
    image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                      description="folder the manifests' image paths are relative to; "
                                      "default: <world>/images")
    instruct_image_root: Optional[str] = Field(None, json_schema_extra=INPUT_PATH,
                                               description="image folder of the instruct manifest, when it "
                                               "differs; default: image_root")


class PipelineWorldConfig(_Section):
    """The ``world`` step: generate the synthetic world at ``data.world``."""

    num_images: int = Field(300, ge=1)
    seed: int = 0
    image_size: int = Field(64, ge=16, description="pixels per side; the tiny towers take 64")


class PipelineImportConfig(_Section):
    """The ``import`` step: ``sea-ray import-manifest`` of the pretrain and instruct manifests into
    Parquet shards under ``<output>/manifests/``, which the later steps then read."""

    embed_images: bool = Field(False, description="store the image bytes in the shards (no image folder needed)")
    rows_per_shard: Optional[int] = Field(None, ge=1, description="none = the importer's default")
    max_error_fraction: float = Field(MAX_ERROR_FRACTION, ge=0, le=1,
                                      description="an import fails (no _SUCCESS) when more than this share of a "
                                      "manifest's rows are skipped as bad (rows without an image skipped by "
                                      "require_image are a filter, not errors)")


class PipelineStepConfig(_Section):
    """One job of the pipeline: its recipe, then the pipeline's wiring, then ``set``."""

    recipe: Optional[str] = Field(None, description="the job's YAML recipe, relative to the pipeline file "
                                  "(none = only the wiring and `set`)")
    set: dict[str, Any] = Field({}, description="values applied last, over the recipe and the wiring (nested "
                                "mappings or dotted keys, e.g. optim.max_steps: 10)")


class PipelineConfig(_Section):
    """``sea-ray pipeline``: world/import -> labels -> [tune] -> align -> instruct -> eval in one Ray
    session; each step reads the previous step's output and is skipped when its output is complete."""

    job: Literal["pipeline"] = "pipeline"
    output: str = Field(..., json_schema_extra=OUTPUT_PATH,
                        description="root of every output (local dir or s3://): <output>/labels, "
                        "<output>/runs/<run name>, <output>/tune, <output>/eval, <output>/_pipeline")
    steps: list[str] = Field(["labels", "align", "instruct", "eval"], min_length=1,
                             description=f"steps to run, in this order: {', '.join(PIPELINE_STEPS)}")
    ray: RayConfig = RayConfig()
    data: PipelineDataConfig = PipelineDataConfig()
    world: PipelineWorldConfig = PipelineWorldConfig()
    importer: PipelineImportConfig = PipelineImportConfig()
    labels: PipelineStepConfig = PipelineStepConfig()
    tune: PipelineStepConfig = PipelineStepConfig()
    align: PipelineStepConfig = PipelineStepConfig()
    instruct: PipelineStepConfig = PipelineStepConfig()
    eval: PipelineStepConfig = PipelineStepConfig()
    lock: bool = Field(True, description="hold <output>/_pipeline/LOCK while running: a second run on the same "
                       "output fails at once instead of writing beside the first")


JOBS: dict[str, type[_Section]] = {
    "labels": LabelsConfig,
    "align": AlignConfig,
    "instruct": InstructConfig,
    "tune": TuneConfig,
    "eval": EvalConfig,
    "quickstart": QuickstartConfig,
    "study": StudyConfig,
    "pipeline": PipelineConfig,
    "benchmark": BenchmarkConfig,
}
