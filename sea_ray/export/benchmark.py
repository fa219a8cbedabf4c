"""``sea-ray benchmark``: lmms-eval on exported models, one Ray task per model, one table.

Each model (an exported LLaVA folder, or a checkpoint exported first) is evaluated by lmms-eval's
``llava_hf`` model in a Ray task of its own: on a cluster with GPUs each task takes
``gpus_per_model`` GPUs, here it runs on the CPU. The tasks are lmms-eval's (preset ``paper8``:
the paper's eight benchmarks) and ``world_qa``, the synthetic world's questions asked and scored
as ``sea-ray eval`` does (:mod:`sea_ray.export.lmms_world`).

Written to ``output``: ``<model>/results.json`` (lmms-eval's results, task configs and versions)
and ``<model>/samples.jsonl`` (every answer), ``report.json`` and ``report.md``: a row per task
(its first metric), a column per model, and each model's relative gain over the baseline
(``(model - baseline) / baseline``) with their mean, as the paper reports it.

Tasks scored by a GPT judge need one: without ``OPENAI_API_KEY`` (or ``API_TYPE=local`` with
``LLM_JUDGE_URL``, lmms-eval's local judge) MM-Vet is skipped and MMBench runs as
``mmbench_en_dev_static`` (answers matched by rules only), each with a note in the report.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from typing import Optional

from sea_ray import runtime, storage
from sea_ray.config.schema import BENCHMARK_PRESETS, WORLD_TASK, BenchmarkConfig
from sea_ray.errors import ConfigError
from sea_ray.eval.job import world_split
from sea_ray.export import lmms_world
from sea_ray.export.llava import LAST_FILE, PROVENANCE_FILE, export

log = logging.getLogger(__name__)

INSTALL_HINT = ("lmms-eval is not installed: pip install -c constraints-bench.txt -e '.[bench]' (docs/export.md, "
                "\"Benchmarks\")")
# Tasks scored by a GPT judge, and what runs in their place without one (None: skipped).
JUDGED = {"mmvet": None, "mmbench_en_dev": "mmbench_en_dev_static"}


def judge_configured(env=os.environ) -> bool:
    """Whether lmms-eval's judge can be reached: an OpenAI key, or its local OpenAI-compatible server."""
    return bool(env.get("OPENAI_API_KEY")) or (env.get("API_TYPE") == "local" and bool(env.get("LLM_JUDGE_URL")))


def resolve_tasks(names: list[str], env=os.environ) -> tuple[list[str], list[str]]:
    """(lmms-eval task names, notes): presets expanded, judged tasks replaced or skipped when no
    judge is configured."""
    tasks, notes = [], []
    for name in names:
        for task in BENCHMARK_PRESETS.get(name, (name,)):
            if task in JUDGED and not judge_configured(env):
                instead = JUDGED[task]
                notes.append(f"{task}: scored by a GPT judge and no judge is configured (OPENAI_API_KEY, or "
                             f"API_TYPE=local with LLM_JUDGE_URL): " +
                             (f"ran {instead} instead (answers matched by rules only)" if instead else "skipped"))
                task = instead
            if task and task not in tasks:
                tasks.append(task)
    return tasks, notes


def problems(cfg: BenchmarkConfig) -> list[str]:
    """What the job knows is wrong before Ray starts (beside the config's own rules and inputs)."""
    if importlib.util.find_spec("lmms_eval") is None:
        return [f"tasks: {INSTALL_HINT}"]
    return []


def is_exported(uri: str) -> bool:
    try:
        return json.loads(storage.read_text(storage.join(uri, LAST_FILE))).get("model_type") == "llava"
    except (FileNotFoundError, ValueError):
        return False


