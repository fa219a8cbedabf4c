"""The stage recipe of both stages, top to bottom: :func:`setup`, then per optimizer step
``accum`` x :func:`micro_step` and one :func:`optimizer_step`, :func:`report` every
``log_every_n_steps`` and :func:`save` every ``checkpoint.every_n_steps``.

``run_stage(cfg, io)`` is the whole recipe. ``io`` supplies what differs between a Ray Train
worker (:class:`RayTrainIO`, used by ``train_loop``) and a plain process (:class:`LocalIO`, used
by the quickstart, in-process tune trials and benchmarks): rank, device, the micro-batches (both
from :mod:`sea_ray.train.feed`, in its one order), how to wrap the model, how to report. Stage
differences are config plus one logged ``freeze(stage)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from sea_ray import storage
from sea_ray.config.schema import AlignConfig, InstructConfig
from sea_ray.constants import IGNORE_INDEX
from sea_ray.data.images import split_transform, to_model_input
from sea_ray.errors import DataError
from sea_ray.runtime import quiet_ray_logs
from sea_ray.model.vlm import build_vlm
from sea_ray.sea import SCHEDULES, SeaLoss, average_gradients, lambda_at, pair_loss, select_pairs, word_targets
from sea_ray.train import checkpoint as ckpt
from sea_ray.train import placement, tracking
from sea_ray.train.feed import chunk_of, memory_micro_batches, order_of, ray_micro_batches
from sea_ray.train.watchdog import StallError, Watchdog

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pieces


def parse_config(raw: dict):
    return (AlignConfig if raw.get("job") == "align" else InstructConfig).model_validate(raw)


def accumulation_steps(cfg, world_size: int) -> int:
    per_step = cfg.batch.per_worker * world_size
    if cfg.batch.global_size % per_step:
        raise ValueError(f"global batch {cfg.batch.global_size} is not divisible by {per_step}")
    return cfg.batch.global_size // per_step


def total_steps(cfg, num_rows: int) -> int:
    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    return max(1, math.floor(cfg.optim.epochs * num_rows / cfg.batch.global_size))


def build_optimizer(model, cfg, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(int(round(cfg.optim.warmup_ratio * steps)), steps))


def lr_factor(warmup: int, steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each optimizer step: linear warm-up from 0 over ``warmup``
    steps, then cosine decay to 0 at ``steps``: the schedule LLaVA trains with, the same numbers as
    transformers' ``get_cosine_schedule_with_warmup`` (tests/test_train.py compares them), whose
    module imports transformers' Trainer utilities and with them peft: ~5 s in every process."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, SCHEDULES["cosine"](min((step - warmup) / max(1, steps - warmup), 1.0)))
    return factor


def sea_setup(model, cfg, device):
    """(targets [V', D], vocab id -> target row [V], labels meta) for the labels' vocabulary.
    Words the LLM cannot represent are reported once and never sampled."""
    from sea_ray.checks import labels_aspect_problem, read_labels_meta

    meta = read_labels_meta(cfg.data.labels)
    if meta is None:
        raise FileNotFoundError(f"no labels metadata at {cfg.data.labels} (run `sea-ray labels` first)")
    spec = model.vision.transform_spec()
    aspect = labels_aspect_problem(meta, model.vision.image_aspect, cfg.data.labels)
    if aspect:
        raise ValueError(aspect)
    if list(meta["grid"]) != list(spec["grid"]):
        if cfg.data.label_grid == "exact":
            raise ValueError(f"labels grid {meta['grid']} != tower grid {spec['grid']} (data.label_grid: resample "
                             "moves them onto the tower's grid)")
        log.info("labels on a %s grid, resampled onto the tower's %s grid", meta["grid"], spec["grid"])
    elif meta.get("transform", spec) != spec:
        raise ValueError(f"labels were computed on another image transform: {meta['transform']} != {spec}")
    words = meta["vocab"]["words"]
    targets, mapped, unmapped = word_targets(words, model.tokenizer, model.input_embedding_table())
    if unmapped:
        log.warning("%d of %d label words cannot be mapped to the LLM and are never sampled: %s",
                    len(unmapped), len(words), ", ".join(unmapped[:20]))
    row_of = torch.full((len(words),), -1, dtype=torch.long)
    row_of[torch.as_tensor(mapped, dtype=torch.long)] = torch.arange(len(mapped))
    return targets.to(device), row_of, meta


def to_model_batch(batch: dict, pad_id: int, normalize, device) -> dict:
    """A numpy batch of the training dataset -> tensors on ``device`` (``normalize``: the tower's
    tensor transform, uint8 [B, H, W, 3] -> float [B, 3, H, W])."""
    n = len(batch["input_ids"])
    length = max(len(x) for x in batch["input_ids"])
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(batch["input_ids"], batch["labels"])):
        input_ids[i, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64).copy())
        labels[i, : len(lab)] = torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())
        mask[i, : len(ids)] = 1
    has_image = np.asarray(batch["has_image"], dtype=bool)
    out = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
           "images": normalize(batch["image"][has_image]).to(device) if has_image.any() else None,
           "num_tokens": int(np.sum(batch["num_tokens"])), "num_samples": n}
    if "label_ids" in batch:
        rows = [i for i in range(n) if has_image[i]]
        out["label_ids"] = torch.stack([torch.from_numpy(np.array(batch["label_ids"][i], dtype=np.int64))
                                        for i in rows])
        out["label_scores"] = torch.stack([torch.from_numpy(np.array(batch["label_scores"][i], dtype=np.float32))
                                           for i in rows])
        out["top_n"] = int(batch["top_n"][0])
    return out


def sea_pairs_for(batch: dict, row_of: torch.Tensor, targets: torch.Tensor, grid, cfg, generator):
    """SEA pairs of one micro-batch: (image_index, patch_index, target vectors)."""
    n_img, top_n = batch["label_ids"].shape[0], batch["top_n"]
    ids = batch["label_ids"].view(n_img, -1, top_n)[..., : cfg.sea.top_n]
    scores = batch["label_scores"].view(n_img, -1, top_n)[..., : cfg.sea.top_n]
    rows = torch.where(ids >= 0, row_of[ids.clamp(min=0)], torch.full_like(ids, -1))
    scores = torch.where(rows >= 0, scores, torch.zeros_like(scores))
    image_index, patch_index, label = select_pairs(rows, scores, tuple(grid), cfg.sea.window, generator)
    device = targets.device
    return image_index.to(device), patch_index.to(device), targets[label.to(device)]


def resolve_strategy(cfg, device) -> str:
    """ddp for align; for instruct FSDP on GPUs (``auto``) or as configured (FSDP2 also runs on CPU).
    QLoRA's 4-bit base is not sharded: ``auto`` is ddp there (``fsdp`` is refused by the config rules)."""
    choice = getattr(cfg, "strategy", "ddp")
    if choice == "auto":
        return "fsdp" if device.type == "cuda" and not cfg.model.llm.lora.qlora else "ddp"
    return choice


def gradient_sync(wrapped, strategy: str, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if strategy == "fsdp" and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def shard_fsdp(model) -> None:
    """FSDP2: shard every LLM decoder layer, then the whole model (frozen parts included).
    Scalar parameters (open_clip's unused logit_scale) cannot be sharded and stay replicated."""
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in model.parameters() if p.ndim == 0}
    layers = getattr(getattr(model.base_llm, "model", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model, ignored_params=scalars or None)


def checkpoint_format(cfg, strategy: str) -> str:
    """The format a stage's checkpoints take (``checkpoint.format``): ``auto`` is ``sharded``
    under FSDP (each rank writes its own shard, nothing is gathered) and ``full`` otherwise (rank 0
    writes ``model.safetensors``). Either format resumes on any world size and loads everywhere."""
    choice = cfg.checkpoint.format
    if choice == "auto":
        return "sharded" if strategy == "fsdp" else "full"
    return choice


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, keyed by parameter names, on CPU. A collective
    under FSDP; plain state dicts otherwise."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def sharded_state(model, optimizer, keys: set) -> tuple[dict, dict]:
    """This rank's model tensors of ``keys`` and its optimizer state, keyed by parameter names,
    where they live: FSDP2's DTensor shards, or the plain tensors of an unsharded model. Nothing
    is gathered or copied (the tensors share the parameters' and moments' storage)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = {k: v for k, v in get_model_state_dict(model).items() if k in keys}
    return model_state, get_optimizer_state_dict(model, optimizer)


def restore_sharded(uri: str, model, optimizer, keys: set) -> dict:
    """Load a sharded checkpoint into the live (wrapped) model and its optimizer, on any world
    size: DCP reads each rank's part of the saved shards into this rank's tensors, then the
    states are set through the FSDP-aware state-dict API (the saved parameter groups with them).
    Returns the checkpoint's scheduler state and data position (:func:`ckpt.load_sharded`)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model_state, optim_state = sharded_state(model, optimizer, keys)  # the optimizer's state initialised
    info = ckpt.load_sharded(uri, model_state, ckpt.flat_optimizer_state(optim_state["state"]))
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=False))
    optim_state["param_groups"] = info["optimizer"]["optimizer"]["param_groups"]
    set_optimizer_state_dict(model, optimizer, optim_state)
    return info


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def build_sea_loss(sea_cfg):
    """The SEA loss of the align stage (it owns the learnable temperature)."""
    return SeaLoss(init_temperature=sea_cfg.init_temperature, min_temperature=sea_cfg.min_temperature,
                   max_temperature=sea_cfg.max_temperature, learnable=sea_cfg.learnable_temperature)


def trained_modules(model, sea_loss) -> torch.nn.Module:
    """What the optimizer steps and a checkpoint holds: the model's modules and, in align, the SEA
    loss under ``sea_head`` (its checkpoint key since the first release, so every checkpoint loads)."""
    if sea_loss is None:
        return model
    holder = torch.nn.Module()
    for name, child in model.named_children():
        holder.add_module(name, child)
    holder.add_module("sea_head", sea_loss)
    return holder


def step_generator(seed: int, step: int, chunk: int) -> torch.Generator:
    """Stateless randomness per (step, micro-batch of the step's global batch): a resumed run draws
    exactly the same, and so does a run on another number of workers, because ``chunk`` names
    the rows, not the worker (:func:`chunk_of`)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + chunk)


# --------------------------------------------------------------------------- the recipe


@dataclass
class Stage:
    """Everything :func:`setup` builds for one stage; the step, save and report functions use it."""

    cfg: Any
    io: Any
    model: torch.nn.Module
    sea_loss: Optional[torch.nn.Module]
    trained: torch.nn.Module  # what the optimizer steps and a checkpoint holds
    wrapped: torch.nn.Module  # the model under DDP/FSDP
    strategy: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    normalize: Callable
    steps: int
    accum: int
    state: dict
    trainable_keys: set
    targets: Optional[torch.Tensor] = None
    row_of: Optional[torch.Tensor] = None
    grid: tuple = ()
    tracker: Optional[tracking.Tracker] = None  # the experiment trackers (none on ranks other than 0)
    checkpoint_format: str = "full"  # checkpoint_format(cfg, strategy)


def build_model(cfg, device: Optional[torch.device] = None):
    """(model with the stage's trainable parts, SEA loss or None): the same initial weights on
    every worker; instruct starts its adapter from ``init_adapter``. ``device``: the training
    worker's, where a QLoRA config loads its 4-bit base (none: the base unquantized, as
    validation measures a checkpoint)."""
    torch.manual_seed(cfg.run.seed)
    model = build_vlm(cfg.model, cfg.data.image_aspect, quantized_on=device)
    sea_loss = build_sea_loss(cfg.sea) if cfg.job == "align" and cfg.sea.enabled else None
    if cfg.job == "instruct" and cfg.init_adapter:
        source = ckpt.resolve(cfg.init_adapter)
        adapter = {k[len("adapter."):]: v for k, v in ckpt.load_model_state(source).items()
                   if k.startswith("adapter.")}
        model.adapter.load_state_dict(adapter)
        log.info("adapter initialised from %s", source)
    model.freeze(cfg.job, train_vision=getattr(cfg, "train_vision", False))
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    return model, sea_loss


def setup(cfg, io) -> Stage:
    """Model, SEA targets, wrapping, optimizer and schedule; resumed from the run's newest complete
    checkpoint when there is one."""
    device = io.device
    model, sea_loss = build_model(cfg, device)
    tensor_part = split_transform(model.vision.transform)[1]
    extra = {}
    if sea_loss is not None:
        extra["targets"], extra["row_of"], _ = sea_setup(model, cfg, device)
        extra["grid"] = tuple(model.vision.transform_spec()["grid"])
        sea_loss.to(device)
    model.to(device)
    trained = trained_modules(model, sea_loss)
    trainable_keys = {n for n, p in trained.named_parameters() if p.requires_grad}
    steps = total_steps(cfg, io.num_rows)
    latest = io.resume_from()
    # a full checkpoint loads whole before wrapping; a sharded one into the wrapped model's shards
    sharded = latest is not None and ckpt.checkpoint_format_of(latest) == "sharded"
    saved = ckpt.load_checkpoint(latest) if latest is not None and not sharded else None
    if saved is not None:
        missing = trainable_keys - set(saved["model"])
        if missing:
            raise ValueError(f"checkpoint {latest} lacks trainable tensors: {sorted(missing)[:5]}")
        trained.load_state_dict(saved["model"], strict=False)
    strategy = resolve_strategy(cfg, device)
    wrapped = io.wrap(model, strategy)  # FSDP shards `model` in place; DDP wraps it
    optimizer, scheduler = build_optimizer(trained, cfg, steps)
    state = {"step": 0, "samples": 0}
    if saved is not None:
        load_optimizer_state(trained, optimizer, saved["optimizer"]["optimizer"])
    elif sharded:
        saved = restore_sharded(latest, trained, optimizer, trainable_keys)
    if saved is not None:
        scheduler.load_state_dict(saved["optimizer"]["scheduler"])
        state = {"step": saved["state"]["step"], "samples": saved["state"]["samples"]}
        log.info("resumed from %s (step %d)", latest, state["step"])
    return Stage(cfg, io, model, sea_loss, trained, wrapped, strategy, optimizer, scheduler,
                 normalize=lambda images: to_model_input(images, tensor_part), steps=steps,
                 accum=accumulation_steps(cfg, io.world_size), state=state, trainable_keys=trainable_keys,
                 tracker=tracking.start(cfg, io.run_uri, io.world_rank),
                 checkpoint_format=checkpoint_format(cfg, strategy), **extra)


def autocast_for(cfg, device):
    if device.type == "cuda" and cfg.precision in ("auto", "bf16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_step(st: Stage, batch: dict, micro: int, weight: float = 1.0) -> dict:
    """Forward and backward of one micro-batch (``weight`` 0: a stand-in for a micro-batch whose
    rows were all dropped, so every worker still takes part in the gradient all-reduce)."""
    cfg, step = st.cfg, st.state["step"]
    b = to_model_batch(batch, st.model.tokenizer.pad_token_id, st.normalize, st.io.device)
    pairs = None
    chunk = chunk_of(st.io.world_rank, micro, st.io.world_size)
    if st.sea_loss is not None:
        pairs = sea_pairs_for(b, st.row_of, st.targets, st.grid, cfg, step_generator(cfg.run.seed, step, chunk))
    # dropout (LoRA's, a trained tower's) draws from the global generator: seeded per micro-batch
    # from the same stateless stream, so that a resumed run drops exactly what the first one did
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=step_generator(cfg.run.seed + 1, step, chunk))))
    with gradient_sync(st.wrapped, st.strategy, micro == st.accum - 1), autocast_for(cfg, st.io.device):
        out = st.wrapped(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
        loss = out["loss_lm"]
        parts = {"loss_lm": float(out["loss_lm"].detach()) * weight / st.accum}
        if st.sea_loss is not None:
            sea = pair_loss(st.sea_loss, out["visual"], pairs, cfg.sea.negatives)
            lam = lambda_at(step, st.steps, cfg.sea.weight, cfg.sea.schedule)
            loss = loss + lam * sea["loss"]
            parts.update(loss_sea=float(sea["loss"].detach()) * weight / st.accum,
                         sea_pairs=sea["num_pairs"] * weight, lambda_sea=lam, temperature=float(sea["temperature"]))
        (loss * (weight / st.accum)).backward()
    return dict(parts, samples=b["num_samples"] * weight, tokens=b["num_tokens"] * weight)


def optimizer_step(st: Stage) -> None:
    if st.sea_loss is not None:
        average_gradients(st.sea_loss.parameters())  # outside DDP: averaged here, as DDP does the rest
    if st.cfg.optim.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in st.trained.parameters() if p.requires_grad],
                                       st.cfg.optim.max_grad_norm)
    st.optimizer.step()
    if st.sea_loss is not None:
        st.sea_loss.clamp_()  # keep the SEA temperature in its bounds (clamped in place)
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    st.state["step"] += 1
    st.state["samples"] += st.cfg.batch.global_size


class Window:
    """Sums of the micro-step parts since the last logging step."""

    SUMMED = ("loss_lm", "loss_sea", "sea_pairs", "samples", "tokens")

    def __init__(self):
        self.start, self.steps, self.sums, self.last = time.perf_counter(), 0, dict.fromkeys(self.SUMMED, 0.0), {}

    def add(self, parts: dict) -> None:
        for key in self.SUMMED:
            self.sums[key] += parts.get(key, 0.0)
        self.last = parts

    def metrics(self, st: Stage) -> dict:
        elapsed, n = time.perf_counter() - self.start, max(1, self.steps)
        out = {"loss_lm": self.sums["loss_lm"] / n, "lr": st.scheduler.get_last_lr()[0],
               "samples_per_s": self.sums["samples"] * st.io.world_size / elapsed,
               # the global batch of an elastic group stays fixed as its size changes: these say so
               "samples_per_step": self.sums["samples"] * st.io.world_size / n, "world_size": st.io.world_size,
               "accumulation": st.accum,
               "tokens_per_s": self.sums["tokens"] * st.io.world_size / elapsed,
               "epoch": st.state["step"] * st.cfg.batch.global_size // st.io.num_rows}
        if st.sea_loss is not None:
            out.update(loss_sea=self.sums["loss_sea"] / n, sea_pairs=self.sums["sea_pairs"] / n,
                       lambda_sea=self.last.get("lambda_sea", 0.0), temperature=self.last.get("temperature", 0.0))
        return out


def report(st: Stage, window: Window, evaluate: Optional[Callable]) -> dict:
    """The logging step's metrics (plus ``evaluate(model, step)``'s), to the trackers on rank 0."""
    step = st.state["step"]
    metrics = window.metrics(st)
    if evaluate is not None:
        st.model.eval()
        with torch.no_grad():
            metrics.update(evaluate(st.model, step))
        st.model.train()
    st.tracker.log(metrics, step)
    return metrics


def save(st: Stage, metrics: dict, sync: bool = False) -> None:
    """A checkpoint of the trainable tensors, optimizer, schedule and position. Every rank takes
    part: under FSDP gathering the full state is a collective, and in the sharded format every
    rank writes its own shard. The local folder goes to ``io.report``, which owns it from then on
    (Ray Train uploads it, synchronously or not, and deletes it); ``sync``: uploaded before
    training goes on, whatever ``checkpoint.upload`` says (a just-in-time checkpoint)."""
    step = st.state["step"]
    folder = _write_local(st)
    st.io.report(dict(metrics, step=step), folder, ckpt.step_dir_name(step), sync=sync)
    st.io.keep_newest(st.cfg.checkpoint.num_to_keep)


def local_checkpoint_root(run_uri: str, rank: int) -> str:
    """Where ``rank`` of the run at ``run_uri`` writes its checkpoints on their way to storage:
    one folder per run and rank under the temp dir (``TMPDIR``). A worker killed with uploads
    pending (a lost node, a resized or failed group) leaves its folders behind, each as large as
    a checkpoint; the next start of the same run and rank deletes them (:func:`clear_local_checkpoints`)."""
    import hashlib

    key = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "sea-ray-checkpoints", f"{key}-rank{rank}")


def clear_local_checkpoints(root: str) -> None:
    """Deletes what an earlier start of this run and rank left in ``root``. Only one start of a
    run's rank lives at a time (Ray Train ends a worker group before it starts the next one), so
    nothing there is still being uploaded."""
    import shutil

    if not os.path.isdir(root):
        return
    left = [os.path.join(root, name) for name in os.listdir(root)]
    size = sum(os.path.getsize(os.path.join(d, f)) for path in left for d, _, files in os.walk(path) for f in files)
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    if left:
        log.warning("removed %d local checkpoint folder(s) (%.1f MB) that an interrupted start of this run left "
                    "in %s", len(left), size / 1e6, root)


def _write_local(st: Stage) -> Optional[str]:
    """This rank's part of the checkpoint in a new local folder (None: this rank has none)."""
    import shutil

    from sea_ray.config.loading import to_dict

    step, rank = st.state["step"], st.io.world_rank
    sharded = st.checkpoint_format == "sharded"
    if sharded:
        model_state, optim_state = sharded_state(st.trained, st.optimizer, st.trainable_keys)
    else:
        model_state, optim_state = full_state(st.trained, st.optimizer)
        if rank != 0:
            return None
    root = local_checkpoint_root(st.io.run_uri, rank)
    os.makedirs(root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{ckpt.step_dir_name(step)}-", dir=root)
    try:
        if sharded:
            ckpt.write_sharded(folder, model_state, optim_state, st.scheduler.state_dict(), dict(st.state),
                               to_dict(st.cfg), st.cfg.job)
        else:
            ckpt.write_checkpoint(folder, {k: v for k, v in model_state.items() if k in st.trainable_keys},
                                  {"optimizer": optim_state, "scheduler": st.scheduler.state_dict()},
                                  dict(st.state), to_dict(st.cfg), st.cfg.job)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _log_validations(st: Stage, wait: bool) -> None:
    """Rank 0: the metrics of checkpoints validated since the last call (Ray's validation tasks,
    :mod:`sea_ray.train.validation`), to the trackers under ``val/`` at their checkpoints' steps;
    ``wait``: the stage has ended, so wait for the validations still running."""
    if st.io.world_rank != 0:
        return
    for step, metrics in st.io.validations(wait):
        st.tracker.log({k[len("val_"):]: v for k, v in metrics.items() if k.startswith("val_")}, step, prefix="val")


def run_stage(cfg, io, evaluate: Optional[Callable[[object, int], dict]] = None) -> dict:
    """Train one stage; returns the last metrics. ``evaluate(model, step)``, when given, runs at
    every logging step and its metrics join the report (validation metrics for Tune). A stage
    that makes no optimizer step for ``cfg.stall_timeout_s`` fails (:mod:`sea_ray.train.watchdog`)."""
    st = setup(cfg, io)
    clear_local_checkpoints(local_checkpoint_root(io.run_uri, io.world_rank))
    io.record_start(st.state["step"])
    batches = io.micro_batches(order_of(cfg, io.num_rows), st.state["step"], st.steps)
    window, metrics, last = Window(), {}, None
    waiting = {"what": "the first micro-batch"}

    def describe() -> str:
        return (f"{cfg.job} stage, worker {io.world_rank} of {io.world_size}, at step {st.state['step']}/{st.steps}, "
                f"waiting for {waiting['what']}")

    dog = Watchdog(cfg.stall_timeout_s, describe, hard_exit=isinstance(io, RayTrainIO))
    try:
        with dog, st.tracker:  # the trackers close when the stage ends, failed or not
            while st.state["step"] < st.steps:
                for micro in range(st.accum):
                    waiting["what"] = f"micro-batch {micro + 1} of {st.accum} (the data feed)"
                    batch = next(batches)
                    if batch is None and last is None:
                        raise DataError(f"worker {io.world_rank}: every row of its first micro-batch was dropped "
                                        "(see the warnings above)")
                    waiting["what"] = f"the forward and backward of micro-batch {micro + 1} of {st.accum}"
                    window.add(micro_step(st, batch if batch is not None else last, micro,
                                          1.0 if batch is not None else 0.0))
                    last = batch if batch is not None else last
                waiting["what"] = "the optimizer step (the gradient all-reduce with the other workers)"
                optimizer_step(st)
                dog.beat()
                window.steps += 1
                step = st.state["step"]
                checkpoint = step % cfg.checkpoint.every_n_steps == 0 or step == st.steps
                preempted = io.preempted(step, cfg.checkpoint)  # every rank asks, at the same steps
                checkpoint = checkpoint or preempted
                if step % cfg.log_every_n_steps == 0 or step == st.steps:
                    waiting["what"] = "the report (metrics and evaluation)"
                    metrics = report(st, window, evaluate)
                    window = Window()
                    if not checkpoint:
                        io.report(dict(metrics, step=step), None, None)
                if checkpoint:
                    # the validations of the earlier checkpoints first: asking for them waits until
                    # the newest reported one is uploaded, which would undo an asynchronous upload
                    _log_validations(st, wait=False)
                    waiting["what"] = "the checkpoint save"
                    save(st, metrics, sync=preempted)
                    st.tracker.flush()
                dog.beat()
            waiting["what"] = "the validation of the last checkpoints (Ray's validation tasks)"
            _log_validations(st, wait=True)
    except StallError:
        raise dog.error() from None
    return metrics


# --------------------------------------------------------------------------- I/O adapters


class RayTrainIO:
    """Inside a Ray Train worker: its micro-batches preprocessed on Ray Data as they go."""

    def __init__(self, run_uri: str, source, preprocess: dict, actors: int = 1, actor_cpus: float = 0.5,
                 validate: bool = False, upload: str = "async"):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_uri, self.num_rows, self.source, self.preprocess = run_uri, source.num_rows, source, preprocess
        self.actors, self.actor_cpus = actors, actor_cpus
        self.validate = validate  # every checkpoint goes to Ray's validation task (sea_ray.train.validation)
        self.upload = upload  # checkpoint.upload: async = training goes on while Ray Train uploads
        self._validated: set = set()
        self._preemption_saved = False  # one just-in-time checkpoint per start of the group

    def resume_from(self) -> Optional[str]:
        """The checkpoint every rank of this start of the worker group resumes from, chosen once,
        by rank 0, and handed to the others (a collective), so that they cannot disagree: the run's
        newest complete checkpoint (:func:`checkpoint.resume_point`, which deletes the incomplete
        ones after it). Rank 0 chooses, not the driver, because Ray restarts a failed or resized
        group without the driver; and from storage, not from ``ray.train.get_checkpoint()``,
        because a checkpoint is complete in storage before Ray's controller has recorded it (a
        worker killed in between would otherwise redo its steps)."""
        import torch.distributed as dist

        chosen = ckpt.resume_point(self.run_uri) if self.world_rank == 0 else None
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        return chosen

    def keep_newest(self, keep: Optional[int]) -> None:
        """Ray Train's checkpoint manager keeps the ``num_to_keep`` newest checkpoints; what an
        interrupted run left behind the driver deletes after the run (checkpoint.prune)."""

    def record_start(self, step: int) -> None:
        """Where this start of the worker group runs (:mod:`sea_ray.train.placement`): every rank
        tells rank 0 its node (a collective), rank 0 writes the record."""
        import torch.distributed as dist

        me = placement.this_worker(self.world_rank)
        workers = [me]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            workers = [None] * self.world_size
            dist.all_gather_object(workers, me)
        if self.world_rank == 0:
            placement.record(self.run_uri, step, workers)

    def micro_batches(self, order, start_step: int, steps: int) -> Iterable[Optional[dict]]:
        return ray_micro_batches(self.source, self.preprocess, order, self.world_size, self.world_rank, start_step,
                                 steps, self.actors, self.actor_cpus)

    def wrap(self, model, strategy: str):
        import ray.train.torch

        if self.world_size == 1:
            return model
        if strategy == "fsdp":
            shard_fsdp(model)
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                             parallel_strategy_kwargs={"find_unused_parameters": False})

    def preempted(self, step: int, checkpointing) -> bool:
        """True once, at the first check after Ray Train reports that a node of this group is being
        preempted (drained with a deadline: ``ray.train.get_preemption_info()``, a collective every
        rank calls at the same steps); the stage then checkpoints at once and trains on until the
        node goes, and the restart resumes from that checkpoint."""
        if (not checkpointing.on_preemption or self._preemption_saved
                or step % checkpointing.preemption_check_every_n_steps):
            return False
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self._preemption_saved = True
        left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        log.warning("worker %d: nodes %s are being preempted (ranks %s%s): a just-in-time checkpoint at step %d",
                    self.world_rank, sorted(info.preempted_node_to_ranks),
                    sorted(r for ranks in info.preempted_node_to_ranks.values() for r in ranks),
                    f", {left:.0f} s left" if left is not None else "", step)
        return True

    def report(self, metrics: dict, checkpoint_dir: Optional[str], name: Optional[str], sync: bool = False):
        """Report to Ray Train; ``checkpoint_dir`` (this rank's local folder, or None) is uploaded
        into the run's ``name`` folder beside the other ranks' and deleted after its upload. With
        ``checkpoint.upload: async`` (and not ``sync``) the upload runs in Ray's background thread
        and training goes on; Ray Train waits for it before the worker ends, and a failed upload
        fails the worker."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        mode = CheckpointUploadMode.ASYNC if self.upload == "async" and not sync else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None,
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=bool(checkpoint),
                         validation=bool(checkpoint) and self.validate)

    def validations(self, wait: bool) -> list[tuple[int, dict]]:
        """``(step, metrics)`` of the checkpoints Ray validated since the last call, by step (with
        ``wait``: after every validation still running has finished)."""
        if not self.validate:
            return []
        import ray.train
        from ray.train import CheckpointConsistencyMode

        mode = CheckpointConsistencyMode.VALIDATED if wait else CheckpointConsistencyMode.COMMITTED
        new = []
        for reported in ray.train.get_all_reported_checkpoints(consistency_mode=mode):
            step = reported.metrics.get("val_step")
            if step is not None and int(step) not in self._validated:
                self._validated.add(int(step))
                new.append((int(step), reported.metrics))
        return sorted(new, key=lambda item: item[0])


class LocalIO:
    """A plain single process (the quickstart's chains, in-process tune trials, benchmarks): the
    same recipe and feed order, on rows preprocessed once (:func:`sea_ray.train.feed.materialize`)."""

    def __init__(self, run_uri: str, rows: dict, num_rows: int, on_report: Optional[Callable[[dict], None]] = None,
                 device: str = "cpu"):
        self.world_rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.run_uri, self.rows, self.num_rows, self._on_report = run_uri, rows, num_rows, on_report

    def record_start(self, step: int) -> None:
        """One process on this machine: nothing to record (:mod:`sea_ray.train.placement` is Ray's)."""

    def resume_from(self) -> Optional[str]:
        return ckpt.resume_point(self.run_uri)

    def keep_newest(self, keep: Optional[int]) -> None:
        ckpt.prune(self.run_uri, keep)

    def micro_batches(self, order, start_step: int, steps: int) -> Iterable[Optional[dict]]:
        return memory_micro_batches(self.rows, order, 1, 0, start_step, steps)

    def wrap(self, model, strategy: str):
        return model

    def validations(self, wait: bool) -> list[tuple[int, dict]]:
        return []  # in one process, validation is the evaluate callback of run_stage

    def preempted(self, step: int, checkpointing) -> bool:
        return False  # one process on this machine: no Ray node to be preempted

    def report(self, metrics: dict, checkpoint_dir: Optional[str], name: Optional[str], sync: bool = False):
        if checkpoint_dir and name:
            import shutil

            try:
                ckpt.publish(checkpoint_dir, storage.join(self.run_uri, name))
            finally:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if self._on_report:
            self._on_report(metrics)


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry point."""
    import ray.train

    logging.basicConfig(level=logging.INFO)
    quiet_ray_logs()
    if ray.train.get_context().get_world_rank() != 0:  # one worker says what the stage is
        logging.getLogger("sea_ray").setLevel(logging.WARNING)
    cfg = parse_config(loop_config["cfg"])
    run_stage(cfg, io_of(cfg, loop_config))


def io_of(cfg, loop_config: dict) -> RayTrainIO:
    """The worker I/O of a driver's ``loop_config`` (run folder, source, preprocessing arguments)."""
    return RayTrainIO(loop_config["run_uri"], loop_config["source"], loop_config["preprocess"],
                      cfg.data.preprocess_actors, cfg.data.preprocess_cpus, validate=loop_config.get("validate", False),
                      upload=cfg.checkpoint.upload)
