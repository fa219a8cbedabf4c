"""`sea-ray benchmark`: task presets and judges, the world task (asked and scored as sea-ray eval
does), the table and its relative gains; with lmms-eval installed (the bench extra), the world task
on an exported model gives sea-ray eval's answers, question by question."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from sea_ray.config.loading import path_fields, validate
from sea_ray.errors import ConfigError
from sea_ray.eval.job import world_split
from sea_ray.export import benchmark, lmms_world
from tests.test_export import write_checkpoint


def _config(tmp_path, world_dir, **extra):
    raw = {"job": "benchmark", "models": [{"name": "base", "path": str(tmp_path / "a")},
                                          {"name": "sea", "path": str(tmp_path / "b")}],
           "world": str(world_dir), "output": str(tmp_path / "bench"), **extra}
    return validate(raw)


def test_paper8_without_a_judge_skips_mmvet_and_matches_mmbench_by_rules():
    tasks, notes = benchmark.resolve_tasks(["paper8"], env={})
    assert tasks == ["vqav2_val", "textvqa_val", "gqa", "scienceqa_img", "mmbench_en_dev_static", "pope",
                     "vizwiz_vqa_val"]
    assert len(notes) == 2 and "mmvet" in notes[0] + notes[1] and "skipped" in notes[0] + notes[1]
    judged, none = benchmark.resolve_tasks(["paper8", "world_qa"], env={"OPENAI_API_KEY": "sk-test"})
    assert judged[-2:] == ["mmvet", "world_qa"] and "mmbench_en_dev" in judged and none == []
    local, _ = benchmark.resolve_tasks(["mmvet"], env={"API_TYPE": "local", "LLM_JUDGE_URL": "http://127.0.0.1:9"})
    assert local == ["mmvet"]


def test_config_rules_and_paths(tmp_path, world_dir):
    cfg = _config(tmp_path, world_dir)
    assert cfg.tasks == ["world_qa"]
    fields = {key: (value, role) for key, value, role in path_fields(cfg)}
    assert fields["models.0.path"] == (str(tmp_path / "a"), "input") and fields["output"][1] == "output"
    bad = {"job": "benchmark", "models": [{"name": "m", "path": "x"}, {"name": "m", "path": "y"}],
           "baseline": "nope", "tasks": ["world_qa"]}
    with pytest.raises(ConfigError) as err:
        validate(bad)
    text = str(err.value)
    assert "each name once (twice: m)" in text and "baseline: 'nope'" in text and "world: required" in text


def test_world_task_asks_the_questions_sea_ray_eval_asks(world_dir):
    _, qa = world_split(str(world_dir), "test", 3)
    files = lmms_world.task_files("world_qa", qa, str(world_dir), max_new_tokens=8)
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: f"function:{loader.construct_scalar(node)}")
    task = yaml.load(files["world_qa.yaml"], Loader=loader)
    assert task["process_results"] == "function:utils.process_results"
    assert task["generation_kwargs"] == {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "num_beams": 1}
    assert task["dataset_kwargs"]["data_files"]["test"] == lmms_world.DATA_PLACEHOLDER
    rows = [json.loads(line) for line in files[lmms_world.DATA_FILE].splitlines()]
    assert [r["question"] for r in rows] == [q["question"] for q in qa] and len(rows) > 3
    doc = rows[0]
    assert lmms_world.doc_to_text(doc) == qa[0]["question"]
    assert lmms_world.doc_to_visual(doc)[0].size == (64, 64)
    assert lmms_world.process_results(dict(doc, answer="red"), ["The Red."]) == \
        {"exact_match": 1.0, f"exact_match_{doc['type']}": 1.0}
    assert lmms_world.process_results(dict(doc, answer="red"), ["blue"])["exact_match"] == 0.0


def test_table_and_mean_relative_gain():
    table = {"base": {"a": 0.5, "b": 0.8, "c": 0.0}, "sea": {"a": 0.55, "b": 0.76, "c": 0.1}}
    gains = benchmark.gains(table, "base")
    assert gains["sea"]["per_task"]["a"] == pytest.approx(0.1) and gains["sea"]["per_task"]["c"] is None
    assert gains["sea"]["mean"] == pytest.approx((0.1 - 0.05) / 2) and gains["base"]["mean"] == 0.0
    report = {"models": ["base", "sea"], "baseline": "base", "tasks": ["a", "b", "c"], "table": table,
              "metrics": {t: "exact_match,none" for t in "abc"}, "gains": gains, "notes": ["mmvet: skipped"],
              "limit": None, "lmms_eval_version": "0.7.3", "datasets": {"a": "x"}}
    text = benchmark.render_report(report)
    assert "| a (exact_match) | 0.5000 | 0.5500 |" in text and "| mean relative gain over base | — | +2.5% |" in text
    assert "- mmvet: skipped" in text


def test_a_checkpoint_is_exported_once(tmp_path, world_dir, monkeypatch):
    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "world-clip-llama"})
    out = str(tmp_path / "bench")
    folder = benchmark.exported_folder("m", str(Path(uri).parent), out)
    assert folder == f"{out}/exports/m" and benchmark.is_exported(folder)
    assert benchmark.exported_folder("again", folder, out) == folder  # an export is used as it is
    calls = []
    monkeypatch.setattr(benchmark, "export", lambda *a, **k: calls.append(a))
    assert benchmark.exported_folder("m", uri, out) == folder and calls == []


def test_without_lmms_eval_the_job_names_the_extra(tmp_path, world_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    assert "pip install -c constraints-bench.txt" in benchmark.problems(_config(tmp_path, world_dir))[0]


@pytest.mark.bench
@pytest.mark.ray
@pytest.mark.slow
def test_world_task_through_lmms_eval_gives_sea_ray_evals_answers(tmp_path, world_dir, ray_local):
    """The bench extra: lmms-eval's llava_hf on an exported world model answers every question as
    sea-ray eval answers it, so the two accuracies are equal."""
    pytest.importorskip("lmms_eval", reason="the bench extra is not installed")
    from sea_ray.eval.job import run as run_eval

    uri = write_checkpoint(tmp_path, world_dir, "instruct", {"preset": "world-clip-llama"})
    evaluated = run_eval(validate({"job": "eval", "checkpoint": uri, "world": str(world_dir), "metrics": ["qa"],
                                   "max_samples": 4, "output": str(tmp_path / "eval"), "device": "cpu"}))
    ours = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    summary = benchmark.run(validate({"job": "benchmark", "models": [{"name": "world", "path": uri}],
                                      "world": str(world_dir), "max_samples": 4, "device": "cpu",
                                      "output": str(tmp_path / "bench")}))
    samples = [json.loads(line) for line in (tmp_path / "bench" / "world" / "samples.jsonl").read_text().splitlines()]
    theirs = {s["doc"]["question_id"]: s["response"] for s in samples}
    assert len(theirs) == len(ours) > 0
    assert {p["question_id"]: p["prediction"] for p in ours} == {k: (v or "").strip() for k, v in theirs.items()}
    assert summary["table"]["world"]["world_qa"] == pytest.approx(evaluated["qa_accuracy"])
    assert "| world_qa (exact_match) |" in (tmp_path / "bench" / "report.md").read_text()


def test_bench_constraints_are_the_core_pins_but_three():
    """constraints-bench.txt may differ from constraints.txt only where lmms-eval needs it (wandb:
    lmms-eval's 0.25.0, which needs protobuf<7, against the tracking extra's 0.31.0)."""
    repo = Path(__file__).resolve().parents[1]

    def pins(name):
        lines = (repo / name).read_text().splitlines()
        return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))

    core, bench = pins("constraints.txt"), pins("constraints-bench.txt")
    changed = {name for name in core if bench.get(name) != core[name]}
    assert changed == {"protobuf", "filelock", "wandb"}
    assert "datasets" in set(bench) - set(core) and bench["wandb"] == "0.25.0"
