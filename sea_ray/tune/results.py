"""What a search leaves behind, in the experiment folder (local or ``s3://``)::

    results.parquet, results.csv   one row per trial: parameters, metrics, steps, status
    history.parquet                every reported result of every trial (trial_id, step, metrics)
    best.yaml                      the best trial's align config; ``sea-ray align --config`` takes it as is
    importances.json               parameter importances (Optuna, on a study rebuilt from the results)
    plots/metric_per_trial.png     the metric of every trial against its training step
    plots/param_importances.png    the importances as bars
    summary.json                   the best trial, its metric and checkpoint, the counts, and the
                                   folders of trials an interrupted run started after its last
                                   state snapshot (``abandoned_trial_dirs``; Tune never heard of them)

The best trial is the one with the best last metric among trials that completed (if none did:
among all trials). A trial's status is ``completed`` (all its steps), ``stopped`` (early, by
ASHA), ``error`` (failed beyond ``max_trial_failures``) or ``pending`` (no result yet).
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any, Optional

import yaml

from sea_ray import storage
from sea_ray.config.loading import validate
from sea_ray.config.schema import TuneConfig
from sea_ray.tune.space import apply_params, optuna_distributions, params_of
from sea_ray.tune.trials import latest_checkpoint, trial_folder

log = logging.getLogger(__name__)

LAST_METRICS = ("val_sea_loss", "val_word_acc", "val_lm_loss", "loss_lm", "loss_sea", "temperature", "lr")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def trial_records(cfg: TuneConfig, results, trials_root: str, total_steps: int) -> tuple[list[dict], list[dict]]:
    """(one row per trial, every reported result) from Tune's ResultGrid and the trial folders."""
    rows, history_rows = [], []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or str(result.path).rstrip("/").split("/")[-1]
        folder = trial_folder(trials_root, trial_id)
        history = folder.history()
        if not history and result.metrics_dataframe is not None and "step" in result.metrics_dataframe:
            frame = result.metrics_dataframe.drop_duplicates("step", keep="last")
            history = [{k: v for k, v in r.items() if not str(k).startswith("config/")}
                       for r in frame.to_dict("records")]
        for h in history:
            history_rows.append({"trial_id": trial_id, **{k: h.get(k) for k in ("step", "timestamp", *LAST_METRICS)}})
        last = history[-1] if history else {}
        values = [h[cfg.metric] for h in history if _finite(h.get(cfg.metric))]
        steps = int(last.get("step", 0))
        status = ("error" if result.error else "completed" if steps >= total_steps
                  else "stopped" if history else "pending")
        params = params_of(cfg, result.config or {}) or folder.params()
        row = {"trial_id": trial_id, "status": status, "steps": steps, "total_steps": total_steps,
               "reports": len(history), "executions": len(folder.executions()), **params,
               cfg.metric: last.get(cfg.metric),
               f"best_{cfg.metric}": (min(values) if cfg.mode == "min" else max(values)) if values else None}
        row.update({f"last_{k}": last.get(k) for k in LAST_METRICS if k != cfg.metric})
        error = str(result.error).strip().splitlines()[-1][:500] if result.error else None
        row.update({"time_s": sum(_execution_times(folder, history)), "checkpoint": latest_checkpoint(folder),
                    "trial_dir": folder.uri, "error": error})
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows, history_rows


def _execution_times(folder, history: list[dict]) -> list[float]:
    """Seconds each execution of a trial trained: from its start to its last report."""
    starts = sorted(e["started"] for e in folder.executions())
    times = sorted(h["timestamp"] for h in history if _finite(h.get("timestamp")))
    spans = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        inside = [t for t in times if start <= t < end]
        spans.append(max(inside) - start if inside else 0.0)
    return spans or [0.0]


