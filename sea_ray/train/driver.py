"""The Ray Train driver of both stages: validated config -> TorchTrainer -> fit -> summary.

The run folder is ``<run.storage>/<run.name>`` (local or ``s3://``); names carry no timestamp,
so running the same config again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Optional

from sea_ray import storage
from sea_ray.config import to_dict

log = logging.getLogger(__name__)


def run_uri(cfg) -> str:
    base = cfg.run.storage if storage.is_remote(cfg.run.storage) else os.path.abspath(cfg.run.storage)
    return storage.join(base, cfg.run.name)


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


def _absolute(uri):
    return uri if uri is None or storage.is_remote(uri) else os.path.abspath(uri)


def absolute_paths(cfg):
    """Local paths made absolute: Ray Train workers run in their own working directory."""
    data = cfg.data.model_copy(update={k: _absolute(getattr(cfg.data, k))
                                       for k in ("manifest", "image_root", "labels", "val_manifest")})
    update = {"data": data, "run": cfg.run.model_copy(update={"storage": _absolute(cfg.run.storage)})}
    if getattr(cfg, "init_adapter", None):
        update["init_adapter"] = _absolute(cfg.init_adapter)
    model = cfg.model
    for section, key in (("vision", "weights"), ("vision", "name"), ("llm", "name_or_path"), ("llm", "tokenizer")):
        value = getattr(getattr(model, section), key)
        if value and value not in ("custom", "world") and not storage.is_remote(value) and os.path.exists(value):
            # local dirs and files become absolute; hub ids and names stay as they are
            model = model.model_copy(update={section: getattr(model, section).model_copy(
                update={key: os.path.abspath(value)})})
    update["model"] = model
    return cfg.model_copy(update=update)


def make_trainer(cfg, worker_fn, loop_config: dict, dataset, callbacks: list,
                 controller_failure_limit: Optional[int] = None):
    """A ``TorchTrainer`` running ``worker_fn(loop_config)`` with ``cfg``'s scaling, run storage,
    failure and checkpoint settings, fed ``dataset`` in order (the same samples in the same
    place on every run: exact resume). ``controller_failure_limit``: how often the controller
    itself may fail before the run does (a tune trial sets 1, so it fails instead of hanging)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    fs, path = storage.pyarrow_fs(cfg.run.storage)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
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
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def on_report_callback(fn: Callable[[dict], None]):
    """A Ray Train callback calling ``fn(rank 0's metrics)`` on the controller after each report."""
    from ray.train import UserCallback

    class OnReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                fn(dict(metrics[0]))

    return OnReport()


def run(cfg) -> dict:
    """Train ``cfg`` (an AlignConfig or InstructConfig) on Ray Train; returns a summary."""
    from sea_ray.checks import tower_image_size
    from sea_ray.runtime import init_ray
    from sea_ray.train.data import build_dataset
    from sea_ray.train.loop import accumulation_steps, total_steps, train_loop

    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    (image_size, _), _ = tower_image_size(cfg.model.vision)
    dataset, num_rows = build_dataset(cfg, image_size, cfg.data.preprocess_actors, cfg.data.preprocess_cpus)
    steps = total_steps(cfg, num_rows)
    accum = accumulation_steps(cfg, cfg.scaling.num_workers)
    uri = run_uri(cfg)
    log.info("%s: %d samples, %d steps of %d (%d workers x %d x %d accumulation) -> %s", cfg.job, num_rows, steps,
             cfg.batch.global_size, cfg.scaling.num_workers, cfg.batch.per_worker, accum, uri)
    storage.makedirs(uri)
    storage.write_text(storage.join(uri, "config.json"), json.dumps(to_dict(cfg), indent=2, sort_keys=True))

    trainer = make_trainer(cfg, train_loop, {"cfg": to_dict(cfg), "run_uri": uri, "num_rows": num_rows}, dataset,
                           callbacks=[_progress_callback(steps, cfg.job)])
    result = trainer.fit()
    from sea_ray.train.checkpoint import latest_complete

    return {"job": cfg.job, "run": uri, "steps": steps, "checkpoint": latest_complete(uri),
            "metrics": result.metrics or {}}
