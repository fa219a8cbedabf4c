"""``sea-ray quickstart``: the paper's table in miniature, offline, on a laptop's CPUs.

Run it (README line 1)::

    sea-ray quickstart [--config FILE] [dotted.key=value ...]     # e.g. seeds=[0] align.max_steps=50

Steps, each printed as it runs:

1. **world**: the synthetic world (``world.num_images`` 64 px images; train/val/test 80/10/10).
2. **labels**: the real labels job (``sea_ray.labels.job.run``: Ray Data, the preset's CLIP in an
   actor pool) on the training captions' vocabulary; then the label audit (precision@1 against the
   ground truth) on held-out test images.
3. **ingest**: Ray Data decodes and tokenizes the align set (images + captions + labels) and the
   instruct set (conversations) once (:func:`sea_ray.train.feed.materialize`); both are shared
   through the object store.
4. **train**: for every seed, two arms, identical but for SEA: ``baseline`` (``sea.enabled=false``)
   and ``+SEA``; each arm runs align then instruct (init from its align checkpoint) then eval.
5. **eval**: on the test split: nearest-word accuracy of the visual tokens after align and after
   instruct, TACS, modality gap, QA accuracy (greedy generation, per type), perplexity of the LLM
   on held-out text before and after instruct.
6. **table**: rows baseline / +SEA, columns the metrics, mean ± std over seeds; ``report.md``,
   ``results.json`` and ``plots/`` under ``output``.

Compute plan (``mode``): Ray Train costs ~8 s of start-up per ``fit()`` on a 2-core machine, and
3 seeds x 2 arms x 2 stages are 12 fits, so by default (``mode: tasks``) each seed x arm chain is
one Ray task (``cpus_per_task`` CPUs, as many at once as the local Ray has CPUs) that runs the very
same stage recipe in-process (:func:`sea_ray.train.loop.run_stage` with
:class:`~sea_ray.train.loop.LocalIO`), fed by the same feed in the same order as a Ray Train
worker (:mod:`sea_ray.train.feed`), from the shared preprocessed rows. ``mode: ray_train`` runs
every stage as a 1-worker ``TorchTrainer`` job instead (the ``sea-ray align``/``instruct`` path),
one after another. Both write the same run folders (checkpoints, TensorBoard events, config).

Re-running with the same ``output`` reuses what is complete: the world, the labels, and every
finished chain (its metrics, ``eval/<arm>-s<seed>/chain.json``, written last; nothing of it is run
again); an output made with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from sea_ray import checks, pipeline, storage
from sea_ray.checks import tower_image_size
from sea_ray.config.loading import flatten_dotted, path_fields, to_dict, validate
from sea_ray.config.schema import PipelineConfig, PipelineStepConfig, QuickstartConfig
from sea_ray.data import ingest
from sea_ray.errors import ConfigError, DataError
from sea_ray.eval.job import evaluate
from sea_ray.eval.report import mean_std, paper_table, plot_audit, plot_bars, plot_curves, read_scalars, write_report
from sea_ray.labels.job import run as run_labels
from sea_ray.model.vision import build_vision_tower
from sea_ray.runtime import init_ray
from sea_ray.train.data import preprocess_kwargs, source_of
from sea_ray.train.driver import run as train
from sea_ray.train.driver import run_uri
from sea_ray.train.feed import materialize
from sea_ray.world import audit as label_audit
from sea_ray.world.generator import ensure_world
from sea_ray.world.oracle import write_oracle_labels

log = logging.getLogger(__name__)

ARMS: tuple[tuple[str, str, bool], ...] = (("baseline", "baseline", False), ("+SEA", "sea", True))

# (key, header, digits) of the main table and of the per-type QA table
TABLE_COLUMNS = (
    ("nw_align", "nearest-word acc (align)", 3),
    ("nw_align_object", "nearest-word acc, object patches (align)", 3),
    ("nw_final", "nearest-word acc (final)", 3),
    ("tacs", "TACS", 3),
    ("modality_gap", "modality gap", 3),
    ("qa", "QA acc", 3),
    ("ppl_after", "perplexity after", 2),
    ("ppl_english_after", "English perplexity after", 1),
)
QA_TYPES = ("color", "shape", "count", "existence", "position")
ORACLE_TOP_N = 3  # a patch has at most two true words


_LABEL = threading.local()  # a prefix for this thread's lines (sea-ray study runs quickstarts side by side)


def _say(msg: str) -> None:
    prefix = getattr(_LABEL, "prefix", "")
    print("\n".join(prefix + line if line else line for line in msg.split("\n")) if prefix else msg, flush=True)


@contextmanager
def labelled(prefix: str):
    """Prefix every line this thread's quickstart prints (``[name] ``)."""
    old = getattr(_LABEL, "prefix", "")
    _LABEL.prefix = prefix
    try:
        yield
    finally:
        _LABEL.prefix = old