def exported_folder(name: str, path: str, output: str) -> str:
    """The LLaVA folder of a model: ``path`` itself, or the checkpoint at ``path`` exported into
    ``<output>/exports/<name>`` (reused when it already holds that checkpoint's export)."""
    from sea_ray.train import checkpoint as ckpt

    if is_exported(path):
        return path
    folder = storage.join(output, "exports", name)
    checkpoint = ckpt.resolve(path)
    if is_exported(folder):
        done = json.loads(storage.read_text(storage.join(folder, PROVENANCE_FILE)))
        if done.get("checkpoint") == checkpoint:
            return folder
    export(checkpoint, folder, overwrite=True)
    return folder


def evaluate(folder: str, tasks: list[str], task_files: dict[str, dict[str, str]], limit: Optional[int],
             batch_size: int, model_args: dict[str, str]) -> dict:
    """lmms-eval's ``simple_evaluate`` of one exported model (runs inside its Ray task)."""
    from importlib.metadata import version

    os.environ.setdefault("WANDB_MODE", "disabled")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    local = storage.local_copy(folder)
    with tempfile.TemporaryDirectory(prefix="sea-ray-tasks-") as tasks_dir:
        for task, files in task_files.items():
            os.makedirs(os.path.join(tasks_dir, task))
            data = os.path.join(tasks_dir, task, lmms_world.DATA_FILE)
            for file_name, text in files.items():
                with open(os.path.join(tasks_dir, task, file_name), "w") as f:
                    f.write(text.replace(lmms_world.DATA_PLACEHOLDER, data))
        manager = TaskManager("WARNING", include_path=tasks_dir,
                              include_defaults=any(t not in task_files for t in tasks))
        args = ",".join(f"{k}={v}" for k, v in {"pretrained": local, **model_args}.items())
        out = evaluator.simple_evaluate(model="llava_hf", model_args=args, tasks=tasks, task_manager=manager,
                                        limit=limit, batch_size=batch_size, log_samples=True)
    samples = {task: [{"doc_id": s.get("doc_id"), "doc": s.get("doc"), "target": s.get("target"),
                       "response": (s.get("filtered_resps") or [None])[0]} for s in rows]
               for task, rows in out.get("samples", {}).items()}
    configs = {task: {k: c.get(k) for k in ("dataset_path", "dataset_name", "dataset_kwargs", "test_split",
                                             "metric_list", "generation_kwargs")}
               for task, c in out["configs"].items()}
    return {"results": out["results"], "configs": json.loads(json.dumps(configs, default=str)),
            "versions": out.get("versions"), "n-samples": out.get("n-samples"),
            "task_hashes": out.get("task_hashes"), "lmms_eval_version": version("lmms-eval"),
            "samples": json.loads(json.dumps(samples, default=str))}


def primary_metric(config: dict) -> str:
    """A task's headline number: the first metric of its metric list, lmms-eval's ``name,none`` key."""
    metrics = config.get("metric_list") or []
    return f"{metrics[0]['metric']},none" if metrics else ""


def gains(table: dict[str, dict[str, Optional[float]]], baseline: str) -> dict[str, dict]:
    """Per model: relative gain over ``baseline`` per task and their mean (tasks where the
    baseline scored 0 or either score is missing are left out of the mean)."""
    out = {}
    for model, scores in table.items():
        per_task = {}
        for task, value in scores.items():
            base = table[baseline].get(task)
            per_task[task] = (value - base) / base if value is not None and base else None
        defined = [g for g in per_task.values() if g is not None]
        out[model] = {"per_task": per_task, "mean": sum(defined) / len(defined) if defined else None}
    return out


