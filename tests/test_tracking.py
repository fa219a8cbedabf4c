"""Experiment trackers (``tracking.backends``): short in-process align stages (no Ray) logging to
TensorBoard and MLflow (a local file store) or to W&B offline; a resumed stage logs into the same
MLflow run and W&B id; pre-flight refuses a tracker that is not installed, naming the extra; the
trackers' settings reach a cluster, a tracking URL's password never does."""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
from pathlib import Path

import pytest

from sea_ray import jobs, runtime, storage, submit
from sea_ray.config.loading import validate
from sea_ray.errors import ConfigError
from sea_ray.train import tracking

STEPS = 2


@pytest.fixture(scope="module")
def manifest(world_dir, tmp_path_factory):
    """Eight captioned world images: two optimizer steps of four."""
    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())[:8]
    path = tmp_path_factory.mktemp("manifest") / "pretrain.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def rows(manifest, world_dir):
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize

    cfg = _cfg(manifest, world_dir, "unused", ["tensorboard"])
    return materialize(source_of(cfg, shared=False), preprocess_kwargs(cfg, 64), in_process=True)


def _raw(manifest, world_dir, storage_dir, backends, steps=STEPS, **tracking_sections):
    return {"job": "align", "model": {"preset": "tiny-openclip-llama"}, "sea": {"enabled": False},
            "data": {"manifest": str(manifest), "image_root": f"{world_dir}/images", "max_length": 48},
            "run": {"name": "tracked", "storage": str(storage_dir)}, "batch": {"global_size": 4, "per_worker": 4},
            "optim": {"max_steps": steps}, "checkpoint": {"every_n_steps": 2}, "log_every_n_steps": 1,
            "tracking": {"backends": backends, **tracking_sections}}


def _cfg(*args, **kwargs):
    return validate(_raw(*args, **kwargs))


def _train(cfg, rows) -> str:
    from sea_ray.train.feed import num_rows
    from sea_ray.train.loop import LocalIO, run_stage

    uri = storage.join(cfg.run.storage, cfg.run.name)
    run_stage(cfg, LocalIO(uri, rows, num_rows(rows)))
    return uri


def _state(run: str) -> dict:
    return json.loads((Path(run) / tracking.STATE_FILE).read_text())


# --------------------------------------------------------------------------- MLflow


@pytest.mark.tracking
def test_mlflow_holds_the_metrics_by_step_and_the_config_and_a_resumed_stage_continues_its_run(
        manifest, world_dir, rows, tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses its file store without it
    store = f"file://{tmp_path}/mlruns"
    mlflow = {"tracking_uri": store, "experiment": "sea-test"}
    run = _train(_cfg(manifest, world_dir, tmp_path / "runs", ["tensorboard", "mlflow"], mlflow=mlflow), rows)

    client = MlflowClient(tracking_uri=store)
    run_id = _state(run)["mlflow"]["run_id"]
    first = client.get_run(run_id)
    assert first.info.run_name == "tracked" and first.info.status == "FINISHED"
    assert client.get_experiment(first.info.experiment_id).name == "sea-test"
    loss = client.get_metric_history(run_id, "train/loss_lm")
    assert [m.step for m in loss] == [1, 2] and all(m.value > 0 for m in loss)
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [1, 2]
    params = first.data.params
    assert params["run.name"] == "tracked" and params["optim.max_steps"] == "2" and params["job"] == "align"
    assert params["tracking.backends"] == "['tensorboard', 'mlflow']"
    assert any(p.name.startswith("events.out.tfevents.") for p in (Path(run) / "tensorboard").iterdir())

    caplog.set_level(logging.WARNING, logger="sea_ray.train.tracking")
    resumed = _cfg(manifest, world_dir, tmp_path / "runs", ["tensorboard", "mlflow"], steps=4, mlflow=mlflow)
    assert _train(resumed, rows) == run
    assert _state(run)["mlflow"]["run_id"] == run_id
    assert len(client.search_runs([first.info.experiment_id])) == 1  # the same run, not a second one
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_lm")] == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["optim.max_steps"] == "2"  # MLflow params never change ...
    assert "optim.max_steps 2 -> 4" in caplog.text  # ... and the change is said


@pytest.mark.tracking
def test_a_failed_stage_ends_its_mlflow_run_as_failed(manifest, world_dir, rows, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    from mlflow.tracking import MlflowClient

    from sea_ray.train import loop

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path}/mlruns"
    cfg = _cfg(manifest, world_dir, tmp_path / "runs", ["mlflow"], mlflow={"tracking_uri": store})

    def broken(st, metrics, sync=False):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loop, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _train(cfg, rows)
    run = MlflowClient(tracking_uri=store).get_run(_state(str(tmp_path / "runs" / "tracked"))["mlflow"]["run_id"])
    assert run.info.status == "FAILED"
    assert MlflowClient(tracking_uri=store).get_experiment(run.info.experiment_id).name == "align"  # the job


# --------------------------------------------------------------------------- W&B


def _wandb_records(path: Path):
    """The records of an offline W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf
    ``Record``s in 32 KiB blocks, after a 7-byte ``:W&B`` header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_offline_run(folder: Path) -> tuple[dict, dict]:
    """(the run record's id, name and config keys, {step: history row}) of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    run, history = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"id": record.run.run_id, "name": record.run.display_name, "job_type": record.run.job_type,
                   "config": {u.key for u in record.run.config.update}}
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
    return run, history


@pytest.mark.tracking
def test_wandb_offline_writes_the_metrics_and_a_resumed_stage_keeps_the_id(manifest, world_dir, rows, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("wandb", reason="the tracking extra is not installed")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = {"mode": "offline", "project": "sea-test"}
    run = _train(_cfg(manifest, world_dir, tmp_path / "runs", ["wandb"], wandb=wandb), rows)
    _train(_cfg(manifest, world_dir, tmp_path / "runs", ["wandb"], steps=3, wandb=wandb), rows)

    wandb_id = _state(run)["wandb"]["id"]
    first, second = sorted((tmp_path / "wandb-home" / "wandb").glob("offline-run-*"))  # WANDB_DIR, not the run
    # offline-run-<date>_<time>-<id>; W&B appends -1 when both stages start in the same second
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{wandb_id}(-\d+)?", d.name) for d in (first, second))
    meta, history = _wandb_offline_run(first)
    assert meta["id"] == wandb_id and meta["name"] == "tracked" and meta["job_type"] == "align"
    assert {"optim", "run", "tracking"} <= meta["config"]
    assert sorted(history) == [1, 2] and all(history[s]["train/loss_lm"] > 0 for s in history)
    assert sorted(_wandb_offline_run(second)[1]) == [3]  # the resumed stage: its one step


# --------------------------------------------------------------------------- the tracker itself


def test_the_prefix_names_the_metrics_and_only_rank_0_tracks(manifest, world_dir, tmp_path):
    class Backend:
        def __init__(self):
            self.logged, self.closed = [], None

        def log(self, metrics, step):
            self.logged.append((metrics, step))

        def flush(self):
            pass

        def close(self, failed=False):
            self.closed = failed

    backend = Backend()
    with pytest.raises(KeyError):
        with tracking.Tracker([backend]) as tracker:
            tracker.log({"loss_lm": 2.5}, 3)
            tracker.log({"lm_loss": 2.0}, 3, prefix="val")
            raise KeyError("a failing stage")
    assert backend.logged == [({"train/loss_lm": 2.5}, 3), ({"val/lm_loss": 2.0}, 3)] and backend.closed is True

    class Unclosable(Backend):
        def close(self, failed=False):
            super().close(failed)
            raise OSError("bucket gone")

    others = [Unclosable(), Backend()]
    with pytest.raises(OSError, match="bucket gone"):  # a finished stage whose events are lost says so ...
        tracking.Tracker(others).close()
    assert others[1].closed is False  # ... after closing the others
    with pytest.raises(KeyError):  # a failed stage's own error is the one raised
        with tracking.Tracker([Unclosable()]):
            raise KeyError("a failing stage")

    cfg = _cfg(manifest, world_dir, tmp_path / "runs", ["tensorboard", "mlflow", "wandb"])
    assert tracking.start(cfg, str(tmp_path / "runs" / "tracked"), rank=1).backends == []
    assert not (tmp_path / "runs").exists()  # nothing written, nothing imported on the other ranks


# --------------------------------------------------------------------------- pre-flight


@pytest.mark.parametrize("backend", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused_before_ray_starts(backend, manifest, world_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # `import mlflow` fails, find_spec finds nothing
    cfg = _cfg(manifest, world_dir, tmp_path / "runs", ["tensorboard", backend])
    with pytest.raises(ConfigError) as err:
        jobs.check(cfg, inputs=False)
    assert err.value.problems == [f"tracking.backends: {backend} is not installed; install the tracking extra: "
                                  "pip install -c constraints.txt -e '.[tracking]'"]
    base = _raw(manifest, world_dir, tmp_path / "runs", [backend])
    base["data"]["val_manifest"] = str(manifest)
    tune = validate({"job": "tune", "base": base,
                     "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                     "metric": "loss_lm", "report_every_n_steps": 1, "validation": {"labels": str(tmp_path / "val")}})
    assert any(p.startswith(f"base.tracking.backends: {backend} is not installed")
               for p in jobs.problems(tune, inputs=False))
    jobs.check(_cfg(manifest, world_dir, tmp_path / "runs", ["tensorboard"]), inputs=False)  # the default: fine
    # a worker whose node lacks the package says the same, and leaves no tracker open
    with pytest.raises(ImportError, match=r"pip install -c constraints.txt -e '\.\[tracking\]'"):
        tracking.start(cfg, str(tmp_path / "runs" / "tracked"))


def test_mlflow_on_object_storage_needs_a_tracking_uri(manifest, world_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(manifest, world_dir, "s3://bucket/runs", ["mlflow"])
    assert [p for p in tracking.problems(cfg) if "tracking_uri" in p] == [
        "tracking.mlflow.tracking_uri: run.storage s3://bucket/runs is object storage and MLFLOW_TRACKING_URI is "
        "not set: give MLflow a tracking server (http(s)://...) or a store"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.mlflow_tracking_uri(cfg) == "http://127.0.0.1:5000"
    local = _cfg(manifest, world_dir, "runs", ["mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.mlflow_tracking_uri(local) == f"sqlite:///{Path('runs').resolve()}/mlflow.db"


# --------------------------------------------------------------------------- settings and credentials


def test_tracker_settings_reach_a_cluster_and_a_password_in_a_url_never_does(monkeypatch, caplog):
    for name in runtime.SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow.example.com")
    assert runtime.is_credential("WANDB_API_KEY") and runtime.is_credential("MLFLOW_TRACKING_PASSWORD")
    assert runtime.settings_env() == {"WANDB_MODE": "offline"}
    assert "MLFLOW_TRACKING_URI is a URL with a password" in caplog.text and "hunter2" not in caplog.text
    env, _ = submit.parse_env([])
    assert env == {"WANDB_MODE": "offline"}
    with pytest.raises(ConfigError, match="--env MLFLOW_TRACKING_URI: a credential"):
        submit.parse_env(["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    assert runtime.settings_env()["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert tracking._shown("https://alice:hunter2@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"


# --------------------------------------------------------------------------- validation on Ray Train


@pytest.mark.tracking
@pytest.mark.ray
@pytest.mark.slow
def test_an_align_run_with_a_val_manifest_logs_held_out_metrics_at_every_checkpoint_to_mlflow(
        ray_local, manifest, world_dir, tmp_path, monkeypatch):
    """On Ray Train: every checkpoint goes to Ray's validation task; rank 0 logs what it measured
    under val/ at the checkpoint's step, in MLflow as in TensorBoard."""
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    from mlflow.tracking import MlflowClient

    from sea_ray.train.driver import run

    store = f"sqlite:///{tmp_path}/mlflow.db"  # the Train workers' environment is the session Ray's
    raw = _raw(manifest, world_dir, tmp_path / "runs", ["tensorboard", "mlflow"], steps=4,
               mlflow={"tracking_uri": store, "experiment": "sea-val"})
    raw["data"]["val_manifest"] = f"{world_dir}/val/pretrain.json"
    raw.update(scaling={"num_workers": 1, "cpus_per_worker": 0.5}, validation={"max_rows": 4},
               checkpoint={"every_n_steps": 2, "num_to_keep": None})
    summary = run(validate(raw))
    assert sorted(summary["validation"]) == [2, 4]
    history = MlflowClient(tracking_uri=store).get_metric_history(_state(summary["run"])["mlflow"]["run_id"],
                                                                  "val/loss_lm")
    assert [(m.step, round(m.value, 5)) for m in history] == [
        (step, round(summary["validation"][step]["val_loss_lm"], 5)) for step in (2, 4)]
