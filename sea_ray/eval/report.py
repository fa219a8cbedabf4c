"""Reports: the eval job's JSON + Markdown + PNG plots, loss curves read back from TensorBoard
event files, and the paper-shaped table (rows baseline / +SEA, mean +- std over seeds)."""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Optional, Sequence

from sea_ray import paths, storage

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, PREDICTIONS = "report.json", "report.md", "predictions.jsonl"

PLOTS = "plots"


# --------------------------------------------------------------------------- TensorBoard


def read_scalars(run_uri: str, prefix: str = "train/") -> dict[str, list[tuple[int, float]]]:
    """``{tag without prefix: [(step, value), ...]}`` from a run folder's ``tensorboard/`` event
    files (local or s3://), sorted by step, the last value kept for a repeated step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = storage.join(run_uri, "tensorboard")
    if not storage.exists(tb):
        return {}
    local = storage.local_copy(tb)
    acc = EventAccumulator(local, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith(prefix):
            continue
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        out[tag[len(prefix):]] = sorted(by_step.items())
    return out


def run_of(checkpoint_uri: str) -> str:
    """The run folder of a checkpoint URI (its parent when it is a step folder)."""
    from sea_ray.train.checkpoint import STEP_DIR

    parts = checkpoint_uri.rstrip("/").rsplit("/", 1)
    return parts[0] if len(parts) == 2 and STEP_DIR.match(parts[1]) else checkpoint_uri.rstrip("/")


def curve_runs(report: dict, config: dict, extra: Sequence[str] = ()) -> list[str]:
    """The runs whose curves a report shows: the checkpoint's run, its align run (instruct), extras."""
    runs = []
    if config.get("job") == "instruct" and config.get("init_adapter"):
        runs.append(run_of(config["init_adapter"]))
    runs.append(run_of(report["checkpoint"]))
    runs.extend(extra)
    return list(dict.fromkeys(runs))


# --------------------------------------------------------------------------- plots


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, dict[str, list]], keys: Sequence[str] = ("loss_lm", "loss_sea")) -> Optional[bytes]:
    """One panel per run: the given scalars against the optimizer step."""
    curves = {run: c for run, c in curves.items() if any(k in c for k in keys)}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (run, scalars) in zip(axes[0], curves.items()):
        for key in keys:
            if key in scalars:
                steps, values = zip(*scalars[key])
                ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(run.rstrip("/").rsplit("/", 1)[-1], fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _figure_bytes(fig)


def plot_bars(groups: dict[str, dict[str, float]], title: str, ylabel: str, errors: Optional[dict] = None,
              reference: Optional[tuple[str, float]] = None) -> bytes:
    """Grouped bars: ``groups[series][category] = value`` (``errors`` alike, optional)."""
    plt = _plt()
    categories = list(dict.fromkeys(c for series in groups.values() for c in series))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(categories) * max(1, len(groups)) + 1.5), 3.2))
    width = 0.8 / max(1, len(groups))
    for k, (series, values) in enumerate(groups.items()):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(categories))]
        ys = [values.get(c, float("nan")) for c in categories]
        err = [errors[series].get(c, 0.0) for c in categories] if errors and series in errors else None
        ax.bar(xs, ys, width=width, yerr=err, capsize=3 if err else 0, label=series)
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", linewidth=1, label=reference[0])
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=8, rotation=20 if len(categories) > 5 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _figure_bytes(fig)