def render_report(report: dict) -> str:
    models, baseline = report["models"], report["baseline"]
    lines = ["# Benchmark", "", f"lmms-eval {report['lmms_eval_version']}; baseline: {baseline}; "
             f"limit: {report['limit'] or 'none'}.", "",
             "| task (metric) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
    for task in report["tasks"]:
        metric = report["metrics"][task].split(",")[0]
        lines.append(f"| {task} ({metric}) | " + " | ".join(fmt(report["table"][m].get(task)) for m in models) + " |")
    mean = [report["gains"][m]["mean"] for m in models]
    lines.append("| mean relative gain over " + baseline + " | " +
                 " | ".join("—" if m == baseline else ("n/a" if g is None else f"{100 * g:+.1f}%")
                            for m, g in zip(models, mean)) + " |")
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "Datasets: " + "; ".join(f"{t}: {d}" for t, d in report["datasets"].items())]
    return "\n".join(lines) + "\n"


def _device(cfg: BenchmarkConfig, ray) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def run(cfg: BenchmarkConfig) -> dict:
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError([f"tasks: {INSTALL_HINT}"])
    tasks, notes = resolve_tasks(cfg.tasks)
    task_files, datasets = {}, {}
    if WORLD_TASK in tasks:
        _, qa = world_split(cfg.world, cfg.split, cfg.max_samples)
        task_files[WORLD_TASK] = lmms_world.task_files(WORLD_TASK, qa, cfg.world, cfg.max_new_tokens)
        datasets[WORLD_TASK] = f"the world at {cfg.world}, {cfg.split} split, {len(qa)} questions"
    folders = {m.name: exported_folder(m.name, m.path, cfg.output) for m in cfg.models}
    ray = runtime.init_ray(cfg.ray)
    device = _device(cfg, ray)
    gpus = cfg.gpus_per_model if device == "cuda" else 0
    defaults = {"device": device, "device_map": device if device == "cpu" else "cuda:0",
                "dtype": "float32" if device == "cpu" else "bfloat16"}
    remote = ray.remote(num_cpus=1, num_gpus=gpus)(evaluate)
    log.info("benchmark: %d model(s) x %s on %s", len(folders), ", ".join(tasks), device)
    refs = {name: remote.remote(folder, tasks, task_files, cfg.limit, cfg.batch_size, {**defaults, **cfg.model_args})
            for name, folder in folders.items()}
    results = {name: ray.get(ref) for name, ref in refs.items()}
    for name, result in results.items():
        storage.write_text(storage.join(cfg.output, name, "results.json"),
                           json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
        storage.write_text(storage.join(cfg.output, name, "samples.jsonl"),
                           "".join(json.dumps({"task": t, **s}, default=str) + "\n"
                                   for t, rows in result["samples"].items() for s in rows))
    first = next(iter(results.values()))
    metrics = {t: primary_metric(first["configs"].get(t, {})) for t in tasks}
    table = {name: {t: r["results"].get(t, {}).get(metrics[t]) for t in tasks} for name, r in results.items()}
    baseline = cfg.baseline or cfg.models[0].name
    report = {"models": list(folders), "baseline": baseline, "tasks": tasks, "metrics": metrics, "table": table,
              "gains": gains(table, baseline), "notes": notes, "limit": cfg.limit, "device": device,
              "lmms_eval_version": first["lmms_eval_version"], "folders": folders,
              "datasets": {t: datasets.get(t) or _dataset_of(first["configs"].get(t, {})) for t in tasks},
              "task_hashes": {name: r.get("task_hashes") for name, r in results.items()}}
    storage.write_text(storage.join(cfg.output, "report.json"), json.dumps(report, indent=2, default=str))
    text = render_report(report)
    storage.write_text(storage.join(cfg.output, "report.md"), text)
    log.info("benchmark report %s:\n%s", storage.join(cfg.output, "report.md"), text)
    return {"output": cfg.output, "table": table, "mean_relative_gain": {m: g["mean"] for m, g in report["gains"].items()},
            "notes": notes}


def _dataset_of(config: dict) -> str:
    kwargs = config.get("dataset_kwargs") or {}
    path = config.get("dataset_path")
    return f"{path}" + (f" ({config['dataset_name']})" if config.get("dataset_name") else "") + \
        f" @ {kwargs.get('revision') or 'the hub main branch at run time'}"