def _folder_names(trials_root: str) -> list[str]:
    fs, path = storage.fsspec_fs(trials_root)
    try:
        return [p.rstrip("/").split("/")[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def best_row(cfg: TuneConfig, rows: list[dict]) -> Optional[dict]:
    """The completed trial with the best last metric (any trial if none completed)."""
    scored = [r for r in rows if _finite(r.get(cfg.metric))]
    pool = [r for r in scored if r["status"] == "completed"] or scored
    best = None
    for row in pool:
        if best is None or _better(row[cfg.metric], best[cfg.metric], cfg.mode):
            best = row
    return best


def best_config(cfg: TuneConfig, row: dict) -> dict:
    """The best trial's align config, as plain data, validated; its run name is
    ``<base.run.name>-best`` (the experiment folder keeps ``<base.run.name>``)."""
    params = {key: row[key] for key in cfg.space}
    raw = apply_params(cfg.base, params, **{"run.name": f"{cfg.base.run.name}-best"})
    validate(raw, job="align")  # what `sea-ray align --config best.yaml` will do
    return raw


def _table_bytes(rows: list[dict]) -> tuple[bytes, bytes]:
    import pandas as pd

    frame = pd.DataFrame(rows)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue(), frame.to_csv(index=False).encode()


def importances(cfg: TuneConfig, rows: list[dict], history_rows: list[dict]) -> dict[str, Any]:
    """Optuna parameter importances on a study rebuilt from the results.

    Trials stopped early reached fewer steps, so their last metric is not comparable with a
    completed trial's; every trial is scored at the same step instead: the last step that every
    trial with a result reached (ASHA's first rung when it stopped some)."""
    import optuna

    reached = [r["steps"] for r in rows if r["reports"]]
    if len(reached) < 2:
        return {"step": None, "trials": len(reached), "importances": {}, "evaluator": None,
                "note": "fewer than two trials with a result"}
    step = min(reached)
    value_at = {(h["trial_id"], h["step"]): h.get(cfg.metric) for h in history_rows}
    dists = optuna_distributions(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if cfg.mode == "min" else "maximize")
    for row in rows:
        value = value_at.get((row["trial_id"], step))
        if row["reports"] and _finite(value):
            study.add_trial(optuna.trial.create_trial(params={k: row[k] for k in cfg.space},
                                                      distributions=dists, value=float(value)))
    try:
        import sklearn  # noqa: F401 - fANOVA (optuna's default) needs scikit-learn

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as exc:
        return {"step": step, "trials": len(study.trials), "importances": {}, "evaluator": type(evaluator).__name__,
                "note": f"not computable: {exc}"}
    return {"step": step, "trials": len(study.trials), "evaluator": type(evaluator).__name__,
            "importances": {k: float(v) for k, v in found.items()}}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_metric(cfg: TuneConfig, rows: list[dict], history_rows: list[dict], best_id: Optional[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    style = {"completed": "-", "stopped": "--", "error": ":", "pending": ":"}
    for row in rows:
        points = sorted((h["step"], h[cfg.metric]) for h in history_rows
                        if h["trial_id"] == row["trial_id"] and _finite(h.get(cfg.metric)))
        if not points:
            continue
        xs, ys = zip(*points)
        best = row["trial_id"] == best_id
        ax.plot(xs, ys, style.get(row["status"], "-"), marker="o", markersize=3, linewidth=2.5 if best else 1,
                label=f"{row['trial_id']} ({row['status']}{', best' if best else ''})")
    ax.set_xlabel("training step")
    ax.set_ylabel(cfg.metric)
    ax.set_title(f"{cfg.metric} per trial ({cfg.searcher}{' + ASHA' if cfg.asha.enabled else ''})")
    if len(rows) <= 16:
        ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_importances(found: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(found["importances"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(items))))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items])
    else:
        ax.text(0.5, 0.5, found.get("note", "no importances"), ha="center", va="center")
    ax.set_xlabel(f"importance ({found.get('evaluator')}, at step {found.get('step')})")
    data = _png(fig)
    plt.close(fig)
    return data


def write_outputs(cfg: TuneConfig, exp_uri: str, results, trials_root: str, total_steps: int) -> dict:
    """Write every output listed in the module docstring; return the summary."""
    rows, history_rows = trial_records(cfg, results, trials_root, total_steps)
    parquet, csv = _table_bytes(rows)
    storage.write_bytes(storage.join(exp_uri, "results.parquet"), parquet)
    storage.write_bytes(storage.join(exp_uri, "results.csv"), csv)
    if history_rows:
        storage.write_bytes(storage.join(exp_uri, "history.parquet"), _table_bytes(history_rows)[0])
    best = best_row(cfg, rows)
    summary: dict[str, Any] = {
        "experiment": exp_uri, "metric": cfg.metric, "mode": cfg.mode, "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error", "pending")},
        "trial_steps": sum(r["steps"] for r in rows), "results": storage.join(exp_uri, "results.parquet"),
    }
    if best is not None:
        raw = best_config(cfg, best)
        header = (f"# Best trial {best['trial_id']} of {exp_uri}: {cfg.metric}={best[cfg.metric]:.6g} "
                  f"({best['status']}, {best['steps']} steps).\n# Run: sea-ray align --config best.yaml\n")
        storage.write_text(storage.join(exp_uri, "best.yaml"), header + yaml.safe_dump(raw, sort_keys=False))
        summary.update(best_trial=best["trial_id"], best_metric=best[cfg.metric],
                       best_params={k: best[k] for k in cfg.space}, best_checkpoint=best["checkpoint"],
                       best_config=storage.join(exp_uri, "best.yaml"))
    abandoned = sorted(set(_folder_names(trials_root)) - {r["trial_id"] for r in rows})
    if abandoned:  # started by an interrupted run after its last state snapshot: unknown to Tune
        log.warning("trial folders of trials this search does not know (started after the last snapshot of "
                    "an interrupted run): %s", ", ".join(abandoned))
        summary["abandoned_trial_dirs"] = abandoned
    found = importances(cfg, rows, history_rows)
    storage.write_text(storage.join(exp_uri, "importances.json"), json.dumps(found, indent=2))
    summary["importances"] = found["importances"]
    if cfg.plots:
        storage.write_bytes(storage.join(exp_uri, "plots", "metric_per_trial.png"),
                            plot_metric(cfg, rows, history_rows, best and best["trial_id"]))
        storage.write_bytes(storage.join(exp_uri, "plots", "param_importances.png"), plot_importances(found))
    storage.write_text(storage.join(exp_uri, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary
