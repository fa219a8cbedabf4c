"""One trial of a search: a function trainable that trains the align recipe with the trial's
parameters and reports the held-out metric every ``report_every_n_steps`` steps.

Two ways to run it (``trial_mode``):

- ``in_process``: the trial trains in its own Tune actor with :func:`run_stage` and
  :class:`LocalIO` (one process; the global batch comes from gradient accumulation), on rows
  pre-materialised once by the driver and shared through the object store. For small machines.
- ``ray_train``: the trial is the driver of a multi-worker Ray Train run (a ``TorchTrainer``
  built and fitted per trial); workers report through ``TuneReportCallback``. The controller may
  fail once (``controller_failure_limit=1``) and a worker group that cannot start fails after
  ``worker_group_start_timeout_s``, so a stopped or broken trial fails instead of hanging. For
  clusters (the dashboard must be on).

Each trial owns the folder ``<experiment>/trials/<trial_id>/`` (local or ``s3://``)::

    step_00000020/ ...   its checkpoints (complete or invisible; a retried trial resumes there)
    params.json          its sampled parameters
    executions.json      one entry per time it started training (retries, resumes)
    history.json         every reported result, by step
    _DONE                its last result; a finished trial that is started again only re-reports
                         its history (a resumed search never retrains it)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

from sea_ray import storage

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
DONE, HISTORY, EXECUTIONS, PARAMS = "_DONE", "history.json", "executions.json", "params.json"


class TrialFolder:
    """The files of one trial (see the module docstring)."""

    def __init__(self, uri: str):
        self.uri = uri

    def _read_json(self, name: str, default):
        path = storage.join(self.uri, name)
        return json.loads(storage.read_text(path)) if storage.exists(path) else default

    def _write_json(self, name: str, value) -> None:
        storage.write_text(storage.join(self.uri, name), json.dumps(value, indent=1, sort_keys=True, default=float))

    def done(self) -> bool:
        return storage.exists(storage.join(self.uri, DONE))

    def history(self) -> list[dict]:
        return self._read_json(HISTORY, [])

    def executions(self) -> list[dict]:
        return self._read_json(EXECUTIONS, [])

    def params(self) -> dict:
        return self._read_json(PARAMS, {})

    def begin(self, params: dict, mode: str) -> None:
        from sea_ray.train.checkpoint import latest_complete

        storage.makedirs(self.uri)
        self._write_json(PARAMS, params)
        latest = latest_complete(self.uri)
        entry = {"started": time.time(), "mode": mode, "host": socket.gethostname(), "pid": os.getpid(),
                 "resumed_from": latest.rstrip("/").split("/")[-1] if latest else None}
        self._write_json(EXECUTIONS, self.executions() + [entry])

    def record(self, metrics: dict, total_steps: int) -> dict:
        """Add a reported result (keyed by step: a resumed trial overwrites what it redoes). The
        last step's result also marks the trial done: its last checkpoint is already saved, and
        ASHA stops a trial as soon as it reports its last step (``max_t``), so nothing after
        that report is sure to run."""
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        result.setdefault("timestamp", time.time())
        by_step = {int(r["step"]): r for r in self.history()}
        by_step[int(result["step"])] = result
        self._write_json(HISTORY, [by_step[s] for s in sorted(by_step)])
        if int(result["step"]) >= total_steps:
            self._write_json(DONE, result)
        return result


def _replay(folder: TrialFolder) -> None:
    """Report a finished trial's history again without training (a trial that Tune restarts
    after a resume, when its last state snapshot predates its end)."""
    from ray import tune

    log.info("trial %s already finished: re-reporting its history", folder.uri)
    for result in folder.history():
        tune.report(dict(result, replayed=True))


def _start_trial(config: dict, setup: dict, mode: str):
    """(tune config, trial config, trial folder) of the trial Tune is running, its start recorded;
    None for a trial that had already finished (its history is re-reported instead)."""
    from ray import tune

    from sea_ray.tune.space import params_of, trial_config

    logging.basicConfig(level=logging.INFO)
    cfg = setup["tune"]
    trial_id = tune.get_context().get_trial_id()
    params = params_of(cfg, config)
    folder = TrialFolder(storage.join(setup["trials_root"], trial_id))
    if folder.done():
        _replay(folder)
        return None
    folder.begin(params, mode)
    return cfg, trial_config(cfg, params, setup["trials_root"], trial_id), folder


def in_process_trial(config: dict, *, setup: dict, train_rows: dict, val_rows: dict) -> None:
    """Tune function trainable: train one trial in this process."""
    import torch
    from ray import tune

    from sea_ray.train.loop import LocalIO, run_stage, total_steps
    from sea_ray.train.validation import Evaluator

    started = _start_trial(config, setup, "in_process")
    if started is None:
        return
    cfg, trial_cfg, folder = started
    torch.set_num_threads(max(1, int(round(cfg.trial_cpus))))
    device = "cuda" if trial_cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    evaluate = Evaluator(val_rows, setup["val_labels"], trial_cfg, **setup["eval"])
    steps = total_steps(trial_cfg, setup["num_train"])
    reported = []

    def on_report(metrics: dict) -> None:
        result = folder.record(metrics, steps)
        reported.append(result["step"])
        tune.report(result)

    io = LocalIO(folder.uri, train_rows, setup["num_train"], on_report, device)
    run_stage(trial_cfg, io, evaluate)
    if not reported:  # it had already reached its last checkpoint
        _replay(folder)


def ray_train_worker(loop_config: dict) -> None:
    """Ray Train worker entry point of a ``ray_train`` trial: the align recipe plus the held-out
    metric, evaluated on rank 0 (the rank whose metrics reach Tune)."""
    import ray

    from sea_ray.train.loop import io_of, parse_config, run_stage
    from sea_ray.train.validation import Evaluator

    logging.basicConfig(level=logging.INFO)
    cfg = parse_config(loop_config["cfg"])
    io = io_of(cfg, loop_config)
    evaluate = None
    if io.world_rank == 0:
        evaluate = Evaluator(ray.get(loop_config["val_rows"]), loop_config["val_labels"], cfg, **loop_config["eval"])
    run_stage(cfg, io, evaluate)


def ray_train_trial(config: dict, *, setup: dict, val_rows: dict) -> None:
    """Tune function trainable: build and fit a TorchTrainer for one trial."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from sea_ray.train.driver import loop_config, make_trainer, on_report_callback
    from sea_ray.train.loop import total_steps

    started = _start_trial(config, setup, "ray_train")
    if started is None:
        return
    cfg, trial_cfg, folder = started
    # read by the Train controller this trial starts (Ray Train propagates it from the driver)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.worker_group_start_timeout_s)
    worker_config = loop_config(trial_cfg, folder.uri, setup["held_out_ids"])
    before = len(folder.history())
    steps = total_steps(trial_cfg, worker_config["source"].num_rows)
    trainer = make_trainer(
        trial_cfg, ray_train_worker,
        dict(worker_config, val_rows=ray.put(val_rows), val_labels=setup["val_labels"], eval=setup["eval"],
             validate=False),  # a trial's own held-out metric (Evaluator) is its validation
        # history.json is kept by the Train controller; Tune gets the same reports
        callbacks=[on_report_callback(lambda metrics: TrialFolder(folder.uri).record(metrics, steps)),
                   TuneReportCallback()],
        controller_failure_limit=1)
    trainer.fit()
    if len(folder.history()) == before and before:  # it had already reached its last checkpoint
        _replay(folder)


def trial_folder(trials_root: str, trial_id: str) -> TrialFolder:
    return TrialFolder(storage.join(trials_root, trial_id))


def latest_checkpoint(folder: TrialFolder) -> Optional[str]:
    from sea_ray.train.checkpoint import latest_complete

    return latest_complete(folder.uri)
