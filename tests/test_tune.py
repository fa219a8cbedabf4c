"""Hyperparameter search (sea_ray.tune) on tiny models with oracle labels: a 4-trial TPE + ASHA
search and its outputs, a search killed half-way and resumed, and the config rules."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from sea_ray.config.loading import load_config, validate
from sea_ray.errors import ConfigError

STEPS, EVERY = 6, 2
SPACE = {"sea.init_temperature": {"type": "loguniform", "low": 0.03, "high": 0.2},
         "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
         "model.adapter.type": {"type": "choice", "values": ["linear", "mlp2x_gelu"]}}


@pytest.fixture(scope="module")
def labelled_world(world_dir, tmp_path_factory):
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.world.oracle import write_oracle_labels

    labels = str(tmp_path_factory.mktemp("tune-labels"))
    align = validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                      "data": {"manifest": "unused", "labels": labels}, "batch": {"global_size": 8, "per_worker": 8}})
    tower = build_vision_tower(align.model.vision, align.data.image_aspect)
    write_oracle_labels(world_dir, labels, 8, tower.transform_spec())
    return world_dir, labels


def _tune_raw(world, labels, runs, name, **extra):
    raw = {"job": "tune", "num_samples": 4, "max_concurrent": 2, "report_every_n_steps": EVERY, "seed": 1,
           "optuna": {"n_startup_trials": 2}, "asha": {"grace_period": 1, "reduction_factor": 2},
           "validation": {"num_images": 8},
           "base": {"model": {"preset": "tiny-openclip-llama"}, "run": {"name": name, "storage": str(runs), "seed": 3},
                    "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images",
                             "labels": labels, "max_length": 48},
                    "batch": {"global_size": 8, "per_worker": 8}, "optim": {"max_steps": STEPS},
                    "checkpoint": {"every_n_steps": EVERY}, "sea": {"top_n": 3}},
           "space": SPACE}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def interrupted_search(labelled_world, ray_local, tmp_path_factory):
    """A 4-trial TPE + ASHA search started with `sea-ray tune` in its own process, SIGKILLed once
    a trial has finished, then resumed by running the same config again (in this process).
    One search serves two tests: the outputs of a search, and its resume."""
    from sea_ray.tune.search import run
    from sea_ray.tune.trials import DONE, EXECUTIONS, HISTORY

    world, labels = labelled_world
    runs = tmp_path_factory.mktemp("tune-runs")
    raw = _tune_raw(world, labels, runs, "search")
    path = runs / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
               PYTHONPATH=str(Path(__file__).parents[1]))
    with open(runs / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sea_ray.cli", "tune", "--config", str(path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        trials = runs / "search" / "trials"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(trials.glob(f"*/{DONE}")):
            time.sleep(0.05)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert alive, (runs / "driver.log").read_text()[-3000:]
    finished = {p.parent.name: {"history": (p.parent / HISTORY).read_text(),
                                "executions": json.loads((p.parent / EXECUTIONS).read_text())}
                for p in trials.glob(f"*/{DONE}")}
    time.sleep(1.0)  # let Ray reap the dead driver's trial actors
    summary = run(validate(raw))
    return SimpleNamespace(exp=runs / "search", raw=raw, summary=summary, finished=finished)


@pytest.mark.ray
@pytest.mark.slow
def test_four_trial_search_writes_table_plots_and_a_best_config_align_accepts(interrupted_search):
    from sea_ray.cli import main

    exp, summary = interrupted_search.exp, interrupted_search.summary
    assert summary["trial_mode"] == "in_process" and summary["trials"] == 4

    table = pd.read_parquet(exp / "results.parquet")
    assert len(table) == 4 and table["trial_id"].is_unique
    assert pd.read_csv(exp / "results.csv")["trial_id"].tolist() == table["trial_id"].tolist()
    for column in ("status", "steps", "executions", "val_sea_loss", "best_val_sea_loss", "last_val_word_acc",
                   "last_val_lm_loss", "checkpoint", *SPACE):
        assert column in table.columns, column
    assert set(table["status"]) <= {"completed", "stopped"}
    completed = table[table["status"] == "completed"]
    assert len(completed) >= 1 and (completed["steps"] == STEPS).all()
    assert (table.loc[table["status"] == "stopped", "steps"] < STEPS).all()
    for trial_id in completed["trial_id"]:  # marked done at its last report, before ASHA's max_t stop
        assert (exp / "trials" / trial_id / "_DONE").exists()
    assert table["val_sea_loss"].notna().all() and table["model.adapter.type"].isin(["linear", "mlp2x_gelu"]).all()
    assert table["sea.init_temperature"].between(0.03, 0.2).all() and table["optim.lr"].between(1e-4, 1e-2).all()

    # the best config: the best completed trial's parameters, accepted by align as is
    best = completed.loc[completed["val_sea_loss"].idxmin()]
    assert summary["best_trial"] == best["trial_id"]
    best_yaml = exp / "best.yaml"
    align = load_config(best_yaml, job="align")
    assert align.run.name == "search-best"
    assert align.sea.init_temperature == pytest.approx(best["sea.init_temperature"])
    assert align.optim.lr == pytest.approx(best["optim.lr"])
    assert align.model.adapter.type == best["model.adapter.type"]
    assert main(["validate", "--config", str(best_yaml)]) == 0
    assert Path(summary["best_checkpoint"]).name == f"step_{STEPS:08d}"

    # plots, importances, history, the held-out images
    for png in ("metric_per_trial.png", "param_importances.png"):
        assert (exp / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((exp / "importances.json").read_text())
    assert set(found["importances"]) == set(SPACE)
    history = pd.read_parquet(exp / "history.parquet")
    assert set(history["trial_id"]) == set(table["trial_id"]) and (history["step"] % EVERY == 0).all()
    assert len(pd.read_parquet(exp / "validation" / "labels" / "shards")) == 8


@pytest.mark.ray
@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(interrupted_search):
    """The trials that had finished when the driver was killed were trained exactly once and
    their history is untouched; every other trial ran to its end or to ASHA's stop."""
    from sea_ray.tune.trials import EXECUTIONS, HISTORY

    exp, finished = interrupted_search.exp, interrupted_search.finished
    assert 1 <= len(finished) < 4, "the search was not interrupted half-way"
    table = pd.read_parquet(exp / "results.parquet")
    trials = exp / "trials"
    # a trial the killed driver started after its last state snapshot is unknown to the resumed
    # search: its folder is listed as abandoned, and it never finished
    abandoned = {p.name for p in trials.iterdir()} - set(table["trial_id"])
    assert abandoned == set(interrupted_search.summary.get("abandoned_trial_dirs", []))
    assert not any((trials / name / "_DONE").exists() for name in abandoned)
    assert table.set_index("trial_id").loc[list(finished), "status"].eq("completed").all()
    for trial_id, before in finished.items():
        executions = json.loads((trials / trial_id / EXECUTIONS).read_text())
        assert executions == before["executions"], f"finished trial {trial_id} was trained again: {executions}"
        assert (trials / trial_id / HISTORY).read_text() == before["history"]
    assert (table["executions"] >= 1).all() and table["status"].isin(["completed", "stopped"]).all()
    assert interrupted_search.summary["status"]["completed"] >= len(finished)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_trial_is_retried_and_resumes_from_its_checkpoint(labelled_world, ray_local, tmp_path):
    """SIGKILL the process of a running trial after its first checkpoint: Tune retries it
    (`max_trial_failures`) and the retry resumes from that checkpoint instead of starting over."""
    from sea_ray.tune.search import run
    from sea_ray.tune.trials import EXECUTIONS
    from tests.faults import kill_when

    world, labels = labelled_world
    raw = _tune_raw(world, labels, tmp_path, "retry", num_samples=1, max_concurrent=1, max_trial_failures=1,
                    plots=False)
    trials = tmp_path / "retry" / "trials"
    thread, killed = kill_when(lambda: bool(list(trials.glob(f"*/step_{EVERY:08d}/_COMPLETE"))), "ImplicitFunc",
                               timeout=300)
    summary = run(validate(raw))
    thread.join(timeout=1)
    assert killed, "no trial process was killed: the trial ended before its first checkpoint was seen"
    (trial,) = [p for p in trials.iterdir() if p.is_dir()]
    executions = json.loads((trial / EXECUTIONS).read_text())
    assert len(executions) == 2 and executions[0]["resumed_from"] is None
    assert executions[1]["resumed_from"] is not None and executions[1]["pid"] != executions[0]["pid"]
    assert int(executions[1]["resumed_from"].split("_")[-1]) >= EVERY
    table = pd.read_parquet(tmp_path / "retry" / "results.parquet")
    assert table["status"].tolist() == ["completed"] and table["steps"].tolist() == [STEPS]
    assert table["executions"].tolist() == [2] and summary["status"]["completed"] == 1


def test_search_space_rules_list_every_problem(labelled_world, tmp_path):
    world, labels = labelled_world
    raw = _tune_raw(world, labels, tmp_path, "bad", metric="val_word_acc", mode="min")
    raw["space"] = {
        "sea.init_temperatur": {"type": "uniform", "low": 0.1, "high": 0.2},      # typo
        "optim.lr": {"type": "loguniform", "low": 0.0, "high": 0.1},               # log of 0
        "sea.window": {"type": "randint", "low": 1.5, "high": 3},                  # not integers
        "model.adapter.type": {"type": "choice", "values": ["linear", "mlp0x_gelu"]},  # invalid end
        "sea.init_temperature": {"type": "uniform", "low": 0.05, "high": 2.0},     # above max_temperature
        "run.seed": {"type": "randint", "low": 0, "high": 3},                      # fixed section
    }
    with pytest.raises(ConfigError) as info:
        validate(raw)
    text = "\n".join(info.value.problems)
    assert ("space.sea.init_temperatur: not a key of the base align config "
            "(did you mean 'sea.init_temperature'?)") in text
    assert "space.optim.lr: loguniform needs low > 0" in text
    assert "space.sea.window: randint needs integer low and high" in text
    assert "space.model.adapter.type='mlp0x_gelu' gives an invalid align config" in text
    assert "space.sea.init_temperature=2.0 gives an invalid align config" in text
    assert "space.run.seed: job, run, ray, data, scaling are fixed for every trial" in text
    assert "mode: val_word_acc is optimised with mode=max" in text
    assert len(info.value.problems) == 7


