"""The Ray Train driver of both stages: validated config -> TorchTrainer -> fit -> summary.

The run folder is ``<run.storage>/<run.name>`` (local or ``s3://``); names carry no timestamp,
so running the same config again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from typing import Callable, Optional

from sea_ray import paths, storage
from sea_ray.checks import tower_image_size
from sea_ray.config.loading import to_dict
from sea_ray.errors import SeaRayError, TrainingFailed
from sea_ray.paths import absolute_paths
from sea_ray.runtime import init_ray, ray_logs_quiet
from sea_ray.train import placement

log = logging.getLogger(__name__)


def run_uri(cfg) -> str:
    return storage.join(paths.absolute(cfg.run.storage), cfg.run.name)


def step_line(step: int, total: int, metrics: dict) -> str:
    """One compact progress line: ``step 10/50 loss_lm 1.234 loss_sea 0.567 lr 1.0e-03 samples/s 12.3
    samples/step 64 workers 2``."""
    parts = [f"step {step}/{total}"]
    parts += [f"{k} {metrics[k]:.4f}" for k in ("loss_lm", "loss_sea", "temperature") if k in metrics]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "samples_per_s" in metrics:
        parts.append(f"samples/s {metrics['samples_per_s']:.1f}")
    if "samples_per_step" in metrics:  # fixed however many workers run (an elastic group)
        parts.append(f"samples/step {metrics['samples_per_step']:g} workers {metrics['world_size']}")
    return " ".join(parts)


def _progress_callback(total: int, desc: str, bar: bool):
    """Progress on the driver: a bar (tqdm_ray, rendered from the controller actor) when the
    driver's output is a terminal, else one :func:`step_line` per report."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        def __init__(self):
            self.bar = None
            self.done = 0

        def after_report(self, run_context, metrics, checkpoint):
            step = int(metrics[0].get("step", self.done)) if metrics else self.done
            if bar:
                from ray.experimental.tqdm_ray import tqdm

                if self.bar is None:
                    self.bar = tqdm(total=total, desc=desc)
                self.bar.update(max(0, step - self.done))
            else:
                print(f"{desc} {step_line(step, total, metrics[0] if metrics else {})}", flush=True)
            self.done = step

    return Progress()