class Slots:
    """The CPU slots that the chains of one or several quickstarts share (thread-safe).

    A chain (or a driver step that keeps Ray busy, such as the ingest) holds one slot while it
    runs; a free slot goes to the waiting party of the lowest ``priority`` first (``sea-ray
    study`` passes each comparison's place in the run order, so the config's order says what
    is measured first). One quickstart alone has as many slots as Ray has CPUs per chain."""

    def __init__(self, n: int):
        self._lock = threading.Lock()
        self._free = max(1, int(n))
        self._wanting: Counter = Counter()

    @classmethod
    def of_cluster(cls, ray, cpus_per_chain: float) -> "Slots":
        """One slot per chain of ``cpus_per_chain`` CPUs that the connected Ray cluster holds."""
        return cls(int(ray.cluster_resources().get("CPU", 1)) // cpus_per_chain)

    def want(self, priority: float, wanting: bool = True) -> None:
        with self._lock:
            self._wanting[priority] += 1 if wanting else -1
            if self._wanting[priority] <= 0:
                del self._wanting[priority]

    def try_take(self, priority: float) -> bool:
        """Take a slot if one is free and no party of a lower priority value is waiting for one."""
        with self._lock:
            if self._free <= 0 or min(self._wanting, default=priority) < priority:
                return False
            self._free -= 1
            return True

    def give(self, n: int = 1) -> None:
        with self._lock:
            self._free += n

    @contextmanager
    def hold(self, priority: float = 0):
        """Wait for a slot, hold it for the ``with`` block."""
        self.want(priority)
        try:
            while not self.try_take(priority):
                time.sleep(0.2)
        finally:
            self.want(priority, False)
        try:
            yield
        finally:
            self.give()


# --------------------------------------------------------------------------- the plan


def _paths(cfg: QuickstartConfig) -> dict[str, str]:
    out = os.path.abspath(cfg.output)
    world = os.path.join(out, "world")
    return {"out": out, "world": world, "images": os.path.join(world, "images"),
            "labels": os.path.join(out, "labels"), "runs": os.path.join(out, "runs"),
            "eval": os.path.join(out, "eval")}


def build_configs(cfg: QuickstartConfig) -> dict:
    """Every job config of the quickstart, validated (no Ray, no writes): ``{"labels", "audit",
    "chains": [{"seed", "arm", "key", "align", "instruct", "eval", "eval_align"}]}``.

    Each is a pipeline step built by the pipeline's own wiring (:func:`sea_ray.pipeline.build_step_config`:
    inputs from the steps before it, outputs under ``output``): the quickstart adds only its
    settings (``extra``) and the user's ``set`` per job, as a pipeline's ``<step>.set``."""
    p = _paths(cfg)
    problems: list[str] = []
    pcfg = PipelineConfig(output=p["out"], ray=cfg.ray, data={"world": p["world"]},
                          **{job: PipelineStepConfig(set=cfg.set.get(job, {})) for job in cfg.set})
    data = pipeline.data_uris(pcfg)

    def step(name: str, so_far: dict, where: str, settings: dict, output: str):
        built = pipeline.build_step_config(name, pcfg, Path(p["out"]), data, so_far, problems,
                                           extra=flatten_dotted(settings), where=where)
        return pipeline.StepPlan(name, built, output if built is None else pipeline.output_of(name, built))

    labels = step("labels", {}, "labels", {
        "model": {"preset": cfg.preset}, "labeler": {"top_n": cfg.labels_top_n, "features": cfg.labeler_features},
        "compute": {"num_actors": 1, "cpus_per_actor": 1, "cpus_per_decode_task": 0.5}}, p["labels"])
    audit = None
    if labels.cfg is not None:  # the same labeler and vocabulary (written by the labels job) on held-out images
        audit = validate(dict(to_dict(labels.cfg),
                              data={"manifest": os.path.join(p["world"], "test", "pretrain.json"),
                                    "image_root": p["images"]},
                              vocab={"extra_words": os.path.join(p["labels"], "vocab_words.txt"),
                                     "min_count": 10**9}), job="labels")
    stored_top_n = cfg.labels_top_n if cfg.labels == "clip" else min(ORACLE_TOP_N, cfg.labels_top_n)
    chains = []
    for seed in cfg.seeds:
        for arm, key, sea_on in (a for a in ARMS if a[0] in cfg.arms):
            tag = f"{key}-s{seed}"
            common = {"model": {"preset": cfg.preset},
                      "scaling": {"num_workers": 1, "cpus_per_worker": cfg.cpus_per_task}}

            def stage(name: str, section, max_length: int, **more):
                steps = section.max_steps
                return {**common, "run": {"name": f"{name}-{tag}", "seed": seed}, "data": {"max_length": max_length},
                        "batch": {"global_size": section.global_batch, "per_worker": section.global_batch},
                        "optim": {"max_steps": steps, "lr": section.lr},
                        "checkpoint": {"every_n_steps": steps, "num_to_keep": 1},
                        "log_every_n_steps": max(1, steps // 5), **more}

            sea = dict(to_dict(cfg.sea), enabled=sea_on, top_n=min(cfg.sea.top_n, stored_top_n))
            align = step("align", {"labels": labels}, f"align[{tag}]", stage("align", cfg.align, 64, sea=sea),
                         os.path.join(p["runs"], f"align-{tag}"))
            instruct = step("instruct", {"labels": labels, "align": align}, f"instruct[{tag}]",
                            stage("instruct", cfg.instruct, 128), os.path.join(p["runs"], f"instruct-{tag}"))
            # the nearest-word vocabulary is the world's caption words (what the CLIP labels use too),
            # whatever the labels, so that runs with oracle labels compare
            ev = {"split": "test", "device": "cpu", "max_samples": cfg.eval_max_samples, "vocab": None,
                  "audit": os.path.join(p["labels"], "_audit.json")}
            evaluation = step("eval", {"labels": labels, "align": align, "instruct": instruct}, f"eval[{tag}]",
                              dict(ev, output=os.path.join(p["eval"], tag), perplexity_texts=["english"]), "")
            eval_align = step("eval", {"labels": labels, "align": align}, f"eval[{tag}/align]",
                              dict(ev, metrics=["alignment"], output=os.path.join(p["eval"], tag, "align")), "")
            chains.append({"seed": seed, "arm": arm, "key": tag, "align": align.cfg, "instruct": instruct.cfg,
                           "eval": evaluation.cfg, "eval_align": eval_align.cfg})
    if problems:
        raise ConfigError(problems)
    return {"labels": labels.cfg, "audit": audit, "chains": chains}


def model_fields(built: dict) -> list[tuple[str, str, str]]:
    """Every model folder (or hub id) the job configs of a :func:`build_configs` result start from,
    once each, keyed ``<job>.<field>``: the inputs of a quickstart that it does not make itself."""
    configs = [built["labels"]] + [chain[k] for chain in built["chains"] for k in ("align", "instruct", "eval")]
    found = {(f"{c.job}.{key}", value): role for c in configs if c is not None
             for key, value, role in path_fields(c) if role == "model"}
    return [(key, value, role) for (key, value), role in found.items()]


def check(cfg: QuickstartConfig, made_here: frozenset = frozenset(), inputs: bool = True) -> dict:
    """:func:`build_configs`, and every model folder it names checked (exists, holds a model and, for an
    LLM, a tokenizer that loads): one ConfigError lists every problem. ``made_here``: folders the caller
    makes before the chains run (``sea-ray study``'s world Llama), not checked; ``inputs=False``: no
    model folder checked (``sea-ray validate --skip-inputs``)."""
    built = build_configs(cfg)
    fields = [f for f in model_fields(built) if f[1] not in made_here] if inputs else []
    problems = checks.input_problems(fields)
    if problems:
        raise ConfigError(problems)
    return built


# --------------------------------------------------------------------------- one chain (seed x arm)


def _train_local(cfg, rows: dict, num_rows: int, progress: Callable[[dict], None], device: str = "cpu") -> dict:
    """One stage in this process: the stage recipe with LocalIO (same feed order and run folder
    as Ray Train's)."""
    from sea_ray.train.loop import LocalIO, run_stage, total_steps

    uri = run_uri(cfg)
    storage.makedirs(uri)
    storage.write_text(storage.join(uri, "config.json"), json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    steps = total_steps(cfg, num_rows)

    def on_report(metrics: dict) -> None:
        progress({"stage": cfg.job, "step": metrics.get("step"), "total": steps,
                  **{k: metrics[k] for k in ("loss_lm", "loss_sea", "temperature", "samples_per_s") if k in metrics}})

    return run_stage(cfg, LocalIO(uri, rows, num_rows, on_report, device=device))


def _evaluate(chain: dict, progress: Callable[[dict], None]) -> dict:
    """Eval of the align checkpoint (alignment) and of the instruct checkpoint (everything);
    writes both reports and returns the chain's flat metrics."""

    progress({"stage": "eval", "note": "align checkpoint"})
    rep_a = evaluate(chain["eval_align"], log_fn=lambda m: None)
    write_report(rep_a, chain["eval_align"])
    progress({"stage": "eval", "note": "instruct checkpoint (QA, perplexity)"})
    rep = evaluate(chain["eval"], log_fn=lambda m: None)
    write_report(rep, chain["eval"])
    flat = {"seed": chain["seed"], "arm": chain["arm"],
            "nw_align": rep_a["alignment"]["nearest_word_accuracy"],
            "nw_align_object": rep_a["alignment"]["nearest_word_by_group"].get("object", {}).get("accuracy"),
            "nw_align_background": rep_a["alignment"]["nearest_word_by_group"].get("background", {}).get("accuracy"),
            "nw_final": rep["alignment"]["nearest_word_accuracy"],
            "nw_chance": rep["alignment"]["nearest_word_chance"],
            "tacs": rep["alignment"]["tacs"], "modality_gap": rep["alignment"]["modality_gap"],
            "tacs_align": rep_a["alignment"]["tacs"], "modality_gap_align": rep_a["alignment"]["modality_gap"],
            "qa": rep["qa"]["accuracy"], "qa_questions": rep["qa"]["count"],
            "ppl_before": rep["perplexity"]["perplexity_before"], "ppl_after": rep["perplexity"]["perplexity_after"],
            "ppl_english_before": rep["perplexity_texts"]["english"]["perplexity_before"],
            "ppl_english_after": rep["perplexity_texts"]["english"]["perplexity_after"]}
    for t, v in rep["qa"]["by_type"].items():
        flat[f"qa_{t}"] = v["accuracy"]
    return flat


CHAIN_DONE = "chain.json"  # a chain's metrics and the settings they were made with, written when all of it is done


def chain_record_path(chain: dict) -> str:
    """Where a chain of :func:`build_configs` keeps its record (metrics, fingerprint, machine)."""
    return storage.join(chain["eval"].output, CHAIN_DONE)


def _chain_record(chain: dict) -> tuple[str, str]:
    """(where a chain's metrics are kept, the fingerprint of every job config it runs)."""
    configs = {k: to_dict(chain[k]) for k in ("align", "instruct", "eval", "eval_align")}
    fingerprint = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()
    return chain_record_path(chain), fingerprint


def finished_chain(chain: dict) -> Optional[dict]:
    """The metrics of ``chain`` if an earlier run finished it with the very same job configs, else None."""
    path, fingerprint = _chain_record(chain)
    if not storage.exists(path):
        return None
    kept = json.loads(storage.read_text(path))
    return kept["metrics"] if kept.get("fingerprint") == fingerprint else None


def machine() -> dict:
    """The CPU and torch build this process computes with: metrics are reproducible to the last digit on
    one machine, not across CPUs (``docs/study.md``), so a kept chain says where it was made (in
    ``mode: ray_train``, the driver's: its Train workers run on the cluster's nodes)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _finish_chain(chain: dict, metrics: dict) -> dict:
    path, fingerprint = _chain_record(chain)
    storage.write_text(path, json.dumps({"fingerprint": fingerprint, "metrics": metrics, "machine": machine()},
                                        indent=1, sort_keys=True))
    return metrics


def run_chain(chain: dict, data: dict, threads: Optional[int], queue=None, device: str = "cpu") -> dict:
    """Align -> instruct -> eval of one seed x arm, in this process (the body of a Ray task)."""
    import torch

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    logging.getLogger("sea_ray").setLevel(logging.WARNING)
    started, cpu_started = time.time(), time.process_time()

    def progress(event: dict) -> None:
        event = dict(event, chain=chain["key"], arm=chain["arm"], seed=chain["seed"],
                     elapsed=round(time.time() - started, 1))
        if queue is not None:
            queue.put(event)
        else:
            _print_event(event)

    progress({"stage": "align", "note": "start"})
    _train_local(chain["align"], data["align"], data["align_rows"], progress, device)
    progress({"stage": "instruct", "note": "start"})
    _train_local(chain["instruct"], data["instruct"], data["instruct_rows"], progress, device)
    metrics = _evaluate(chain, progress)
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 1)  # = wall time on an idle core
    progress({"stage": "done", "note": f"QA {metrics['qa']:.3f}, nearest-word {metrics['nw_align']:.3f}"})
    return _finish_chain(chain, metrics)


def _print_event(e: dict) -> None:
    who = f"[{e['arm']:>8s} seed {e['seed']}]"
    if "step" in e and e.get("step") is not None:
        parts = [f"{k} {e[k]:.3f}" for k in ("loss_lm", "loss_sea") if k in e]
        _say(f"  {who} {e['stage']:8s} step {e['step']:>4}/{e['total']}  " + "  ".join(parts)
             + f"  ({e['elapsed']:.0f}s)")
    else:
        _say(f"  {who} {e['stage']:8s} {e.get('note', '')}  ({e['elapsed']:.0f}s)")


# --------------------------------------------------------------------------- the whole quickstart


def _check_output(cfg: QuickstartConfig, out: str) -> None:
    path = os.path.join(out, "quickstart.json")
    mine = to_dict(cfg)
    if os.path.exists(path):
        stored = json.load(open(path))
        diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k) and k != "output")
        if diff:
            raise DataError(f"{out} holds a quickstart made with other settings (changed: {', '.join(diff)}); "
                            "use output=NEW_DIR or delete it")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(mine, f, indent=2, sort_keys=True)


def _ingest(chain: dict, image_size: int) -> dict:
    """Ray Data: preprocess the align set (with labels) and the instruct set once, into memory."""
    out = {}
    for stage in ("align", "instruct"):
        source = source_of(chain[stage])
        out[stage] = materialize(source, preprocess_kwargs(chain[stage], image_size), 1, 0.5)
        out[f"{stage}_rows"] = source.num_rows
    return out


def _run_tasks(cfg: QuickstartConfig, plan: dict, ray, slots: Optional[Slots] = None, priority: float = 0) -> list[dict]:
    from ray.util.queue import Empty, Queue

    chain0 = plan["chains"][0]
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    # At most one chain in flight per slot: a task blocked in ray.get (its data iterator) lends its
    # CPU to the scheduler, which would otherwise start more chains than there are cores.
    if slots is None:
        slots = Slots.of_cluster(ray, cfg.cpus_per_task)

    (image_size, _), _ = tower_image_size(chain0["align"].model.vision)
    t = time.time()
    _say("[3/5] ingest: Ray Data decodes and tokenizes the align set (with labels) and the instruct set")
    with slots.hold(priority):
        data = _ingest(chain0, image_size)
    _say(f"      {data['align_rows']} captioned images, {data['instruct_rows']} conversations ({time.time() - t:.0f}s)")
    data = ray.put(data)
    _say(f"[4/5] train + eval: {len(plan['chains'])} chains (seeds {cfg.seeds} x {'/'.join(cfg.arms)}), align "
         f"{cfg.align.max_steps} steps -> instruct {cfg.instruct.max_steps} steps -> eval; "
         f"one per free slot of {total_cpus} CPUs, {cfg.cpus_per_task:g} CPU each")
    queue = Queue(actor_options={"num_cpus": 0})
    remote = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=0)(run_chain)
    threads = max(1, int(round(cfg.cpus_per_task)))
    waiting = list(enumerate(plan["chains"]))
    refs: dict = {}
    running: list = []

    def drain() -> None:
        while True:
            try:
                _print_event(queue.get_nowait())
            except Empty:
                return

    slots.want(priority)
    try:
        while waiting or running:
            while waiting and slots.try_take(priority):
                i, chain = waiting.pop(0)
                refs[i] = remote.remote(chain, data, threads, queue)
                running.append(refs[i])
                if not waiting:
                    slots.want(priority, False)
            if running:
                done, running = ray.wait(running, num_returns=len(running), timeout=0.5)
                slots.give(len(done))
            else:
                time.sleep(0.2)
            drain()
        results = ray.get([refs[i] for i in range(len(plan["chains"]))])
        drain()
    finally:
        if waiting:
            slots.want(priority, False)
        for ref in running:  # a failed chain's siblings (or Ctrl-C): stopped, their slots back
            ray.cancel(ref, force=True)
        slots.give(len(running))
        ray.kill(queue.actor)
    return results


def _run_ray_train(cfg: QuickstartConfig, plan: dict) -> list[dict]:

    _say("[3/5] ingest: each TorchTrainer worker preprocesses its own rows on Ray Data as it trains")
    _say(f"[4/5] train + eval: {len(plan['chains'])} chains, each stage a 1-worker TorchTrainer run, in turn")
    results = []
    for chain in plan["chains"]:
        started = time.time()

        def progress(event: dict, chain=chain, started=started) -> None:
            _print_event(dict(event, chain=chain["key"], arm=chain["arm"], seed=chain["seed"],
                              elapsed=round(time.time() - started, 1)))

        for stage in ("align", "instruct"):
            progress({"stage": stage, "note": "TorchTrainer"})
            train(chain[stage])
        metrics = _evaluate(chain, progress)
        metrics["seconds"] = round(time.time() - started, 1)
        results.append(_finish_chain(chain, metrics))
    return results


def _oracle_labels(plan: dict, p: dict) -> dict:
    """Ground-truth patch words in the labels schema (the upper bound of label quality)."""
    tower = build_vision_tower(plan["labels"].model.vision, plan["labels"].data.image_aspect)
    n = write_oracle_labels(p["world"], p["labels"], tower.grid[0], tower.transform_spec(),
                            top_n=min(ORACLE_TOP_N, plan["labels"].labeler.top_n))
    return {"output": p["labels"], "oracle": True, "images": n}


def _audit(plan: dict, world: str, out: str, reuse: bool) -> dict:
    """The label audit on the held-out test images, over the labels' own (training) vocabulary;
    with ``reuse`` (the labels were complete already), the one written with them if there is one."""
    path = os.path.join(out, "_audit.json")
    if reuse and storage.exists(path):  # written after vocab_words.txt
        return json.loads(storage.read_text(path))
    words = json.loads(storage.read_text(os.path.join(out, "_meta.json")))["vocab"]["words"]
    storage.write_text(os.path.join(out, "vocab_words.txt"), "\n".join(words) + "\n")
    report = label_audit.audit(plan["audit"], world, limit=None)
    label_audit.write_report(report, path)
    return report


def _quiet() -> None:
    """Offline, no progress bars or library logs: this command prints its own progress."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "RAY_TRAIN_METRICS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    if not logging.getLogger("sea_ray").isEnabledFor(logging.DEBUG):  # -v keeps the libraries' logs
        for name in ("", "sea_ray"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _labels_step(cfg: QuickstartConfig, plan: dict, p: dict, summary: dict, ray) -> tuple[dict, Optional[dict]]:
    """[2/5]: the labels (the labels job, or oracle labels; reused when complete), then the label
    audit on held-out images. Returns (labels summary, audit report or None)."""

    how = "the labels job (Ray Data, the preset's CLIP)" if cfg.labels == "clip" else "oracle labels"
    _say(f"[2/5] labels: {how} on {summary['counts']['train']} training images; Ray has "
         f"{int(ray.cluster_resources().get('CPU', 0))} CPUs")
    if storage.is_complete(p["labels"]):
        _say("      complete already: reused")
        labels_summary = {"output": p["labels"], "reused": True}
    elif cfg.labels == "oracle":
        labels_summary = _oracle_labels(plan, p)
        _say(f"      oracle labels (the ground truth) for {labels_summary['images']} images")
    else:
        labels_summary = run_labels(plan["labels"])
        _say(f"      {labels_summary['counts']['labelled']} images labelled, vocabulary {labels_summary['vocab_size']} "
             f"words, {labels_summary.get('img_per_s')} img/s")
    audit = None
    if cfg.labels == "clip":
        audit = _audit(plan, p["world"], p["labels"], reuse=labels_summary.get("reused", False))
        best = max(audit["results"], key=lambda r: r["precision_at_1"] or 0)
        used = next(r for r in audit["results"] if r["features"] == plan["labels"].labeler.features
                    and r["score_sign"] == plan["labels"].labeler.score_sign)
        _say(f"      label audit on {audit['images']} held-out images: precision@1 {used['precision_at_1']:.3f} "
             f"({used['features']}/{used['score_sign']}, the labels used; best {best['features']}/"
             f"{best['score_sign']} {best['precision_at_1']:.3f}); chance {audit['chance_precision_at_1']:.3f}, "
             f"one word everywhere {audit['one_word_precision_at_1']:.3f}")
    return labels_summary, audit


def prepare(cfg: QuickstartConfig, plan: Optional[dict] = None) -> dict:
    """Steps 1 and 2: the world and the labels (each reused when complete), the label audit.

    ``sea-ray study`` runs it alone for each world and labels dataset its comparisons share,
    before it runs their chains side by side. ``plan``: what :func:`check` returned for this
    very ``cfg`` if the caller has checked it (else it is checked here)."""
    t0 = time.time()
    _quiet()
    p = _paths(cfg)
    plan = plan or check(cfg)  # every config validated and every model folder checked before anything runs
    _check_output(cfg, p["out"])
    timings: dict[str, float] = {}
    _say(f"sea-ray quickstart -> {p['out']}  (preset {cfg.preset}, seeds {cfg.seeds}, mode {cfg.mode})")

    t = time.time()
    summary = ensure_world(p["world"], num_images=cfg.world.num_images, seed=cfg.world.seed,
                           image_size=cfg.world.image_size)
    timings["world"] = time.time() - t
    _say(f"[1/5] world: {summary['num_images']} images {summary['counts']}, {sum(summary['num_qa'].values())} "
         f"questions ({timings['world']:.0f}s)")

    t = time.time()
    ray = init_ray(cfg.ray, quiet=True)

    ingest.configure(progress_bars=False)
    for name in ("ray.data", "ray.train", "tensorboard"):  # this command prints its own progress
        logging.getLogger(name).setLevel(logging.WARNING)
    timings["ray_start"] = time.time() - t
    t = time.time()
    labels_summary, audit = _labels_step(cfg, plan, p, summary, ray)
    timings["labels"] = time.time() - t
    _say(f"      ({timings['labels']:.0f}s)")
    return {"paths": p, "plan": plan, "world": summary, "labels": labels_summary, "audit": audit, "ray": ray,
            "timings": timings, "started": t0}


def run(cfg: QuickstartConfig, slots: Optional[Slots] = None, priority: float = 0,
        prepared: Optional[dict] = None, plan: Optional[dict] = None) -> dict:
    """The quickstart (module docstring); returns the summary written to ``results.json``.

    ``slots`` (and this run's ``priority`` for them): CPU slots shared with other quickstarts
    running at the same time in this process (``sea-ray study``); by default its own.
    ``prepared``: what :func:`prepare` returned for this very ``cfg``, if it has run already;
    ``plan``: what :func:`check` returned for it, if the caller has checked it."""
    prep = prepared or prepare(cfg, plan)
    p, plan, summary, ray, timings, t0 = (prep[k] for k in ("paths", "plan", "world", "ray", "timings", "started"))
    labels_summary, audit = prep["labels"], prep["audit"]

    t = time.time()
    chains = plan["chains"]
    done = {i: m for i, m in enumerate(map(finished_chain, chains)) if m is not None}
    if done:
        _say(f"      {len(done)} of {len(chains)} chains finished already (same settings): their metrics reused")
    todo = dict(plan, chains=[c for i, c in enumerate(chains) if i not in done])
    if not todo["chains"]:
        fresh = iter(())
    elif cfg.mode == "tasks":
        fresh = iter(_run_tasks(cfg, todo, ray, slots, priority))
    else:
        fresh = iter(_run_ray_train(cfg, todo))
    results = [done[i] if i in done else next(fresh) for i in range(len(chains))]
    timings["train_eval"] = time.time() - t

    t = time.time()
    _say("[5/5] report")
    rows = {arm: [r for r in results if r["arm"] == arm] for arm, _, _ in ARMS if arm in cfg.arms}
    timings["report"] = 0.0
    timings["total"] = time.time() - t0
    report = {"config": to_dict(cfg), "results": results, "label_audit": audit, "labels": labels_summary,
              "timings_s": {k: round(v, 1) for k, v in timings.items()}, "world": summary["counts"]}
    paths = write_quickstart_report(report, rows, p["out"])
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    with open(os.path.join(p["out"], "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    _say("")
    _say(report["table"])
    _say(report["qa_table"])
    _say(f"report: {paths['markdown']}   results: {os.path.join(p['out'], 'results.json')}   "
         f"wall time {timings['total']:.0f}s")
    return {"output": p["out"], "report": paths["markdown"], "timings_s": report["timings_s"],
            "table": {arm: {k: _mean(rows[arm], k) for k, _, _ in TABLE_COLUMNS} for arm in rows}}


def _mean(rows: list[dict], key: str) -> Optional[float]:

    return mean_std([r.get(key) for r in rows])[0]


# --------------------------------------------------------------------------- the report


def write_quickstart_report(report: dict, rows: dict[str, list[dict]], out: str) -> dict:
    """``report.md`` (the table, per-type QA, audit, plots, timings) and ``plots/*.png``."""
    n = len(next(iter(rows.values())))
    report["table"] = paper_table(rows, TABLE_COLUMNS)
    report["qa_table"] = paper_table(rows, [(f"qa_{t}", t, 3) for t in QA_TYPES])
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = {}

    def save(name: str, png: Optional[bytes]) -> None:
        if png:
            with open(os.path.join(plots_dir, name), "wb") as f:
                f.write(png)
            plots[name] = f"plots/{name}"

    keys = ["qa"] + [f"qa_{t}" for t in QA_TYPES]
    means = {arm: {k.replace("qa_", "") if k != "qa" else "all": mean_std([r.get(k) for r in rs])[0] or 0.0
                   for k in keys} for arm, rs in rows.items()}
    stds = {arm: {k.replace("qa_", "") if k != "qa" else "all": mean_std([r.get(k) for r in rs])[1] or 0.0
                  for k in keys} for arm, rs in rows.items()}
    save("qa_by_type.png", plot_bars(means, f"QA accuracy (mean ± std over {n} seeds)", "exact match", stds))
    akeys = {"nw_align": "nearest-word (align)", "nw_final": "nearest-word (final)", "tacs": "TACS",
             "modality_gap": "modality gap"}
    means = {arm: {label: mean_std([r.get(k) for r in rs])[0] or 0.0 for k, label in akeys.items()}
             for arm, rs in rows.items()}
    stds = {arm: {label: mean_std([r.get(k) for r in rs])[1] or 0.0 for k, label in akeys.items()}
            for arm, rs in rows.items()}
    chance = mean_std([r.get("nw_chance") for rs in rows.values() for r in rs])[0]
    save("alignment.png", plot_bars(means, "alignment diagnostics (test split)", "value", stds,
                                    ("nearest-word chance", chance) if chance else None))
    seed0 = report["config"]["seeds"][0]
    curves = {}
    for stage in ("align", "instruct"):
        for _, key, _ in ARMS:
            run = os.path.join(out, "runs", f"{stage}-{key}-s{seed0}")
            try:
                curves[run] = read_scalars(run)
            except Exception as exc:  # a missing event file only loses a plot
                log.warning("no curves from %s: %s", run, exc)
    save("loss_curves.png", plot_curves({k: v for k, v in curves.items() if v}))
    audit = report["label_audit"]
    if audit:
        save("label_audit.png", plot_audit(audit))

    t = report["timings_s"]
    cfg = report["config"]
    lines = ["# sea-ray quickstart: SEA vs the plain baseline on the synthetic world", "",
             f"{n} seed(s) {cfg['seeds']}, preset `{cfg['preset']}`, world of {cfg['world']['num_images']} images "
             f"{report['world']}; align {cfg['align']['max_steps']} steps x {cfg['align']['global_batch']}, "
             f"instruct {cfg['instruct']['max_steps']} steps x {cfg['instruct']['global_batch']}; "
             f"SEA weight {cfg['sea']['weight']}, initial temperature {cfg['sea']['init_temperature']}, "
             f"window {cfg['sea']['window']}. Mean ± std over seeds, test split.", "",
             report["table"],
             "Nearest-word accuracy: how often a visual token's nearest vocabulary word (in the LLM's input "
             f"embedding space) is one of its patch's true words (chance {_fmt(chance)}). Perplexity of the LLM on "
             f"held-out text: {_fmt(_mean(sum(rows.values(), []), 'ppl_before'), 2)} before instruction tuning; on generic "
             f"English sentences (sea_ray/assets/text/english.txt): "
             f"{_fmt(_mean(sum(rows.values(), []), 'ppl_english_before'), 1)} before.", "",
             "QA accuracy by question type:", "", report["qa_table"],
             "## Patch labels (the CLIP labeler on held-out images)", "",
             label_audit.to_markdown(audit) if audit else "Oracle labels: the ground-truth patch words (precision 1 by "
             "construction), the upper bound of label quality.\n", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## Per seed", "", "| arm | seed | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " | seconds |",
              "|" + "---|" * (len(TABLE_COLUMNS) + 3)]
    for arm, rs in rows.items():
        for r in rs:
            lines.append(f"| {arm} | {r['seed']} | " + " | ".join(_fmt(r.get(k), d) for k, _, d in TABLE_COLUMNS)
                         + f" | {r.get('seconds')} |")
    lines += ["", "## Wall time (s)", "", "| " + " | ".join(t) + " |", "|" + "---|" * len(t),
              "| " + " | ".join(str(v) for v in t.values()) + " |", "",
              "Per-run reports: `eval/<arm>-s<seed>/report.md`; run folders (checkpoints, TensorBoard): `runs/`.", ""]
    md = os.path.join(out, "report.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return {"markdown": md, "plots": [os.path.join(out, v) for v in plots.values()]}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