def test_job_level_rules_check_every_end_of_the_space(labelled_world, tmp_path):
    """The tiny tower has an 8 x 8 grid and the oracle labels 3 per patch: a window of 9 or a
    top_n of 5 somewhere in the space is refused before any Ray resource is asked for."""
    from sea_ray.tune.search import search_problems

    world, labels = labelled_world
    raw = _tune_raw(world, labels, tmp_path, "ends")
    raw["space"] = {"sea.window": {"type": "randint", "low": 1, "high": 9},
                    "sea.top_n": {"type": "choice", "values": [1, 5]}}
    problems = search_problems(validate(raw))
    assert any(p.startswith("space.sea.window=9: sea.window: 9 is larger than the 8 x 8 patch grid") for p in problems)
    assert any(p.startswith("space.sea.top_n=5: sea.top_n: 5 > the 3 labels") for p in problems)
    assert len(problems) == 2
    path = tmp_path / "ends.yaml"  # `sea-ray validate` runs the same checks
    path.write_text(yaml.safe_dump(raw))
    from sea_ray.cli import main

    assert main(["validate", "--config", str(path)]) == 2


def test_a_resume_with_another_search_is_refused(labelled_world, tmp_path):
    from sea_ray.tune.search import check_same_search

    world, labels = labelled_world
    cfg = validate(_tune_raw(world, labels, tmp_path, "same"))
    exp = str(tmp_path / "same")
    check_same_search(cfg, exp, resuming=False)  # a new search records itself
    check_same_search(validate(_tune_raw(world, labels, tmp_path, "same", max_concurrent=1)), exp, resuming=True)
    changed = validate(_tune_raw(world, labels, tmp_path, "same", space={
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}))
    with pytest.raises(ConfigError, match="space: differs"):
        check_same_search(changed, exp, resuming=True)
    check_same_search(changed, exp, resuming=False)  # nothing to resume: the new search replaces it


