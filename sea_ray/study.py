"""``sea-ray study``: the paper's questions in miniature, answered with paired measurements.

Run it::

    sea-ray study --config workflows/configs/study.yaml [dotted.key=value ...]

A study is a list of comparisons (``StudyConfig.comparisons``). Each comparison is one quickstart
(:mod:`sea_ray.quickstart`: world -> labels -> align -> instruct -> eval, a baseline arm and a
+SEA arm identical but for SEA, for every seed, each seed x arm chain a Ray task) with its own
settings: the study's ``base`` and then the comparison's ``set`` (dotted quickstart keys), run
into ``<output>/<name>/``. Comparisons that make the same world and labels share them
(``<output>/shared/``); ``llm_layers`` makes a world Llama of that depth the LLM of align and
instruct (the one sea_ray ships for 2, 4 and 8 layers, else trained once and cached under
``<output>/llms/``); ``baseline_from`` pairs a comparison with another one's baseline arm (the
sensitivity to SEA's own settings needs no new baseline: the baseline does not use them). A
re-run reuses every finished chain.

The report (``study.md``, ``study.json``, ``plots/``): per comparison and metric, the per-seed
paired differences +SEA - baseline (same seed: same world, initialisation and data order):
their mean, standard deviation, ``confidence`` interval (Student t), the paired t-test's p and
the exact sign-flip (permutation) test's p, how many seeds SEA won, and the mean relative gain;
grouped by the comparisons' ``question``. Nothing is asserted about the outcome: a gain that is
not there is reported as measured.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple, Optional

import numpy as np

from sea_ray import quickstart
from sea_ray.config.loading import flatten_dotted, set_dotted, to_dict, validate
from sea_ray.config.schema import QuickstartConfig, StudyConfig
from sea_ray.errors import ConfigError, SeaRayError
from sea_ray.eval.report import plot_bars
from sea_ray.presets import world_llm_config, world_llm_dir
from sea_ray.world.backbones import train_world_llm

log = logging.getLogger(__name__)

# (key, name, higher is better) of every metric the report compares; QA per type follows QA
METRICS = (("qa", "QA accuracy", True),
           *((f"qa_{t}", f"QA accuracy, {t}", True) for t in quickstart.QA_TYPES),
           ("nw_align", "nearest-word accuracy (align)", True),
           ("nw_final", "nearest-word accuracy (final)", True),
           ("tacs", "TACS", True),
           ("modality_gap", "modality gap", False),
           ("ppl_after", "world-text perplexity after instruct", False),
           ("ppl_english_after", "English perplexity after instruct", False))
HEADLINE = ("qa", "nw_align", "ppl_english_after")  # the summary table's columns
# quickstart keys the baseline arm does not use: a comparison that changes nothing else may borrow a baseline
SEA_ONLY_KEYS = ("sea", "labels", "labels_top_n", "labeler_features")
# ...and the keys that name a comparison's own run rather than its models (its folder, its arms, its seeds)
OWN_RUN_KEYS = ("output", "arms", "seeds")
LLM_DONE = "sea_ray_recipe.json"  # train_world_llm writes it last


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- the plan


def _quickstart_raw(cfg: StudyConfig, comparison) -> dict:
    raw: dict = {"job": "quickstart", "output": os.path.join(os.path.abspath(cfg.output), comparison.name)}
    for values in (cfg.base, comparison.set):
        for key, value in flatten_dotted(values).items():
            set_dotted(raw, key, value)
    if comparison.llm_layers:
        llm = {"model.llm.name_or_path": llm_dir(cfg, comparison.llm_layers)}
        for job in ("align", "instruct"):
            for key, value in llm.items():
                set_dotted(raw, f"set.{job}.{key}", value)
    if comparison.baseline_from:
        raw["arms"] = ["+SEA"]
    return raw


def llm_recipe(cfg: StudyConfig, layers: int) -> dict:
    """The keyword arguments of :func:`train_world_llm` for the study's world Llama of ``layers``
    decoder layers: the shipped 4-layer Llama's recipe at that depth, with the study's ``llm_train``."""
    defaults = {k: p.default for k, p in inspect.signature(train_world_llm).parameters.items()
                if k in ("seed", "batch_size", "lr", "weight_decay", "warmup_ratio")}
    return dict(defaults, num_images=cfg.llm_train.num_images, epochs=cfg.llm_train.epochs,
                config=world_llm_config(layers))


def trained_by(folder: str, recipe: dict) -> bool:
    """Whether the world Llama in ``folder`` is complete and was trained by ``recipe`` (what its
    ``sea_ray_recipe.json`` records)."""
    try:
        with open(os.path.join(folder, LLM_DONE)) as f:
            kept = json.load(f)
        train = kept["train"]
        return kept["config"] == recipe["config"] and all(
            train[{"seed": "world_seed"}.get(k, k)] == v for k, v in recipe.items() if k != "config")
    except (OSError, ValueError, KeyError, TypeError):
        return False


def llm_dir(cfg: StudyConfig, layers: int) -> str:
    """The world Llama of ``layers`` layers for this study: the one sea_ray ships
    (:func:`sea_ray.presets.world_llm_dir`) where it was trained by :func:`llm_recipe`, else
    ``<output>/llms/world-llama-<layers>l`` (trained once by the study)."""
    shipped = world_llm_dir(layers)
    if trained_by(shipped, llm_recipe(cfg, layers)):
        return shipped
    return os.path.join(os.path.abspath(cfg.output), "llms", f"world-llama-{layers}l")


class Planned(NamedTuple):
    quickstart: QuickstartConfig
    llm: Optional[str]  # the LLM its align and instruct start from (name or path); None: the preset's default
    built: dict  # quickstart.build_configs of it, every model folder checked (quickstart.check)


def plan(cfg: StudyConfig, inputs: bool = True) -> dict[str, Planned]:
    """Every comparison's quickstart config, validated with every job config it runs and the model
    folders they start from (``inputs=False``: not those; no Ray, no writes); one ConfigError lists
    every problem."""
    problems: list[str] = []
    names = [c.name for c in cfg.comparisons]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"comparisons: {name!r} is named twice")
    out: dict[str, Planned] = {}
    for i, comparison in enumerate(cfg.comparisons):
        where = f"comparisons.{i} ({comparison.name})"
        # its world Llama, if the study trains it, is trained before its chains run
        trained_here = frozenset([llm_dir(cfg, comparison.llm_layers)] if comparison.llm_layers else [])
        try:
            qs = validate(_quickstart_raw(cfg, comparison), job="quickstart")
            built = quickstart.check(qs, made_here=trained_here, inputs=inputs)
        except ConfigError as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
            continue
        out[comparison.name] = Planned(qs, built["chains"][0]["align"].model.llm.name_or_path or None, built)
    for comparison in cfg.comparisons:
        other = comparison.baseline_from
        if other is None or comparison.name not in out:
            continue
        if other not in out:
            problems.append(f"comparisons ({comparison.name}): baseline_from names no valid comparison: {other!r}")
            continue
        if "baseline" not in out[other].quickstart.arms:
            problems.append(f"comparisons ({comparison.name}): baseline_from {other!r} trains no baseline arm")
        mine, theirs = to_dict(out[comparison.name].quickstart), to_dict(out[other].quickstart)
        differ = sorted(k for k in set(mine) | set(theirs)
                        if k not in SEA_ONLY_KEYS + OWN_RUN_KEYS and mine.get(k) != theirs.get(k))
        if differ:
            problems.append(f"comparisons ({comparison.name}): baseline_from {other!r} differs in "
                            f"{', '.join(differ)}, which the baseline arm uses: pair it with a baseline of its own")
        missing = sorted(set(out[comparison.name].quickstart.seeds) - set(out[other].quickstart.seeds))
        if missing:
            problems.append(f"comparisons ({comparison.name}): baseline_from {other!r} has no seeds {missing}")
    if problems:  # one line per problem, not one per seed x arm chain that has it
        raise ConfigError(list(dict.fromkeys(re.sub(r"\[(baseline|sea)-s\d+\]", "[*]", p) for p in problems)))
    return out


def _share_key(qs: QuickstartConfig) -> str:
    """What a quickstart's world and labels depend on: comparisons with the same key share them."""
    d = to_dict(qs)
    keyed = {k: d[k] for k in ("world", "preset", "labels", "labels_top_n", "labeler_features")}
    keyed["set.labels"] = d["set"].get("labels", {})
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def _link_shared(cfg: StudyConfig, qs: QuickstartConfig) -> None:
    """Point the comparison's world and labels folders at the shared ones for its key (made by
    the first comparison that needs them; the quickstart reuses what is complete)."""
    shared = os.path.join(os.path.abspath(cfg.output), "shared", _share_key(qs))
    out = os.path.abspath(qs.output)
    os.makedirs(out, exist_ok=True)
    for part in ("world", "labels"):
        target, link = os.path.join(shared, part), os.path.join(out, part)
        os.makedirs(target, exist_ok=True)
        if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target):
            continue
        if os.path.lexists(link):
            raise ConfigError([f"{link} exists and is not the study's shared {part}: delete it or use another output"])
        os.symlink(target, link)