def make_trainer(cfg, worker_fn, loop_config: dict, callbacks: list,
                 controller_failure_limit: Optional[int] = None):
    """A ``TorchTrainer`` running ``worker_fn(loop_config)`` with ``cfg``'s scaling, run storage,
    failure and checkpoint settings. Each worker reads its own rows (:mod:`sea_ray.train.feed`;
    the source travels in ``loop_config``), so the trainer is given no dataset.
    ``controller_failure_limit``: how often the controller itself may fail before the run does
    (a tune trial sets 1, so it fails instead of hanging)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    fs, path = storage.pyarrow_fs(cfg.run.storage)
    failure = {"max_failures": cfg.max_failures, "max_preemption_failures": cfg.max_preemptions}
    if controller_failure_limit is not None:
        failure["controller_failure_limit"] = controller_failure_limit
    validation = None
    if loop_config.get("validate"):  # every checkpoint measured by a Ray task beside training
        from ray.train import ValidationConfig, ValidationTaskConfig

        from sea_ray.train.validation import validate_checkpoint

        task = {"num_cpus": cfg.validation.cpus, "num_gpus": cfg.validation.gpus}
        validation = ValidationConfig(fn=validate_checkpoint, ray_remote_kwargs=task,
                                      task_config=ValidationTaskConfig(fn_kwargs={"cfg": loop_config["cfg"]}))
    return TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy,
                                     elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s),
        run_config=RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(**failure),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                             callbacks=callbacks,
                             logging_config=LoggingConfig(log_level="WARNING" if ray_logs_quiet() else "INFO")),
        validation_config=validation,
    )


def on_report_callback(fn: Callable[[dict], None]):
    """A Ray Train callback calling ``fn(rank 0's metrics)`` on the controller after each report."""
    from ray.train import UserCallback

    class OnReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                fn(dict(metrics[0]))

    return OnReport()


def loop_config(cfg, run: str, exclude_ids=()) -> dict:
    """What a worker needs besides the config: the run folder, the feed's source (manifest and
    labels read once here, shared through the object store) and the preprocessing arguments."""
    from sea_ray.train.data import preprocess_kwargs, source_of

    (image_size, _), _ = tower_image_size(cfg.model.vision)
    return {"cfg": to_dict(cfg), "run_uri": run, "source": source_of(cfg, exclude_ids),
            "preprocess": preprocess_kwargs(cfg, image_size), "validate": bool(cfg.data.val_manifest)}


def fit(trainer, what: str):
    """``trainer.fit()``; a failure of its workers becomes one :class:`TrainingFailed` naming each
    distinct worker error with its ranks (a sea_ray error by its message, any other by its type too)."""
    from ray.train import ControllerError, TrainingFailedError

    try:
        with _sigint_handler_restored():
            return trainer.fit()
    except ControllerError as exc:  # the controller's own failure (its storage out of reach): not retried by Ray
        cause = getattr(exc, "controller_failure", None) or exc
        text = storage.storage_error(cause) if isinstance(cause, OSError) else _last_line(cause)
        raise TrainingFailed(f"{what} failed: {text}; re-run the same command to resume from the newest "
                             "complete checkpoint") from None
    except TrainingFailedError as exc:
        failures = getattr(exc, "worker_failures", None) or {}
        by_error: dict[str, list[int]] = {}
        for rank, error in sorted(failures.items()):
            text = str(error) if isinstance(error, SeaRayError) else f"{type(error).__name__}: {error}"
            by_error.setdefault(text.strip().splitlines()[-1] if text.strip() else type(error).__name__,
                                []).append(rank)
        lines = [f"worker {', '.join(map(str, ranks))}: {text}" for text, ranks in by_error.items()]
        if not lines:
            lines = [str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__]
        raise TrainingFailed(f"{what} failed (tracebacks above):\n  " + "\n  ".join(lines)) from None


@contextlib.contextmanager
def _sigint_handler_restored():
    """Puts back the SIGINT handler that ``trainer.fit()`` replaces (in the main thread) with one
    holding the run's controller actor. Left in place, it keeps that actor alive until the next
    ``fit()`` replaces it, so in a driver that runs stages one after another (a pipeline, the
    study, a notebook) each finished run's controller dies during the next one's start-up (once in
    a test run, the driver got no actor update from Ray after such a death: docs/labels.md)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, and it cannot be put back from here
            signal.signal(signal.SIGINT, previous)


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1]}" if text else type(error).__name__


def run(cfg) -> dict:
    """Train ``cfg`` (an AlignConfig or InstructConfig) on Ray Train; returns a summary."""
    from sea_ray.train.checkpoint import latest_complete, prune
    from sea_ray.train.loop import accumulation_steps, total_steps, train_loop

    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    uri = run_uri(cfg)
    config = loop_config(cfg, uri)
    num_rows = config["source"].num_rows
    steps = total_steps(cfg, num_rows)
    shapes = ", ".join(f"{w} workers x {cfg.batch.per_worker} x {accumulation_steps(cfg, w)} accumulation"
                       for w in cfg.scaling.world_sizes)
    log.info("%s: %d samples, %d steps of %d (%s) -> %s", cfg.job, num_rows, steps, cfg.batch.global_size, shapes, uri)
    storage.makedirs(uri)
    storage.write_text(storage.join(uri, "config.json"), json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    trainer = make_trainer(cfg, train_loop, config, callbacks=[_progress_callback(steps, cfg.job, sys.stdout.isatty())])
    result = fit(trainer, f"{cfg.job} ({uri})")
    for deleted in prune(uri, cfg.checkpoint.num_to_keep):  # what an interrupted run left behind
        log.info("deleted %s (checkpoint.num_to_keep %d)", deleted, cfg.checkpoint.num_to_keep)
    summary = {"job": cfg.job, "run": uri, "steps": steps, "checkpoint": latest_complete(uri),
               "metrics": result.metrics or {}, "workers": placement.starts(uri)}
    validated = {int(m["val_step"]): {k: v for k, v in m.items() if k.startswith("val_") and k != "val_step"}
                 for _, m in (result.best_checkpoints or []) if "val_step" in m}
    if validated:  # Ray's validation tasks attached these to their checkpoints
        summary["validation"] = dict(sorted(validated.items()))
    return summary
