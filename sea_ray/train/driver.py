"""The Ray Train driver of both stages: validated config -> TorchTrainer -> fit -> summary.

The run folder is ``<run.storage>/<run.name>`` (local or ``s3://``); names carry no timestamp,
so running the same config again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

from sea_ray import paths, storage
from sea_ray.checks import tower_image_size
from sea_ray.config.loading import to_dict
from sea_ray.paths import absolute_paths
from sea_ray.runtime import init_ray

log = logging.getLogger(__name__)


def run_uri(cfg) -> str:
    return storage.join(paths.absolute(cfg.run.storage), cfg.run.name)


def _progress_callback(total: int, desc: str):
    from ray.train import UserCallback

    class Progress(UserCallback):
        """A progress bar on the driver (tqdm_ray renders bars from the controller actor)."""

        def __init__(self):
            self.bar = None
            self.done = 0

        def after_report(self, run_context, metrics, checkpoint):
            from ray.experimental.tqdm_ray import tqdm

            if self.bar is None:
                self.bar = tqdm(total=total, desc=desc)
            step = int(metrics[0].get("step", self.done)) if metrics else self.done
            self.bar.update(max(0, step - self.done))
            self.done = step
            shown = {k: round(v, 4) for k, v in (metrics[0] if metrics else {}).items()
                     if k in ("loss_lm", "loss_sea", "temperature", "samples_per_s")}
            log.info("step %d/%d %s", step, total, shown)

    return Progress()


def make_trainer(cfg, worker_fn, loop_config: dict, callbacks: list,
                 controller_failure_limit: Optional[int] = None):
    """A ``TorchTrainer`` running ``worker_fn(loop_config)`` with ``cfg``'s scaling, run storage,
    failure and checkpoint settings. Each worker reads its own rows (:mod:`sea_ray.train.feed`;
    the source travels in ``loop_config``), so the trainer is given no dataset.
    ``controller_failure_limit``: how often the controller itself may fail before the run does
    (a tune trial sets 1, so it fails instead of hanging)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    fs, path = storage.pyarrow_fs(cfg.run.storage)
    failure = {"max_failures": cfg.max_failures}
    if controller_failure_limit is not None:
        failure["controller_failure_limit"] = controller_failure_limit
    return TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(**failure),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                             callbacks=callbacks),
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
            "preprocess": preprocess_kwargs(cfg, image_size)}


def run(cfg) -> dict:
    """Train ``cfg`` (an AlignConfig or InstructConfig) on Ray Train; returns a summary."""
    from sea_ray.train.checkpoint import latest_complete
    from sea_ray.train.loop import accumulation_steps, total_steps, train_loop

    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    uri = run_uri(cfg)
    config = loop_config(cfg, uri)
    num_rows = config["source"].num_rows
    steps = total_steps(cfg, num_rows)
    accum = accumulation_steps(cfg, cfg.scaling.num_workers)
    log.info("%s: %d samples, %d steps of %d (%d workers x %d x %d accumulation) -> %s", cfg.job, num_rows, steps,
             cfg.batch.global_size, cfg.scaling.num_workers, cfg.batch.per_worker, accum, uri)
    storage.makedirs(uri)
    storage.write_text(storage.join(uri, "config.json"), json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    trainer = make_trainer(cfg, train_loop, config, callbacks=[_progress_callback(steps, cfg.job)])
    result = trainer.fit()
    return {"job": cfg.job, "run": uri, "steps": steps, "checkpoint": latest_complete(uri),
            "metrics": result.metrics or {}}