def _train_llm(cfg: StudyConfig, layers: int, slots: quickstart.Slots, ray) -> float:
    """A world Llama of ``layers`` decoder layers (the shipped LLM's recipe, another depth), trained
    once as a Ray task of one CPU, holding one of the study's slots; returns its seconds (0: cached)."""
    out, recipe = llm_dir(cfg, layers), llm_recipe(cfg, layers)
    if trained_by(out, recipe):
        return 0.0
    if os.path.exists(os.path.join(out, LLM_DONE)):
        raise ConfigError([f"{out} holds a world Llama trained with other settings than llm_train's: delete it or "
                           "use another output"])
    with slots.hold(-1):  # before any chain: the longest single task of the study starts first
        t = time.time()
        _say(f"study: training a {layers}-layer world Llama on world text -> {out}")
        task = ray.remote(num_cpus=1, max_retries=0)(train_world_llm)
        ray.get(task.remote(out, threads=1, **recipe))
        _say(f"study: {layers}-layer world Llama trained ({time.time() - t:.0f}s)")
        return time.time() - t


# --------------------------------------------------------------------------- statistics


def paired(baseline: list[float], sea: list[float], confidence: float = 0.95) -> dict:
    """The paired comparison of per-seed values (the same seeds, in the same order): mean and
    std of the differences sea - baseline, their Student-t ``confidence`` interval, the paired
    t-test's two-sided p and the exact sign-flip test's (every +/- assignment of the
    differences; with n seeds the smallest p it can give is 2 / 2^n), seeds won, relative gain."""
    from scipy import stats

    b, s = np.asarray(baseline, dtype=float), np.asarray(sea, dtype=float)
    if b.shape != s.shape or b.size == 0:
        raise ValueError(f"paired values need the same seeds: {b.size} baseline vs {s.size} +SEA")
    d = s - b
    n = int(d.size)
    out = {"n": n, "baseline_mean": float(b.mean()), "sea_mean": float(s.mean()), "diff_mean": float(d.mean()),
           "diff_std": float(d.std(ddof=1)) if n > 1 else None, "ci_low": None, "ci_high": None, "p_t": None,
           "p_sign_flip": None, "sea_wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
           "relative_gain": float(d.mean() / b.mean()) if b.mean() != 0 else None}
    if n > 1 and out["diff_std"] > 1e-12 * max(1.0, abs(out["diff_mean"])):  # else: float noise of equal gains
        test = stats.ttest_rel(s, b)
        ci = test.confidence_interval(confidence)
        out.update(p_t=float(test.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    elif n > 1:  # every seed moved by the same amount
        out.update(ci_low=out["diff_mean"], ci_high=out["diff_mean"], p_t=0.0 if out["diff_mean"] != 0 else 1.0)
    if n > 1:
        observed = abs(d.mean())
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        flipped = np.abs((signs * d).mean(axis=1))
        out["p_sign_flip"] = float(np.mean(flipped >= observed - 1e-12))
    return out


# --------------------------------------------------------------------------- the run and its report


def _rows(qs_out: str) -> dict[str, dict[int, dict]]:
    with open(os.path.join(qs_out, "results.json")) as f:
        results = json.load(f)["results"]
    rows: dict[str, dict[int, dict]] = {}
    for r in results:
        rows.setdefault(r["arm"], {})[int(r["seed"])] = r
    return rows


def _machines(records: list[str]) -> dict[str, int]:
    """How many of the chains recorded in ``records`` (their ``chain.json``) each machine made."""
    counts: dict[str, int] = {}
    for path in records:
        try:
            with open(path) as f:
                m = json.load(f).get("machine")
        except FileNotFoundError:
            m = None
        name = f"{m['cpu']} ({m['cpu_capability']}, torch {m['torch']})" if m else "not recorded"
        counts[name] = counts.get(name, 0) + 1
    return counts


def _llm_params(llm: Optional[str]) -> Optional[int]:
    """Parameters of an LLM (from its config, on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not llm:
        return None
    try:
        config = AutoConfig.from_pretrained(llm)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return int(sum(p.numel() for p in model.parameters()))
    except (OSError, ValueError) as exc:
        log.warning("no parameter count for %s: %s", llm, exc)
        return None


def compare(cfg: StudyConfig, plans: dict[str, Planned]) -> list[dict]:
    """Per comparison: its settings, per-seed rows of both arms, and the paired statistics per metric."""
    rows_of = {name: _rows(os.path.abspath(p.quickstart.output)) for name, p in plans.items()}
    out = []

    def _record(name: str, arm: str, seed: int) -> str:  # where a chain of the plan keeps its record
        return quickstart.chain_record_path(
            next(ch for ch in plans[name].built["chains"] if ch["arm"] == arm and ch["seed"] == seed))

    for c in cfg.comparisons:
        qs = plans[c.name].quickstart
        sea = rows_of[c.name]["+SEA"]
        base = rows_of[c.baseline_from or c.name]["baseline"]
        seeds = [s for s in qs.seeds if s in sea and s in base]
        stats_ = {}
        for key, _, _ in METRICS:
            pairs = [(base[s].get(key), sea[s].get(key)) for s in seeds]
            pairs = [(b, v) for b, v in pairs if b is not None and v is not None]
            stats_[key] = paired([b for b, _ in pairs], [v for _, v in pairs], cfg.confidence) if pairs else None
        out.append({"name": c.name, "question": c.question, "set": c.set, "llm_layers": c.llm_layers,
                    "baseline_from": c.baseline_from, "preset": qs.preset, "seeds": seeds,
                    "llm_parameters": _llm_params(plans[c.name].llm), "stats": stats_,
                    "chain_cpu_s": round(sum(r.get("cpu_seconds") or 0 for arm in rows_of[c.name].values()
                                             for r in arm.values()), 1),
                    "machines": _machines([_record(c.name, "+SEA", s) for s in seeds]
                                          + [_record(c.baseline_from or c.name, "baseline", s) for s in seeds]),
                    "per_seed": {str(s): {"baseline": base[s], "+SEA": sea[s]} for s in seeds}})
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _digits(key: str) -> int:
    return 1 if key.startswith("ppl") else 3


def render(cfg: StudyConfig, comparisons: list[dict], timings: dict) -> str:
    level = int(round(cfg.confidence * 100))
    lines = ["# sea-ray study: SEA against the baseline, paired over seeds", "",
             f"Each comparison trains a baseline and a +SEA model per seed, identical but for SEA; every number "
             f"below is over the seeds' paired differences +SEA - baseline: mean, {level}% confidence interval "
             "(Student t), the paired t-test's p and the exact sign-flip test's p (with n seeds its smallest "
             "possible value is 2/2^n), and the seeds SEA won. Perplexities: lower is better.", "",
             "## Summary", "",
             "| comparison | question | seeds | LLM parameters | "
             + " | ".join(f"{dict((k, n) for k, n, _ in METRICS)[k]}: diff [{level}% CI] (p sign-flip)" for k in HEADLINE)
             + " |", "|" + "---|" * (4 + len(HEADLINE))]
    for c in comparisons:
        cells = []
        for key in HEADLINE:
            s = c["stats"].get(key)
            d = _digits(key)
            cells.append("-" if s is None else f"{s['diff_mean']:+.{d}f} [{_fmt(s['ci_low'], d)}, "
                         f"{_fmt(s['ci_high'], d)}] ({_fmt(s['p_sign_flip'], 3)})")
        params = f"{c['llm_parameters']:,}" if c["llm_parameters"] else "-"
        lines.append(f"| {c['name']} | {c['question'] or '-'} | {len(c['seeds'])} | {params} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    for question in dict.fromkeys(c["question"] for c in comparisons):
        lines += [f"## {question or 'comparisons'}", ""]
        for c in (c for c in comparisons if c["question"] == question):
            settings = json.dumps(c["set"], sort_keys=True) if c["set"] else "the base settings"
            lines += [f"### {c['name']}", "",
                      f"Preset `{c['preset']}`" + (f", a {c['llm_layers']}-layer world Llama" if c["llm_layers"] else "")
                      + f"; settings {settings}; seeds {c['seeds']}"
                      + (f"; baseline arm from `{c['baseline_from']}`" if c["baseline_from"] else "") + ".", "",
                      f"| metric | baseline | +SEA | diff | {level}% CI | relative | p (t) | p (sign-flip) | SEA won |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for key, name, _ in METRICS:
                s = c["stats"].get(key)
                if s is None:
                    continue
                d = _digits(key)
                rel = "-" if s["relative_gain"] is None else f"{100 * s['relative_gain']:+.1f}%"
                lines.append(f"| {name} | {_fmt(s['baseline_mean'], d)} | {_fmt(s['sea_mean'], d)} | "
                             f"{s['diff_mean']:+.{d}f} | [{_fmt(s['ci_low'], d)}, {_fmt(s['ci_high'], d)}] | {rel} | "
                             f"{_fmt(s['p_t'])} | {_fmt(s['p_sign_flip'])} | {s['sea_wins']}/{s['n']} |")
            lines.append("")
    lines += ["## Plots", "", "![QA gain](plots/qa_gain.png)", "", "![nearest-word gain](plots/nw_gain.png)", "",
              "## Time (s)", "",
              "Wall time of each part; the comparisons and the Llamas' training overlap (they share the CPUs), "
              "`total` is the study's. A reused chain or Llama counts only its check.", "",
              "| " + " | ".join(timings) + " |", "|" + "---|" * len(timings),
              "| " + " | ".join(f"{v:.0f}" for v in timings.values()) + " |", "",
              "CPU time of each comparison's own chains (training and eval, as measured in their tasks; on an idle "
              "machine a chain's wall time on one CPU):", "",
              "| " + " | ".join(c["name"] for c in comparisons) + " |", "|" + "---|" * len(comparisons),
              "| " + " | ".join(f"{c['chain_cpu_s']:.0f}" for c in comparisons) + " |", "",
              f"In all {sum(c['chain_cpu_s'] for c in comparisons):.0f} CPU-seconds of chains (reused chains "
              "count with the CPU time they took when they ran).", "",
              "## Machines", "",
              "Where each comparison's chains were made (a chain is reproducible to the last digit on one machine, "
              "not across CPUs):", "",
              "| comparison | machine: chains |", "|---|---|",
              *(f"| {c['name']} | " + "; ".join(f"{m}: {n}" for m, n in c["machines"].items()) + " |"
                for c in comparisons), "",
              "Per comparison: `<name>/report.md` (its quickstart table), `<name>/results.json` (every seed).", ""]
    return "\n".join(lines)


def _gain_plot(comparisons: list[dict], key: str, title: str) -> Optional[bytes]:
    means, errors = {"+SEA - baseline": {}}, {"+SEA - baseline": {}}
    for c in comparisons:
        s = c["stats"].get(key)
        if s is None:
            continue
        means["+SEA - baseline"][c["name"]] = s["diff_mean"]
        half = (s["ci_high"] - s["ci_low"]) / 2 if s["ci_low"] is not None else 0.0
        errors["+SEA - baseline"][c["name"]] = half
    if not means["+SEA - baseline"]:
        return None
    return plot_bars(means, title, "difference", errors, ("no difference", 0.0))


def run_order(cfg: StudyConfig) -> list:
    """The comparisons in the config's order, but each one that borrows a baseline right after its
    lender if the lender comes later (so the config's order says what is measured first)."""
    done: set[str] = set()
    order: list = []
    waiting = list(cfg.comparisons)
    while waiting:
        c = next(c for c in waiting if c.baseline_from is None or c.baseline_from in done)
        waiting.remove(c)
        order.append(c)
        done.add(c.name)
    return order


def _shared_first(order: list, plans: dict[str, Planned]) -> list:
    """The first comparison (in run order) of every shared world and labels dataset."""
    seen: dict[str, object] = {}
    for c in order:
        seen.setdefault(_share_key(plans[c.name].quickstart), c)
    return list(seen.values())


def run(cfg: StudyConfig) -> dict:
    """The study (module docstring); returns the summary written to ``study.json``.

    First, one at a time, every world and labels dataset the comparisons share (the quickstart's
    steps 1-2). Then everything else side by side in this process, one thread per comparison and
    per world Llama to train, sharing the Ray cluster's CPUs as slots: a chain or a Llama's
    training holds one while it runs, and a free slot goes to the Llamas first, then to the
    comparisons in run order; a comparison of ``llm_layers`` starts once its Llama is trained."""
    t0 = time.time()
    plans = plan(cfg)  # every comparison and job config validated before anything runs
    out = os.path.abspath(cfg.output)
    os.makedirs(out, exist_ok=True)
    order = run_order(cfg)
    _say(f"sea-ray study -> {out}: {len(plans)} comparisons "
         f"({sum(len(p.quickstart.seeds) * len(p.quickstart.arms) for p in plans.values())} seed x arm chains)")
    timings: dict[str, float] = {}
    for c in order:
        _link_shared(cfg, plans[c.name].quickstart)
    t = time.time()
    prepared: dict[str, dict] = {}  # the comparisons whose world and labels were made here: not prepared again
    for c in _shared_first(order, plans):
        with quickstart.labelled(f"[{c.name}] "):
            prepared[c.name] = quickstart.prepare(plans[c.name].quickstart, plans[c.name].built)
    timings["world+labels"] = time.time() - t
    ray = next(iter(prepared.values()))["ray"]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    slots = quickstart.Slots.of_cluster(ray, max(p.quickstart.cpus_per_task for p in plans.values()))
    _say(f"\nstudy: {len(order)} comparisons side by side on {cpus} CPUs")

    def comparison(i: int, c, llms: dict) -> float:
        if c.llm_layers:
            llms[c.llm_layers].result()
        with quickstart.labelled(f"[{c.name}] "):
            _say(f"study [{i + 1}/{len(order)}] {c.name}" + (f" ({c.question})" if c.question else ""))
            started = time.time()
            quickstart.run(plans[c.name].quickstart, slots=slots, priority=i, prepared=prepared.get(c.name),
                           plan=plans[c.name].built)
            _say(f"study [{i + 1}/{len(order)}] {c.name} done ({time.time() - started:.0f}s)")
            return time.time() - started

    layers = sorted({c.llm_layers for c in cfg.comparisons if c.llm_layers}, reverse=True)
    failed: list[str] = []
    pool = ThreadPoolExecutor(max_workers=len(layers) + len(order), thread_name_prefix="study")
    try:
        llms = {n: pool.submit(_train_llm, cfg, n, slots, ray) for n in layers}
        runs = {c.name: pool.submit(comparison, i, c, llms) for i, c in enumerate(order)}
        pending = set(llms.values()) | set(runs.values())
        while pending:  # a wait with a timeout, so that Ctrl-C reaches this thread at once
            _, pending = wait(pending, timeout=1.0)
        for n, future in llms.items():
            if future.exception() is None:
                timings[f"llm-{n}l"] = future.result()
        for name, future in runs.items():
            if future.exception() is None:
                timings[name] = future.result()
            else:
                failed.append(name)
                log.error("study: comparison %s failed: %s", name, future.exception())
    except BaseException:  # Ctrl-C: stop the threads' Ray calls rather than wait for every chain
        pool.shutdown(wait=False, cancel_futures=True)
        ray.shutdown()
        raise
    pool.shutdown()
    if failed:
        raise SeaRayError(f"study: {len(failed)} comparison(s) failed: {', '.join(failed)} (the others' chains are "
                          "kept: fix and re-run the same command, which reuses every finished chain)")
    comparisons = compare(cfg, plans)
    timings["total"] = time.time() - t0
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    for name, key, title in (("qa_gain.png", "qa", "QA accuracy: +SEA - baseline"),
                             ("nw_gain.png", "nw_align", "nearest-word accuracy (align): +SEA - baseline")):
        png = _gain_plot(comparisons, key, f"{title} (mean, {int(round(cfg.confidence * 100))}% CI)")
        if png:
            with open(os.path.join(plots, name), "wb") as f:
                f.write(png)
    report = {"config": to_dict(cfg), "comparisons": comparisons, "timings_s": {k: round(v, 1) for k, v in
                                                                              timings.items()}}
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = render(cfg, comparisons, timings)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(md)
    _say("\n" + md.split("## Summary", 1)[1].split("\n## ", 1)[0].strip())
    _say(f"\nreport: {os.path.join(out, 'study.md')}   wall time {timings['total']:.0f}s")
    return {"output": out, "report": os.path.join(out, "study.md"), "timings_s": report["timings_s"]}
