"""Experiment trackers: where a stage's rank 0 logs its metrics (``tracking.backends``).

:func:`start` gives the stage recipe one :class:`Tracker`, composed of the enabled backends
(:data:`BACKENDS`: TensorBoard, MLflow, Weights & Biases), and an empty one on the other ranks.
The recipe calls ``log(metrics, step, prefix)`` at every logging step (``train/<name>``), ``flush()``
at every checkpoint and closes it when the stage ends, failed or not (it is a context manager).

- **TensorBoard**: event files in ``<run>/tensorboard``; with an object-storage run folder they are
  written locally and copied up at every checkpoint and at the end.
- **MLflow** (the client API, no process-wide active run): one run per run folder, named
  ``run.name``, in the experiment ``tracking.mlflow.experiment``; its params are the resolved
  config (dotted keys). The run id is kept in ``<run>/tracking.json``, so a resumed stage logs
  into the same MLflow run.
- **W&B**: ``wandb.init`` with a stable id kept in ``<run>/tracking.json`` and ``resume="allow"``,
  the resolved config as its config.

mlflow and wandb are the optional ``tracking`` extra; :func:`problems` (the pre-flight check of
align and instruct) refuses a config naming one that is not installed. Their credentials
(``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``, ...) come from the environment only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import urllib.parse
from typing import Optional

from sea_ray import storage

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -c constraints.txt -e '.[tracking]'"
STATE_FILE = "tracking.json"  # in the run folder: the MLflow run id and the W&B id of this run
MODULES = {"mlflow": "mlflow", "wandb": "wandb"}  # the optional backends: backend -> module it imports


def _train_config(cfg):
    """The training config of ``cfg`` (align, instruct, or tune's ``base``), or None."""
    return cfg if hasattr(cfg, "tracking") else getattr(cfg, "base", None)


def mlflow_tracking_uri(cfg) -> Optional[str]:
    """``tracking.mlflow.tracking_uri``; none: ``MLFLOW_TRACKING_URI``, else a SQLite store beside the
    runs of a local ``run.storage`` (None for object storage: nothing to default to)."""
    uri = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri or storage.is_remote(cfg.run.storage):
        return uri
    return "sqlite:///" + os.path.join(storage.local_copy(cfg.run.storage), "mlflow.db")


def problems(cfg) -> list[str]:
    """Pre-flight: every enabled backend is installed and, for MLflow, has a place to log to."""
    train = _train_config(cfg)
    if train is None:
        return []
    key = "tracking" if train is cfg else "base.tracking"
    found = []
    for backend in dict.fromkeys(train.tracking.backends):
        if backend in MODULES and importlib.util.find_spec(MODULES[backend]) is None:
            found.append(f"{key}.backends: {backend} is not installed; install the tracking extra: {INSTALL_HINT}")
    if "mlflow" in train.tracking.backends and mlflow_tracking_uri(train) is None:
        found.append(f"{key}.mlflow.tracking_uri: run.storage {train.run.storage} is object storage and "
                     "MLFLOW_TRACKING_URI is not set: give MLflow a tracking server (http(s)://...) or a store")
    return found


def _shown(uri: str) -> str:
    """``uri`` as logged: without a password written into it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


@contextlib.contextmanager
def _sqlite_lock(uri: str):
    """An exclusive lock beside a local SQLite store (``sqlite:///PATH``) while it is opened (and, the
    first time, created); nothing for other stores."""
    import fcntl

    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if not path:
        yield
        return
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _import(backend: str):
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as exc:
        raise ImportError(f"tracking.backends names {backend}, which is not installed here; install the "
                          f"tracking extra: {INSTALL_HINT}") from exc


# --------------------------------------------------------------------------- backends


class TensorBoard:
    """Event files in ``<run>/tensorboard``; for an object-storage run folder they are written to a
    local folder and copied into the run folder at every :meth:`flush` (the files so far, which keep
    growing) and at :meth:`close`."""

    def __init__(self, cfg, run_uri: str, state: Optional[dict] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_uri = run_uri
        self._local = tempfile.mkdtemp(prefix="sea-tb-") if storage.is_remote(run_uri) else None
        self.writer = SummaryWriter(self._local or os.path.join(storage.local_copy(run_uri), "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self._local:
            fs, path = storage.fsspec_fs(self.run_uri)
            fs.put(self._local.rstrip("/") + "/", f"{path}/tensorboard/", recursive=True)

    def close(self, failed: bool = False) -> None:
        self.writer.close()
        if self._local:
            self.flush()
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


class MLflow:
    """One MLflow run per run folder (its id in ``tracking.json``), through an ``MlflowClient``."""

    def __init__(self, cfg, run_uri: str, state: dict):
        _import("mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from sea_ray.config.loading import flatten_dotted, to_dict

        uri = mlflow_tracking_uri(cfg)
        with _sqlite_lock(uri):  # parallel stages (tune trials) creating one SQLite store
            self.client = MlflowClient(tracking_uri=uri)
        params = {key: str(value) for key, value in flatten_dotted(to_dict(cfg)).items()}
        run = None
        if state.get("mlflow"):
            try:
                run = self.client.get_run(state["mlflow"]["run_id"])
            except MlflowException:
                log.warning("MLflow run %s of %s is not in %s: starting a new one", state["mlflow"]["run_id"],
                            run_uri, _shown(uri))
        if run is None:
            experiment_id = self._experiment(cfg.tracking.mlflow.experiment or cfg.job)
            run = self.client.create_run(experiment_id, run_name=cfg.run.name,
                                         tags={"sea_ray.job": cfg.job, "sea_ray.run": run_uri})
            state["mlflow"] = {"run_id": run.info.run_id}
            logged = {}
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged = run.data.params
            changed = sorted(k for k in params if k in logged and logged[k] != params[k])
            if changed:  # MLflow params cannot change: the run keeps the first values
                log.warning("MLflow run %s keeps its first params; changed since: %s", run.info.run_id,
                            ", ".join(f"{k} {logged[k]} -> {params[k]}" for k in changed[:10]))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])
        log.info("MLflow: run %s (%s) at %s", self.run_id, cfg.run.name, _shown(uri))

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another stage created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def flush(self) -> None:
        pass  # every log_batch is written at once

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandB:
    """A W&B run with a stable id (kept in ``tracking.json``) that a resumed stage continues."""

    def __init__(self, cfg, run_uri: str, state: dict):
        from sea_ray.config.loading import to_dict

        wandb = _import("wandb")
        section = cfg.tracking.wandb
        run_id = state.setdefault("wandb", {}).setdefault("id", secrets.token_hex(8))
        directory = section.dir or os.environ.get("WANDB_DIR")
        if directory is None and not storage.is_remote(run_uri):
            directory = storage.local_copy(run_uri)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=section.project, entity=section.entity, name=cfg.run.name, id=run_id,
                              resume="allow", mode=section.mode, dir=directory, job_type=cfg.job,
                              config=to_dict(cfg), allow_val_change=True, reinit="create_new")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        pass  # W&B's own process writes and uploads as it goes

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """The enabled backends as one: ``log``, ``flush`` (at checkpoints), ``close``. Closes itself
    when used as a context manager (a stage that raised is closed as failed)."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, metrics: dict, step: int, prefix: str = "train") -> None:
        """``metrics`` under ``<prefix>/<name>`` at ``step``, to every backend."""
        named = {f"{prefix}/{key}": value for key, value in metrics.items()}
        for backend in self.backends:
            backend.log(named, step)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self, failed: bool = False) -> None:
        """Close every backend; the first error is raised after all were closed, unless the stage
        failed already (then it is logged: the stage's own error is the one to see)."""
        errors = []
        for backend in self.backends:
            try:
                backend.close(failed)
            except Exception as exc:
                log.error("closing the %s tracker failed: %s", type(backend).__name__, exc, exc_info=failed)
                errors.append(exc)
        self.backends = []
        if errors and not failed:
            raise errors[0]

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def _read_state(run_uri: str) -> dict:
    path = storage.join(run_uri, STATE_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def start(cfg, run_uri: str, rank: int = 0) -> Tracker:
    """The run's tracker: on rank 0 every backend of ``cfg.tracking.backends`` (in that order), on
    the other ranks none. The ids a resumed stage needs are kept in ``<run>/tracking.json``."""
    if rank != 0:
        return Tracker([])
    state = _read_state(run_uri)
    before = json.dumps(state, sort_keys=True)
    started = []
    try:
        for name in dict.fromkeys(cfg.tracking.backends):
            started.append(BACKENDS[name](cfg, run_uri, state))
    except BaseException:
        Tracker(started).close(failed=True)
        raise
    if json.dumps(state, sort_keys=True) != before:
        storage.write_text(storage.join(run_uri, STATE_FILE), json.dumps(state, indent=2, sort_keys=True))
    return Tracker(started)