def plot_audit(audit: dict) -> bytes:
    """Patch-label precision@1 per labeler variant, with the chance and constant-word baselines."""
    rows = audit["results"]
    values = {f"{r['features']}/{r['score_sign']}": (r["precision_at_1"] or 0.0) for r in rows}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.axhline(audit["chance_precision_at_1"], color="gray", linestyle="--", linewidth=1, label="random word")
    constant = audit.get("one_word_precision_at_1")
    if constant is not None:
        ax.axhline(constant, color="tab:red", linestyle=":", linewidth=1, label=f"'{audit.get('one_word')}' everywhere")
    ax.set_ylim(0, 1)
    ax.set_ylabel("precision@1")
    ax.set_title(f"label audit ({audit['images']} images, {audit['grid'][0]}x{audit['grid'][1]} patches)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _figure_bytes(fig)


# --------------------------------------------------------------------------- the eval report


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _audit_for(report: dict, cfg) -> Optional[dict]:
    uri = cfg.audit
    labels = cfg.vocab if cfg.vocab and not cfg.vocab.endswith(".json") else getattr(cfg.data, "labels", None)
    if uri is None and labels:
        candidate = storage.join(labels, "_audit.json")
        uri = candidate if storage.exists(candidate) else None
    if uri is None:
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (OSError, ValueError) as exc:
        log.warning("label audit %s unreadable (%s): not plotted", uri, exc)
        return None


def _data_lines(report: dict) -> list[str]:
    if "world" in report:
        return [f"- data: `{report['world']}`, split `{report['split']}`, {report['images']} images"]
    data, rows = report["data"], report.get("rows", {})
    lines = [f"- {name}: `{data[key]}` ({rows.get(name, 0)} rows)"
             for name, key in (("captions", "manifest"), ("conversations", "conversations")) if key in data]
    lines += [f"- {key.replace('_', ' ')}: `{data[key]}`"
              for key in ("image_root", "conversations_image_root", "labels") if key in data]
    if report.get("errors"):
        lines.append(f"- skipped: {len(report['errors'])} rows or images (their reasons: `errors` in report.json)")
    return lines


def _lm_loss_lines(m: dict) -> list[str]:
    lines = ["## Held-out LM loss (the training objective, images in place)", "",
             "| data | preprocessed as | rows | tokens | loss (start) | loss (checkpoint) | perplexity (start) | "
             "perplexity (checkpoint) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in m["sets"].items():
        before = s["before"] or {}
        lines.append(f"| {name} | {s['preprocessed_as']} | {s['rows']} | {s['tokens']} | "
                     f"{_fmt(before.get('loss_lm'))} | {_fmt(s['after']['loss_lm'])} | {_fmt(before.get('ppl'), 3)} | "
                     f"{_fmt(s['after']['ppl'], 3)} |")
    return lines + ["", f"Mean negative log-likelihood per supervised token. Start: {m['before_is']}.", ""]


def _alignment_lines(a: dict) -> list[str]:
    lines = ["## Alignment diagnostics (adapter outputs)", "", "| metric | value |", "|---|---|"]
    if a.get("truth") == "labels":
        lines += [f"| nearest word = the labels' top-1 | {_fmt(a['nearest_word_accuracy'])} |",
                  f"| chance (random word) | {_fmt(a['nearest_word_chance'])} |",
                  f"| nearest word in the labels' top-{a['top_n']} | {_fmt(a['nearest_word_in_top_n'])} |",
                  f"| chance (random word) | {_fmt(a['nearest_word_in_top_n_chance'])} |"]
    else:
        lines += [f"| nearest-word accuracy | {_fmt(a['nearest_word_accuracy'])} |",
                  f"| chance (random word) | {_fmt(a['nearest_word_chance'])} |"]
    lines += [f"| TACS (top-{a['top_k']}) | {_fmt(a['tacs'])} |", f"| modality gap | {_fmt(a['modality_gap'])} |", ""]
    groups = ", ".join(f"{g} {_fmt(v['accuracy'])} ({v['patches']} patches)"
                       for g, v in a["nearest_word_by_group"].items())
    lines.append((f"By patch kind: {groups}. " if groups else f"{a['patches']} labelled patches of {a['images']} "
                  "images. ") + f"Vocabulary: {a['vocab_size']} words ({a['vocab_source']}); "
                 f"most predicted: {', '.join(f'{w} {s:.2f}' for w, s in a['most_predicted'])}.")
    return lines + [""]


def to_markdown(report: dict, plots: dict[str, str]) -> str:
    lines = [f"# Evaluation: {report.get('run') or report['checkpoint']}", "",
             f"- checkpoint: `{report['checkpoint']}` ({report['stage']}, step {report['step']})",
             *_data_lines(report), ""]
    if report.get("lm_loss"):
        lines += _lm_loss_lines(report["lm_loss"])
    a = report.get("alignment")
    if a:
        lines += _alignment_lines(a)
    q = report.get("qa")
    if q and "vqa_accuracy" in q:
        lines += ["## QA accuracy (greedy generation on the conversations, every human turn)", "",
                  "| score | accuracy | questions |", "|---|---|---|",
                  f"| exact match (normalised) | **{_fmt(q['accuracy'])}** | {q['count']} |",
                  f"| VQA accuracy (VQAv2 normalisation) | **{_fmt(q['vqa_accuracy'])}** | {q['count']} |", "",
                  f"{q['conversations']} conversations; every answer in predictions.jsonl.", ""]
    elif q:
        lines += ["## QA accuracy (greedy generation, exact match after normalisation)", "",
                  "| type | accuracy | questions |", "|---|---|---|",
                  f"| **all** | **{_fmt(q['accuracy'])}** | {q['count']} |"]
        lines += [f"| {t} | {_fmt(v['accuracy'])} | {v['count']} |" for t, v in q["by_type"].items()]
        lines.append("")
    p = report.get("perplexity")
    if p:
        sets = {"held-out text": p, **report.get("perplexity_texts", {})}
        lines += ["## Language retention (the LLM alone)", "",
                  "| text | base (before) | checkpoint (after) | tokens | texts |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(s['perplexity_before'], 3)} | {_fmt(s['perplexity_after'], 3)} | {s['tokens']} "
                  f"| {s['texts']} |" for name, s in sets.items()]
        lines += ["", "Perplexity of the LLM without images: the base LLM's, and the checkpoint's"
                  + ("" if p["llm_changed"] else " (this checkpoint does not change the LLM)") + ".", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    return "\n".join(lines)


def write_report(report: dict, cfg) -> dict:
    """Write ``report.json`` (no predictions), ``predictions.jsonl``, ``plots/*.png`` and
    ``report.md`` under ``cfg.output``; returns their URIs."""

    out = paths.absolute(cfg.output)
    storage.makedirs(out)
    config = {}
    try:
        from sea_ray.train.checkpoint import CONFIG_FILE

        config = json.loads(storage.read_text(storage.join(report["checkpoint"], CONFIG_FILE)))
    except (OSError, ValueError):
        pass
    plots: dict[str, str] = {}
    curves = {}
    for run in curve_runs(report, config, cfg.curves):
        try:
            curves[run] = read_scalars(run)
        except Exception as exc:  # a missing or unreadable event file only loses a plot
            log.warning("no loss curves from %s (%s)", run, exc)
    report["curves"] = {run: c for run, c in curves.items() if c}
    png = plot_curves(report["curves"])
    if png:
        plots["loss curves"] = f"{PLOTS}/loss_curves.png"
    pngs = {"loss curves": png}
    if report.get("qa") and "vqa_accuracy" in report["qa"]:
        q = report["qa"]
        pngs["QA accuracy"] = plot_bars({"exact match": {"all": q["accuracy"] or 0.0},
                                         "VQA": {"all": q["vqa_accuracy"] or 0.0}}, "QA accuracy", "accuracy")
        plots["QA accuracy"] = f"{PLOTS}/qa_accuracy.png"
    elif report.get("qa"):
        by_type = {t: v["accuracy"] for t, v in report["qa"]["by_type"].items()}
        pngs["QA accuracy by type"] = plot_bars({"accuracy": {"all": report["qa"]["accuracy"], **by_type}},
                                                "QA accuracy by question type", "exact match")
        plots["QA accuracy by type"] = f"{PLOTS}/qa_by_type.png"
    if report.get("lm_loss"):
        sets = report["lm_loss"]["sets"]
        series = {"checkpoint": {name: v["after"]["ppl"] for name, v in sets.items()}}
        if any(v["before"] for v in sets.values()):
            series = {"start": {name: v["before"]["ppl"] for name, v in sets.items() if v["before"]}, **series}
        pngs["held-out perplexity"] = plot_bars(series, "held-out perplexity (LM loss with images)", "perplexity")
        plots["held-out perplexity"] = f"{PLOTS}/lm_loss.png"
    audit = _audit_for(report, cfg)
    if audit:
        report["label_audit"] = audit
        pngs["label audit"] = plot_audit(audit)
        plots["label audit"] = f"{PLOTS}/label_audit.png"
    for name, rel in plots.items():
        storage.write_bytes(storage.join(out, rel), pngs[name])
    predictions = report.pop("predictions", None)
    if predictions is not None:
        storage.write_text(storage.join(out, PREDICTIONS), "".join(json.dumps(p) + "\n" for p in predictions))
    storage.write_text(storage.join(out, REPORT_MD), to_markdown(report, plots))
    storage.write_text(storage.join(out, REPORT_JSON), json.dumps(report, indent=1, default=str) + "\n")
    if predictions is not None:
        report["predictions"] = predictions
    return {"json": storage.join(out, REPORT_JSON), "markdown": storage.join(out, REPORT_MD),
            "plots": [storage.join(out, p) for p in plots.values()]}


# --------------------------------------------------------------------------- the paper's table


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value) of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def paper_table(rows: dict[str, list[dict]], columns: Sequence[tuple[str, str, int]]) -> str:
    """A Markdown table: one row per arm, one column per metric, ``mean ± std`` over seeds.

    ``rows[arm]`` = one flat metrics dict per seed; ``columns`` = (key, header, digits)."""
    head = "| model | " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for arm, per_seed in rows.items():
        cells = []
        for key, _, digits in columns:
            mean, std = mean_std([r.get(key) for r in per_seed])
            cells.append("-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
