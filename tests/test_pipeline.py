"""`sea-ray pipeline`: planning and validation of every step, the wiring of outputs to inputs,
skipping complete steps, the records, the output lock (local disk and S3).

The job runners are replaced by fakes that write what the real jobs write (markers, metadata, a
complete final checkpoint), so these tests need no Ray and take seconds. The real runners run
end to end in tests/test_submit_cluster.py (the tiny pipeline submitted to a `ray start`
cluster, reading and writing a bucket)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sea_ray import cli, jobs, pipeline, storage
from sea_ray.config.loading import load_config, validate
from sea_ray.errors import ConfigError
from sea_ray.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflows" / "configs"
PIPELINES = sorted(CONFIGS.glob("*_pipeline.yaml"))
CALLS: list[tuple[str, dict]] = []


# --------------------------------------------------------------------------- fake runners


def _fake_labels(cfg):
    CALLS.append(("labels", cfg.model_dump(mode="json")))
    storage.write_text(storage.join(cfg.output, "_meta.json"), json.dumps({"grid": [8, 8], "top_n": 10}))
    storage.write_text(storage.join(cfg.output, storage.MARKER), "")
    return {"output": cfg.output}


def _fake_train(cfg):
    import torch

    from sea_ray.train.driver import run_uri

    CALLS.append((cfg.job, cfg.model_dump(mode="json")))
    uri = run_uri(cfg)
    steps = cfg.optim.max_steps
    local = storage.local_copy(uri) if not storage.is_remote(uri) else None
    assert local is not None, "the fake trainer writes local checkpoints only"
    ckpt.write_checkpoint(os.path.join(local, ckpt.step_dir_name(steps)), {"w": torch.zeros(1)}, None,
                          {"step": steps}, cfg.model_dump(mode="json"), cfg.job)
    return {"run": uri}


def _fake_eval(cfg):
    CALLS.append(("eval", cfg.model_dump(mode="json")))
    storage.write_text(storage.join(cfg.output, pipeline.EVAL_REPORT), "{}")
    return {"output": cfg.output}


def _fake_tune(cfg):
    CALLS.append(("tune", cfg.model_dump(mode="json")))
    exp = storage.join(os.path.abspath(cfg.base.run.storage), cfg.base.run.name)
    storage.write_text(storage.join(exp, pipeline.TUNE_SUMMARY),
                       json.dumps({"best_params": {"sea.weight": 0.5, "optim.lr": 0.002,
                                                   "model.adapter.type": "mlp3x_gelu",
                                                   "model.adapter.hidden_size": 24}}))
    return {"experiment": exp}


FAKES = {"labels": _fake_labels, "align": _fake_train, "instruct": _fake_train, "eval": _fake_eval,
         "tune": _fake_tune}


@pytest.fixture
def fake_runners(monkeypatch):
    """Every config step runs a fake (also eval and tune, whether or not their runners exist yet)."""
    CALLS.clear()
    table = dict(jobs.JOBS)
    for verb, fn in FAKES.items():
        table[verb] = dataclasses.replace(table[verb], run=fn)
    monkeypatch.setattr(jobs, "JOBS", table)
    monkeypatch.setattr("sea_ray.runtime.init_ray", lambda *a, **k: None)  # the fakes need no Ray
    return CALLS


def _write(tmp_path: Path, raw: dict, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _raw(world, output, steps=("labels", "align", "instruct"), **sections) -> dict:
    small = {"optim": {"max_steps": 2}, "checkpoint": {"every_n_steps": 2}}
    raw = {"job": "pipeline", "output": str(output), "steps": list(steps), "data": {"world": str(world)},
           "labels": {"recipe": str(CONFIGS / "tiny_labels.yaml")},
           "align": {"recipe": str(CONFIGS / "tiny_align.yaml"), "set": copy.deepcopy(small)},
           "instruct": {"recipe": str(CONFIGS / "tiny_instruct.yaml"), "set": copy.deepcopy(small)},
           "eval": {"recipe": str(CONFIGS / "tiny_eval.yaml")},
           "tune": {"recipe": str(CONFIGS / "tiny_tune.yaml")}}
    raw.update(sections)
    return raw


def _plan(tmp_path, raw, overrides=()):
    path = _write(tmp_path, raw)
    return pipeline.plan(load_config(path, list(overrides)), path)


# --------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipelines_plan_every_step(path):
    """Every shipped pipeline builds and validates each step's config from its recipes."""
    cfg = load_config(path)
    plan = pipeline.plan(cfg, path)
    assert [s.name for s in plan.steps] == cfg.steps
    assert {"labels", "align", "instruct"} <= set(cfg.steps)


def test_shipped_pipelines_exist():
    assert {p.name for p in PIPELINES} >= {"tiny_pipeline.yaml", "llava15_vicuna7b_pipeline.yaml",
                                           "llava15_gemma2b_pipeline.yaml"}


@pytest.mark.parametrize("llm", ["vicuna7b", "gemma2b"])
def test_llava15_pipelines_keep_the_paper_hyperparameters(llm):
    path = CONFIGS / f"llava15_{llm}_pipeline.yaml"
    plan = pipeline.plan(load_config(path), path)
    labels, align, instruct = (plan.step(s).cfg for s in ("labels", "align", "instruct"))
    assert labels.labeler.top_n == 10 and align.sea.top_n == 10 and align.sea.window == 2
    assert (align.optim.lr, align.batch.global_size) == (1e-3, 256)
    assert (instruct.optim.lr, instruct.batch.global_size) == (2e-5, 128)
    assert align.model.vision.name == "ViT-L-14-336" and align.model.llm.name_or_path == instruct.model.llm.name_or_path
    for uri in (labels.data.manifest, labels.data.image_root, align.data.manifest, instruct.data.manifest,
                instruct.data.image_root, align.run.storage, labels.output):
        assert uri.startswith("s3://"), uri
    # wiring: each step reads the previous step's output
    assert align.data.labels == labels.output
    assert instruct.init_adapter == plan.step("align").output
    assert align.data.manifest.endswith("blip_laion_cc_sbu_558k.json")
    assert instruct.data.manifest.endswith("llava_v1_5_mix665k.json")


# --------------------------------------------------------------------------- validation


def test_every_step_is_validated_and_all_problems_are_listed_at_once(tmp_path, world_dir, fake_runners):
    raw = _raw(world_dir, tmp_path / "out")
    raw["align"]["set"] = {"optim.lrr": 1}
    raw["eval"]["set"] = {"split": "nope"}
    raw["steps"] = ["labels", "align", "instruct", "eval"]
    raw["instruct"]["recipe"] = "nope.yaml"
    raw["instruct"]["set"] = {"batch": {"global_size": 7}}
    raw["labels"]["set"] = {"labeler.templates": ["no placeholder"]}
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, raw)
    text = "\n".join(info.value.problems)
    assert "align: optim.lrr: unknown key; did you mean 'optim.lr'?" in text
    assert "eval: split:" in text
    raw = _raw(world_dir, tmp_path / "out")
    raw["align"]["set"] = {"sea.window": 99}  # the checks that need the tower's architecture run too
    with pytest.raises(ConfigError, match="align: sea.window: 99 is larger than the 8 x 8 patch grid"):
        _plan(tmp_path, raw)
    assert "instruct.recipe: file not found" in text
    assert "instruct: batch.global_size: 7 is not divisible" in text
    assert "labels: labeler.templates" in text