@pytest.mark.ray
def test_the_dashboard_is_read_through_public_ray_api(ray_local, monkeypatch):
    """resolve_trial_mode's dashboard check reads the context ray.init returned (public API,
    sea_ray.runtime.dashboard_url): init_ray's own, else, for a Ray connected elsewhere (this
    session's, without a dashboard), the context ray.init hands back to a connected driver."""
    from sea_ray import runtime
    from sea_ray.tune.search import _dashboard_up

    assert runtime.dashboard_url() is None and _dashboard_up() is False
    job = ray_local.get_runtime_context().get_job_id()
    monkeypatch.setitem(runtime._CONNECTION, job, SimpleNamespace(dashboard_url="127.0.0.1:8265"))
    assert runtime.dashboard_url() == "127.0.0.1:8265" and _dashboard_up() is True
    monkeypatch.setitem(runtime._CONNECTION, job, SimpleNamespace(dashboard_url=""))
    assert _dashboard_up() is False


def test_optuna_learns_that_asha_stopped_a_trial(tmp_path):
    """A trial stopped before its last step is PRUNED for TPE (with its values at the training
    steps it reported), a trial that ran all its steps is COMPLETE, a failed one FAIL. Read
    through Optuna's public API (the study in a storage we pass), so this pins what the searcher
    does, not how Ray's OptunaSearch stores it: a Ray that changes the stock methods it relies on
    (intermediate values at result["training_iteration"], PRUNED for a trial ended without a
    result) fails here."""
    import optuna
    from optuna.trial import TrialState

    from sea_ray.tune.optuna_search import AshaAwareOptunaSearch, GoodFraction
    from sea_ray.tune.space import optuna_distributions

    cfg = validate(_tune_raw("w", "l", "r", "x"))
    storage = optuna.storages.InMemoryStorage()
    search = AshaAwareOptunaSearch(space=optuna_distributions(cfg), metric="val_sea_loss", mode="min",
                                   max_steps=STEPS, study_name="pinned", storage=storage)
    for trial_id in ("a", "b", "c"):
        assert set(search.suggest(trial_id)) == set(SPACE)
    search.on_trial_result("a", {"val_sea_loss": 2.5, "step": 2, "training_iteration": 1})
    search.on_trial_result("a", {"val_sea_loss": 9.9, "step": 2, "training_iteration": 2})  # a replayed step
    search.on_trial_complete("a", {"val_sea_loss": 2.4, "step": 4, "training_iteration": 3})
    search.on_trial_result("a", {"val_sea_loss": 0.1, "step": 6})  # after its end: ignored
    search.on_trial_result("b", {"val_sea_loss": 2.0, "step": 2, "training_iteration": 1})
    search.on_trial_complete("b", {"val_sea_loss": 1.5, "step": STEPS, "training_iteration": 3})
    search.on_trial_result("unknown", {"val_sea_loss": 1.0, "step": 2})  # not suggested here: ignored
    search.on_trial_complete("c", None, error=True)
    a, b, c = optuna.load_study(study_name="pinned", storage=storage).trials
    assert a.state == TrialState.PRUNED and a.intermediate_values == {2: 2.5, 4: 2.4}
    assert b.state == TrialState.COMPLETE and b.value == 1.5 and b.intermediate_values == {2: 2.0}
    assert c.state == TrialState.FAIL
    restored = AshaAwareOptunaSearch(space=optuna_distributions(cfg), metric="val_sea_loss", mode="min",
                                     max_steps=STEPS)
    search.save(str(tmp_path / "searcher.pkl"))  # what Tune does for a resume: the bookkeeping travels
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored._reported == {"a": {2, 4}, "b": {2}, "c": set()} and restored._ended == {"a", "b", "c"}
    assert [GoodFraction(0.25)(n) for n in (1, 4, 5, 12, 400)] == [1, 1, 2, 3, 25]