def test_pipeline_level_rules(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate({"job": "pipeline", "output": "o", "steps": ["align", "labels", "evall"]})
    text = "\n".join(info.value.problems)
    assert "unknown step 'evall' (did you mean 'eval'?)" in text
    assert "must follow the order" in text
    assert "data.pretrain: required by the labels, align step(s)" in text
    with pytest.raises(ConfigError, match="output: required"):
        validate({"job": "pipeline", "data": {"world": "w"}})


def test_a_recipe_of_another_job_is_refused(tmp_path, world_dir):
    raw = _raw(world_dir, tmp_path / "out")
    raw["align"]["recipe"] = str(CONFIGS / "tiny_instruct.yaml")
    with pytest.raises(ConfigError, match="is a 'instruct' recipe, not 'align'"):
        _plan(tmp_path, raw)


def test_a_step_without_a_runner_is_refused_by_name(tmp_path, world_dir, monkeypatch):
    monkeypatch.setattr(jobs, "JOBS", {k: v for k, v in jobs.JOBS.items() if k != "instruct"})
    with pytest.raises(ConfigError, match="steps: instruct is not available in this installation"):
        _plan(tmp_path, _raw(world_dir, tmp_path / "out"))


def test_cli_exit_code_2_on_a_bad_step(tmp_path, world_dir, capsys):
    raw = _raw(world_dir, tmp_path / "out")
    raw["align"]["set"] = {"optim.lr": -1}
    path = _write(tmp_path, raw)
    assert cli.main(["pipeline", "--config", str(path), "--dry-run"]) == 2
    assert "align: optim.lr" in capsys.readouterr().err
    assert cli.main(["validate", "--config", str(path)]) == 2  # validate checks every step too
    assert "align: optim.lr" in capsys.readouterr().err


# --------------------------------------------------------------------------- wiring


def test_wiring_outputs_to_inputs_and_set_wins(tmp_path, world_dir, fake_runners):
    out = tmp_path / "out"
    raw = _raw(world_dir, out, steps=["labels", "align", "instruct", "eval"])
    raw["instruct"]["set"]["data"] = {"max_length": 99}
    raw["ray"] = {"num_cpus": 2}
    plan = _plan(tmp_path, raw, ["align.set.run.name=my-align"])
    labels, align, instruct, ev = (plan.step(s).cfg for s in ("labels", "align", "instruct", "eval"))
    assert labels.output == str(out / "labels")
    assert labels.data.manifest == str(world_dir / "train" / "pretrain.json")
    assert labels.data.image_root == align.data.image_root == instruct.data.image_root == str(world_dir / "images")
    assert align.data.labels == labels.output
    assert align.run.name == "my-align" and align.run.storage == str(out / "runs")
    assert plan.step("align").output == str(out / "runs" / "my-align")
    assert instruct.init_adapter == plan.step("align").output
    assert instruct.data.manifest == str(world_dir / "train" / "instruct.json") and instruct.data.max_length == 99
    assert ev.checkpoint == plan.step("instruct").output and ev.world == str(world_dir)
    assert ev.output == str(out / "eval") and ev.model == instruct.model and ev.vocab == labels.output
    assert all(c.ray.num_cpus == 2 for c in (labels, align, instruct, ev))


def test_tune_best_parameters_reach_align_and_what_follows(tmp_path, world_dir, fake_runners):
    raw = _raw(world_dir, tmp_path / "out", steps=["labels", "tune", "align", "instruct", "eval"])
    plan = _plan(tmp_path, raw)
    tune = plan.step("tune").cfg
    assert tune.base.data.labels == plan.step("labels").output
    assert tune.base.data.val_manifest == str(world_dir / "val" / "pretrain.json")
    assert tune.base.run.storage == str(tmp_path / "out" / "tune")
    assert plan.step("instruct").cfg.model.adapter == plan.step("align").cfg.model.adapter
    pipeline.run(plan)
    calls = dict(fake_runners)
    align = calls["align"]
    assert align["sea"]["weight"] == 0.5 and align["optim"]["lr"] == 0.002
    assert align["optim"]["max_steps"] == 2  # align's own `set` still applies
    # instruct loads the tuned adapter, so it builds the same shape; eval builds instruct's model
    tuned = {"type": "mlp3x_gelu", "hidden_size": 24}
    assert align["model"]["adapter"] == calls["instruct"]["model"]["adapter"] == tuned
    assert calls["eval"]["model"]["adapter"] == tuned


# --------------------------------------------------------------------------- running and skipping


def test_run_skips_complete_steps_and_records_itself(tmp_path, world_dir, fake_runners):
    out = tmp_path / "out"
    plan = _plan(tmp_path, _raw(world_dir, out, steps=["labels", "align", "instruct", "eval"]))
    first = pipeline.run(plan)
    assert [(s["step"], s["status"]) for s in first["steps"]] == [
        ("labels", "ran"), ("align", "ran"), ("instruct", "ran"), ("eval", "ran")]
    assert [verb for verb, _ in fake_runners] == ["labels", "align", "instruct", "eval"]
    records = json.loads((out / "_pipeline" / "plan.json").read_text())
    assert set(records["steps"]) == {"labels", "align", "instruct", "eval"}
    assert json.loads((out / "_pipeline" / "align.json").read_text())["output"] == str(out / "runs" / "tiny-align")
    assert not (out / "_pipeline" / "LOCK").exists()

    fake_runners.clear()
    second = pipeline.run(plan)
    assert [s["status"] for s in second["steps"]] == ["skipped"] * 4
    assert fake_runners == []
    assert second["steps"][0]["complete"] == str(out / "labels" / "_SUCCESS")
    assert second["steps"][2]["complete"] == str(out / "runs" / "tiny-instruct" / "step_00000002")

    # an incomplete final checkpoint and a forced step run again; the rest is skipped
    (out / "runs" / "tiny-instruct" / "step_00000002" / ckpt.COMPLETE).unlink()
    actions = {s["step"]: s["action"] for s in pipeline.describe(plan, force=("labels",))["steps"]}
    assert actions == {"labels": "run", "align": f"skip (complete: {out}/runs/tiny-align/step_00000002)",
                       "instruct": "run", "eval": f"skip (complete: {out}/eval/report.json)"}
    fake_runners.clear()
    third = pipeline.run(plan, force=("labels",))
    assert [verb for verb, _ in fake_runners] == ["labels", "instruct"]
    assert [s["status"] for s in third["steps"]] == ["ran", "skipped", "ran", "skipped"]


def test_a_checkpoint_before_the_final_step_is_not_complete(tmp_path, world_dir, fake_runners):
    out = tmp_path / "out"
    plan = _plan(tmp_path, _raw(world_dir, out, steps=["labels", "align"]))
    pipeline.run(plan)
    longer = _plan(tmp_path, _raw(world_dir, out, steps=["labels", "align"]), ["align.set.optim.max_steps=4"])
    assert pipeline.completed(longer.step("align")) is None
    assert pipeline.completed(plan.step("align")).endswith("step_00000002")


def test_world_and_import_steps(tmp_path, fake_runners):
    out = tmp_path / "out"
    raw = _raw("unused", out, steps=["world", "import", "labels"])
    del raw["data"]
    raw["world"] = {"num_images": 12, "image_size": 64}
    plan = _plan(tmp_path, raw)
    assert plan.step("world").output == str(out / "world")
    assert plan.step("labels").cfg.data.manifest == str(out / "manifests" / "pretrain")
    summary = pipeline.run(plan)
    assert [s["status"] for s in summary["steps"]] == ["ran", "ran", "ran"]
    assert json.loads((out / "world" / "world.json").read_text())["num_images"] == 12
    assert storage.is_complete(str(out / "manifests" / "pretrain"))
    assert storage.is_complete(str(out / "manifests" / "instruct"))
    assert [s["status"] for s in pipeline.run(plan)["steps"]] == ["skipped"] * 3
    bigger = _plan(tmp_path, dict(raw, world={"num_images": 13, "image_size": 64}))
    assert pipeline.completed(bigger.step("world")) is None  # other parameters: generated again


def test_world_step_uploads_to_a_bucket(tmp_path, s3_bucket):
    raw = {"job": "pipeline", "output": f"{s3_bucket}/p", "steps": ["world"], "world": {"num_images": 5}}
    plan = _plan(tmp_path, raw)
    pipeline.run(plan)
    world = f"{s3_bucket}/p/world"
    assert json.loads(storage.read_text(f"{world}/world.json"))["num_images"] == 5
    assert storage.exists(f"{world}/images/world_000004.png")
    assert storage.exists(f"{world}/train/pretrain.json")
    assert pipeline.completed(plan.step("world")) == f"{world}/world.json"


# --------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lock_is_exclusive(tmp_path, where, request):
    base = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    records = storage.join(base, pipeline.RECORDS)
    first, second = pipeline.OutputLock(records), pipeline.OutputLock(records)
    first.acquire()
    with pytest.raises(pipeline.PipelineLocked, match=f"pid {os.getpid()} on"):
        second.acquire()
    assert first.holder()["owner"] == first.owner["owner"]
    second.release()  # not the owner: nothing happens
    assert storage.exists(first.uri)
    first.release()
    assert not storage.exists(first.uri)
    second.acquire()
    second.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    records = str(tmp_path / "out" / pipeline.RECORDS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = pipeline.OutputLock(records)
    storage.write_text(lock.uri, json.dumps({"owner": "x", "host": lock.owner["host"], "pid": int(dead)}))
    lock.acquire()
    assert lock.holder()["owner"] == lock.owner["owner"]
    lock.release()
    other = pipeline.OutputLock(records)
    storage.write_text(other.uri, json.dumps({"owner": "y", "host": "elsewhere", "pid": 1}))
    with pytest.raises(pipeline.PipelineLocked, match="pid 1 on elsewhere"):
        other.acquire()
    other.acquire(break_lock=True)
    other.release()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_sigterm_stops_the_run_and_releases_its_lock(tmp_path, world_dir, delay):
    """What `sea-ray jobs stop` does to a pipeline: SIGTERM as soon as the lock exists (while
    Ray is being imported) and a little later (Ray starting, labels running). The run ends and
    its lock is gone, wherever the signal lands."""
    import signal
    import time

    out = tmp_path / "out"
    path = _write(tmp_path, _raw(world_dir, out, steps=["labels", "align"], ray={"num_cpus": 1}))
    lock = out / pipeline.RECORDS / pipeline.LOCK_FILE
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="")
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sea_ray.cli", "pipeline", "--config", str(path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not lock.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert lock.exists(), (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the run went on after SIGTERM")
    assert code != 0 and not lock.exists(), (tmp_path / "run.log").read_text()[-3000:]


def test_a_locked_output_fails_the_run_without_touching_it(tmp_path, world_dir, fake_runners, capsys):
    out = tmp_path / "out"
    path = _write(tmp_path, _raw(world_dir, out, steps=["labels"]))
    holder = pipeline.OutputLock(str(out / pipeline.RECORDS))
    holder.acquire()
    assert cli.main(["pipeline", "--config", str(path)]) == 1
    assert "another pipeline run writes this output" in capsys.readouterr().err
    assert fake_runners == [] and not (out / "labels").exists()
    holder.release()
    assert cli.main(["pipeline", "--config", str(path)]) == 0