def test_trials_see_absolute_local_paths(tmp_path, monkeypatch):
    """Tune starts every trial in its own working directory: relative paths of the config are
    made absolute for the trials (and only for them)."""
    from sea_ray.paths import absolute_paths  # what sea_ray.tune.search.run hands the trials

    monkeypatch.chdir(tmp_path)
    raw = _tune_raw("out/world", "out/labels", "out/tune", "abs")
    raw["base"]["data"]["image_root"] = "out/world/images"
    raw["validation"]["labels"] = "out/val-labels"
    raw["base"]["data"]["val_manifest"] = "out/world/val/pretrain.json"
    cfg = validate(raw)
    resolved = absolute_paths(cfg)
    assert resolved.validation.labels == str(tmp_path / "out" / "val-labels")
    assert resolved.base.data.val_manifest == str(tmp_path / "out" / "world" / "val" / "pretrain.json")
    assert resolved.base.data.labels == str(tmp_path / "out" / "labels")
    assert resolved.base.data.manifest == str(tmp_path / "out" / "world" / "train" / "pretrain.json")
    assert resolved.base.data.image_root == str(tmp_path / "out" / "world" / "images")
    assert resolved.base.run.storage == str(tmp_path / "out" / "tune")
    assert resolved.base.model.llm.tokenizer == "world" and resolved.base.model.vision.name == "custom"
    assert cfg.base.data.labels == "out/labels"


def test_shipped_tiny_tune_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "workflows" / "configs" / "tiny_tune.yaml")
    assert cfg.job == "tune" and cfg.searcher == "optuna" and cfg.asha.enabled


def test_the_search_benchmark_counts_compute_in_trial_steps_and_stops_at_the_budget():
    """bench/tune.py's accounting: a report's trial-steps are the sum of every trial's last
    reported step, the replay is cut at the report that reaches the budget, and its Tune stopper
    ends the search (and the trial) at that same report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tune", Path(__file__).parents[1] / "bench" / "tune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    history = pd.DataFrame({"trial_id": ["a", "a", "b", "a", "b", "c"], "step": [3, 6, 3, 9, 6, 3],
                            "val_sea_loss": [2.0, 1.8, 1.9, 1.5, 1.2, 1.0], "timestamp": range(6)})
    reports = bench.spend(history, budget=18)
    assert [spent for spent, _, _ in reports] == [3, 6, 9, 12, 15, 18]
    assert bench.spend(history, budget=14)[-1] == (15, "b", 1.2)  # cut at the report that reaches it
    assert bench.steps_to_reach(reports, 1.5) == 12 and bench.steps_to_reach(reports, 0.5) is None
    stop = bench.budget_stopper(15)
    assert [stop(t, {"step": s}) for t, s in zip(history["trial_id"], history["step"])] == [
        False, False, False, False, True, True]
    assert stop.stop_all()

    # judged at two budgets from the same runs: a smaller budget is a cut of them
    def trials(*values):  # one 6-step trial per value (reported at 3 and 6), run one after another
        rows = [(f"t{i}", step, value + (0.5 if step == 3 else 0.0)) for i, value in enumerate(values) for step in (3, 6)]
        return pd.DataFrame({"trial_id": [r[0] for r in rows], "step": [r[1] for r in rows],
                             "val_sea_loss": [r[2] for r in rows], "timestamp": range(len(rows))})

    runs = {0: {"random": trials(2.0, 1.0), "asha_tpe": trials(1.5, 0.8)},
            1: {"random": trials(1.2, 1.1), "asha_tpe": trials(1.4, 1.3)},
            2: {"random": trials(1.6, 1.6), "asha_tpe": trials(1.1, 1.0)}}
    best, wins, target, reach, median = bench.compare(runs, budget=12)
    assert best[0] == {"random": 1.0, "asha_tpe": 0.8} and wins == [0, 2] and target == 1.1
    assert reach == {0: 12, 1: None, 2: 6} and median == 12
    best, wins, target, reach, median = bench.compare(runs, budget=6)  # the first trial of each
    assert best[0] == {"random": 2.0, "asha_tpe": 1.5} and wins == [0, 2] and target == 1.6
    assert reach == {0: 6, 1: 6, 2: 3} and median == 6
