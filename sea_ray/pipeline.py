"""``sea-ray pipeline --config FILE``: the whole method as one job, in one Ray session.

Run it::

    sea-ray pipeline --config workflows/configs/tiny_pipeline.yaml [--dry-run] [--force STEP] [k=v ...]
    sea-ray submit --address http://127.0.0.1:8265 --wait -- pipeline --config workflows/configs/tiny_pipeline.yaml

Steps, in this order (``steps:`` picks which run)::

    world     generate the synthetic world             -> data.world (default <output>/world)
    import    manifests -> Parquet shards              -> <output>/manifests/{pretrain,instruct}
    labels    CLIP patch labels (Ray Data)             -> <output>/labels
    tune      search the align hyperparameters         -> <output>/tune/<run name>  (best_params -> align)
    align     stage 1, SEA + LM loss (Ray Train)       -> <output>/runs/<align run name>
    instruct  stage 2, conversations (Ray Train)       -> <output>/runs/<instruct run name>
    eval      diagnostics and QA accuracy              -> <output>/eval

Each step's config is its recipe (``<step>.recipe``, a job YAML next to the pipeline file), then
the wiring (its inputs are the outputs of the steps before it, its output goes under ``output``,
its ``ray`` section is the pipeline's), then ``<step>.set``. Every step config is built and
validated before anything runs; one error lists the problems of every step.

A step whose output is already complete is skipped: the world's ``world.json`` with the same
parameters, the imports' ``_SUCCESS``, the labels' ``_SUCCESS``, tune's ``summary.json``, a complete
checkpoint at the run's final step, the eval report. ``--force STEP`` runs it anyway (the job's
own resume logic then decides what is left to do). Steps run the jobs of the job table
(:data:`sea_ray.jobs.JOBS`) in this process, so a step plugs in by its job's name.

The run describes itself in ``<output>/_pipeline/``: ``plan.json`` (every step's resolved config),
``<step>.json`` (the summary of each step that ran) and, while it runs, ``LOCK``: a second run on
the same output fails at once instead of writing beside the first (a lock left by a run that
died on this host is taken over; ``--break-lock`` removes any other).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from sea_ray import jobs, paths, runtime, storage
from sea_ray.checks import labels_aspect_problem
from sea_ray.config.loading import anchor_preset_files, set_dotted, to_dict
from sea_ray.config.schema import PIPELINE_STEPS, PipelineConfig
from sea_ray.data.images import ASPECT_RULES
from sea_ray.data.importer import import_manifest
from sea_ray.train.data import label_shards, manifest_rows
from sea_ray.train.driver import run_uri
from sea_ray.world.generator import WORLD_VERSION, ensure_world, generate_world
from sea_ray.errors import ConfigError, SeaRayError

log = logging.getLogger(__name__)

RECORDS = "_pipeline"
LOCK_FILE = "LOCK"
EVAL_REPORT = "report.json"
TUNE_SUMMARY = "summary.json"


class PipelineLocked(SeaRayError):
    """Another run holds the output's lock."""


# --------------------------------------------------------------------------- the plan


@dataclass
class StepPlan:
    """One step, resolved: its validated config (None for world/import), its main output URI, and
    the arguments of the non-config steps."""

    name: str
    cfg: Any
    output: str
    args: dict = field(default_factory=dict)


@dataclass
class Plan:
    cfg: PipelineConfig
    source: str
    data: dict[str, Optional[str]]
    steps: list[StepPlan]
    base_dir: Path

    @property
    def records(self) -> str:
        return storage.join(self.cfg.output, RECORDS)

    def step(self, name: str) -> Optional[StepPlan]:
        return next((s for s in self.steps if s.name == name), None)


def _apply_set(raw: dict, values: dict) -> dict:
    """Apply a step's ``set``: dotted keys or nested mappings, merged into ``raw``."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        if "." in key:
            set_dotted(out, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _apply_set(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def data_uris(cfg: PipelineConfig) -> dict[str, Optional[str]]:
    data = cfg.data
    world = data.world or (storage.join(cfg.output, "world") if "world" in cfg.steps else None)

    def from_world(value, *parts):
        return value or (storage.join(world, *parts) if world else None)

    uris = {"world": world,
            "pretrain": from_world(data.pretrain, "train", "pretrain.json"),
            "instruct": from_world(data.instruct, "train", "instruct.json"),
            "val": from_world(data.val, "val", "pretrain.json"),
            "image_root": from_world(data.image_root, "images")}
    uris["instruct_image_root"] = data.instruct_image_root or uris["image_root"]
    if "import" in cfg.steps:
        uris["pretrain_source"], uris["instruct_source"] = uris["pretrain"], uris["instruct"]
        uris["pretrain"] = storage.join(cfg.output, "manifests", "pretrain")
        uris["instruct"] = storage.join(cfg.output, "manifests", "instruct")
    return {k: paths.absolute(v) for k, v in uris.items()}


def _read_recipe(step: str, recipe: Optional[str], base_dir: Path, problems: list[str]) -> dict:
    if not recipe:
        return {}
    path = Path(recipe) if Path(recipe).is_absolute() else base_dir / recipe
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        problems.append(f"{step}.recipe: file not found: {path}")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{step}.recipe: {path} is not valid YAML: {exc}")
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{step}.recipe: {path} is not a mapping")
        return {}
    if raw.get("job") not in (None, step):
        problems.append(f"{step}.recipe: {path} is a {raw.get('job')!r} recipe, not {step!r}")
    return anchor_preset_files(raw, path.resolve().parent)


def _wiring(name: str, plan_so_far: dict[str, StepPlan], cfg: PipelineConfig, data: dict) -> dict[str, Any]:
    """dotted key -> value: the inputs, output and Ray section of a config step. Local paths are
    absolute: Ray Train workers run in their own working directory."""
    out = paths.absolute(cfg.output)
    ray = to_dict(cfg.ray)
    labels = plan_so_far.get("labels")
    align = plan_so_far.get("align")
    instruct = plan_so_far.get("instruct")
    w: dict[str, Any] = {}
    if name == "labels":
        w = {"output": storage.join(out, "labels"), "data.manifest": data["pretrain"],
             "data.image_root": data["image_root"], "ray": ray}
    elif name == "tune":
        w = {"base.data.manifest": data["pretrain"], "base.data.image_root": data["image_root"],
             "base.data.labels": labels.output if labels else None, "base.data.val_manifest": data["val"],
             "base.run.storage": storage.join(out, "tune"), "base.ray": ray}
    elif name == "align":
        w = {"data.manifest": data["pretrain"], "data.image_root": data["image_root"],
             "data.labels": labels.output if labels else None, "run.storage": storage.join(out, "runs"), "ray": ray}
    elif name == "instruct":
        w = {"data.manifest": data["instruct"], "data.image_root": data["instruct_image_root"],
             "init_adapter": align.output if align else None, "run.storage": storage.join(out, "runs"), "ray": ray}
        if align is not None and align.cfg is not None:  # the adapter it loads: same shape (tune may have changed align's)
            w["model.adapter"] = to_dict(align.cfg.model.adapter)
    elif name == "eval":
        trained = instruct or align
        w = {"checkpoint": trained.output if trained else None, "output": storage.join(out, "eval"), "ray": ray}
        if data["world"]:  # else the eval recipe's own held-out data (its data section)
            w.update(world=data["world"], vocab=labels.output if labels else None)  # nearest words: the labels' words
        if trained is not None and trained.cfg is not None:  # the model that was trained, whatever the recipe says
            w["model"] = to_dict(trained.cfg.model)
    return {k: v for k, v in w.items() if v is not None}


def output_of(name: str, cfg) -> str:
    if name in ("align", "instruct"):
        return run_uri(cfg)
    if name == "tune":
        return storage.join(paths.absolute(cfg.base.run.storage), cfg.base.run.name)
    return paths.absolute(cfg.output)


def _available_verbs() -> dict[str, jobs.Job]:
    return jobs.JOBS


def build_step_config(name: str, cfg: PipelineConfig, base_dir: Path, data: dict, so_far: dict[str, StepPlan],
                      problems: list[str], extra: Optional[dict] = None, where: Optional[str] = None):
    """The validated config of a config step (``extra``: dotted values applied over the wiring and
    before ``set``, e.g. tune's best parameters for align), or None with its problems appended
    (prefixed with ``where``, default the step's name)."""
    section = getattr(cfg, name)
    raw = _read_recipe(name, section.recipe, base_dir, problems)
    raw["job"] = name
    for key, value in {**_wiring(name, so_far, cfg, data), **(extra or {})}.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return jobs.validated(_apply_set(raw, section.set), name, where or name, problems)


def plan(cfg: PipelineConfig, source: str | Path) -> Plan:
    """Resolve and validate every step (no Ray, no writes). Raises one ConfigError listing the
    problems of every step."""
    base_dir = Path(source).resolve().parent
    data = data_uris(cfg)
    problems: list[str] = []
    runners = _available_verbs()
    so_far: dict[str, StepPlan] = {}
    steps: list[StepPlan] = []
    for name in cfg.steps:
        if name == "world":
            w = cfg.world
            step = StepPlan(name, None, data["world"], {"num_images": w.num_images, "seed": w.seed,
                                                         "image_size": w.image_size})
        elif name == "import":
            step = StepPlan(name, None, storage.join(cfg.output, "manifests"), {
                "image_root": data["image_root"], "embed_images": cfg.importer.embed_images,
                "rows_per_shard": cfg.importer.rows_per_shard,
                "max_error_fraction": cfg.importer.max_error_fraction,
                "instruct_image_root": data["instruct_image_root"],
                "manifests": {"pretrain": (data["pretrain_source"], data["pretrain"], True),
                              "instruct": (data["instruct_source"], data["instruct"], False)}})
        else:
            if name not in runners:
                problems.append(f"steps: {name} is not available in this installation (no `sea-ray {name}` "
                                f"runner; available: {', '.join(runners)})")
                continue
            step_cfg = build_step_config(name, cfg, base_dir, data, so_far, problems)
            if step_cfg is None:
                continue
            step = StepPlan(name, step_cfg, output_of(name, step_cfg))
        so_far[name] = step
        steps.append(step)
    outputs = [(s.name, s.output) for s in steps if s.name in ("align", "instruct")]
    if len(outputs) == 2 and outputs[0][1] == outputs[1][1]:
        problems.append(f"align, instruct: both write {outputs[0][1]}; give them different run.name values")
    problems += [p for p in _labels_aspect_problems(so_far) if p not in problems]
    if problems:
        raise ConfigError(problems, str(source))
    return Plan(cfg=cfg, source=str(source), data=data, steps=steps, base_dir=base_dir)


def _labels_aspect_problems(so_far: dict[str, StepPlan]) -> list[str]:
    """The SEA steps reading the labels step's labels must fit images to the tower as it does
    (``data.image_aspect``): caught before the labels run, whose ``_meta.json`` the jobs' own check
    (:func:`sea_ray.checks.job_problems`) reads once it exists."""
    labels = so_far.get("labels")
    if labels is None or labels.cfg is None:
        return []
    made = {"transform": {"resize": ASPECT_RULES[labels.cfg.data.image_aspect]}}  # what its _meta.json will say
    out = []
    for name in ("tune", "align"):
        step = so_far.get(name)
        if step is None:
            continue
        cfg = step.cfg.base if name == "tune" else step.cfg
        if cfg.sea.enabled and cfg.data.labels == labels.output:
            problem = labels_aspect_problem(made, cfg.data.image_aspect, labels.output)
            out += [f"{name}: {problem}"] if problem else []
    return out


# --------------------------------------------------------------------------- completeness


def _world_done(step: StepPlan) -> Optional[str]:
    uri = storage.join(step.output, "world.json")
    try:
        meta = json.loads(storage.read_text(uri))
    except (FileNotFoundError, ValueError):
        return None

    want = dict(step.args, version=WORLD_VERSION)
    return uri if all(meta.get(k) == v for k, v in want.items()) else None


def _imports_done(step: StepPlan) -> Optional[str]:
    outs = [dst for _, dst, _ in step.args["manifests"].values()]
    return step.output if all(storage.is_complete(o) for o in outs) else None


def _marker_done(step: StepPlan) -> Optional[str]:
    uri = storage.join(step.output, storage.MARKER)
    return uri if storage.exists(uri) else None


def _tune_done(step: StepPlan) -> Optional[str]:
    uri = storage.join(step.output, TUNE_SUMMARY)
    try:
        summary = json.loads(storage.read_text(uri))
    except (FileNotFoundError, ValueError):
        return None
    return uri if summary.get("best_params") else None


def expected_steps(cfg) -> int:
    """The optimizer steps a train config runs to (what its final checkpoint holds)."""
    from sea_ray.train.loop import total_steps

    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    if cfg.job == "align" and cfg.data.labels:
        num_rows = sum(rows for _, rows in label_shards(cfg.data.labels))
    else:
        num_rows = len(manifest_rows(cfg.data.manifest, require_image=cfg.job == "align", fmt=cfg.data.format,
                                     columns=cfg.data.columns).rows)
    return total_steps(cfg, num_rows)


def _train_done(step: StepPlan) -> Optional[str]:
    from sea_ray.train import checkpoint as ckpt

    latest = ckpt.latest_complete(step.output)
    if latest is None:
        return None
    state = json.loads(storage.read_text(storage.join(latest, ckpt.STATE_FILE)))
    return latest if state.get("step") == expected_steps(step.cfg) else None


def _eval_done(step: StepPlan) -> Optional[str]:
    uri = storage.join(step.output, EVAL_REPORT)
    return uri if storage.exists(uri) else None


DONE: dict[str, Callable[[StepPlan], Optional[str]]] = {
    "world": _world_done, "import": _imports_done, "labels": _marker_done, "tune": _tune_done,
    "align": _train_done, "instruct": _train_done, "eval": _eval_done,
}
assert set(DONE) == set(PIPELINE_STEPS)


def completed(step: StepPlan) -> Optional[str]:
    """The URI proving the step's output is complete, or None. Unreachable storage is an error
    (SeaRayError), never a reason to redo a step."""
    try:
        return DONE[step.name](step)
    except SeaRayError:
        raise
    except Exception as exc:
        raise SeaRayError(f"{step.name}: cannot check whether {step.output} is complete "
                          f"({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- the non-config steps


def _run_world(step: StepPlan) -> dict:

    if not storage.is_remote(step.output):
        return ensure_world(step.output, **step.args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sea-world-") as tmp:
        summary = generate_world(tmp, **step.args)
        fs, path = storage.fsspec_fs(step.output)
        if fs.exists(f"{path}/world.json"):
            fs.rm(f"{path}/world.json")
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.name != "world.json")
        fs.put([str(p) for p in files], [f"{path}/{p.relative_to(tmp).as_posix()}" for p in files])
        fs.put(str(Path(tmp) / "world.json"), f"{path}/world.json")  # last: marks the world complete
    return dict(summary, out_dir=step.output)


def _run_import(step: StepPlan) -> dict:

    out = {}
    for key, (src, dst, require_image) in step.args["manifests"].items():
        if storage.is_complete(dst):
            out[key] = {"output": dst, "skipped": True}
            continue
        root = step.args["instruct_image_root"] if key == "instruct" else step.args["image_root"]
        out[key] = import_manifest(src, dst, image_root=root,
                                   embed_images=step.args["embed_images"],
                                   rows_per_shard=step.args["rows_per_shard"], require_image=require_image,
                                   max_error_fraction=step.args["max_error_fraction"])
    return out


def _run_job(step: StepPlan) -> dict:
    cfg = step.cfg
    if step.name == "eval" and cfg.world and storage.is_remote(cfg.world):
        # eval runs in this process and reads the ground truth with local-file readers: give it a
        # local copy of the (small, synthetic) world, downloaded once into the sea_ray cache
        log.info("pipeline: eval reads a local copy of %s", cfg.world)
        cfg = cfg.model_copy(update={"world": storage.local_copy(cfg.world)})
    return _available_verbs()[step.name].run(cfg)


# --------------------------------------------------------------------------- the lock


def _job_id() -> Optional[str]:
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    except ValueError:
        return None
    return meta.get("job_submission_id")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``<output>/_pipeline/LOCK``, created exclusively: ``O_EXCL`` on a local disk, a conditional
    PUT (``If-None-Match: *``) on S3."""

    def __init__(self, records_uri: str):
        self.uri = storage.join(records_uri, LOCK_FILE)
        self.owner = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "ray_job": _job_id(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def _create(self) -> bool:
        try:
            return storage.create_exclusive(self.uri, json.dumps(self.owner, indent=1).encode())
        except OSError as exc:
            raise SeaRayError(f"cannot create the lock {self.uri}: {type(exc).__name__}: {exc}") from exc

    def holder(self) -> dict:
        try:
            return json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, ValueError):
            return {}

    def _remove(self) -> None:
        fs, path = storage.fsspec_fs(self.uri)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    def acquire(self, break_lock: bool = False) -> None:
        for attempt in range(2):
            if self._create():
                self.held = True
                return
            holder = self.holder()
            stale = (holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int)
                     and not _pid_alive(holder["pid"]))
            if attempt == 0 and (break_lock or stale):
                log.warning("removing the lock %s of %s (%s)", self.uri, _describe(holder),
                            "its process is gone" if stale else "--break-lock")
                self._remove()
                continue
            raise PipelineLocked(f"{self.uri} is held by {_describe(holder)}: another pipeline run writes this "
                                 "output. Wait for it, give this run another `output`, or, if no run is alive, "
                                 "re-run with --break-lock")
        raise PipelineLocked(f"could not take {self.uri}")

    def release(self) -> None:
        """Remove the lock if this run holds it. The holder is read back rather than trusting
        ``held``: a stop signal can land after the store created the lock but before ``acquire``
        saw the reply."""
        if self.holder().get("owner") == self.owner["owner"]:
            self._remove()
        self.held = False


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown run"
    job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


# --------------------------------------------------------------------------- running


def _record(plan: Plan, name: str, payload: dict) -> None:
    storage.write_text(storage.join(plan.records, f"{name}.json"),
                       json.dumps(payload, indent=2, sort_keys=True, default=str))


def describe(plan: Plan, force: tuple[str, ...] = ()) -> dict:
    """What a run would do: every step with its output and whether it would be skipped."""
    steps = []
    for step in plan.steps:
        try:
            done = None if step.name in force else completed(step)
            action = f"skip (complete: {done})" if done else "run"
        except SeaRayError as exc:
            action = f"unknown: {str(exc).splitlines()[0]}"
        steps.append({"step": step.name, "output": step.output, "action": action})
    return {"output": paths.absolute(plan.cfg.output), "data": plan.data, "steps": steps}


def _tune_params(step: StepPlan) -> dict:
    summary = json.loads(storage.read_text(storage.join(step.output, TUNE_SUMMARY)))
    return summary.get("best_params") or {}


STOP_GRACE_S = 10.0


def _on_sigterm(lock: Optional[OutputLock]):
    """Ray stops a job with SIGTERM (and SIGKILLs it a little later): release the lock at once,
    in the handler, then exit through SystemExit so the rest unwinds. A SystemExit can be
    swallowed by library code it lands in (a bare ``except:`` inside an import, say), so a timer
    ends the process ``STOP_GRACE_S`` later whatever happens. Installed again after
    ``ray.init``, which sets its own SIGTERM handler. Returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if lock is not None:
            try:
                lock.release()
            except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the lock stays
                log.warning("could not release %s on SIGTERM: %s", lock.uri, exc)
        log.warning("pipeline: stopped by signal %d", signum)
        timer = threading.Timer(STOP_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def run(plan: Plan, force: tuple[str, ...] = (), break_lock: bool = False) -> dict:
    """Run the planned steps in order (skipping complete ones); returns the summary."""
    cfg = plan.cfg
    unknown = sorted(set(force) - {s.name for s in plan.steps})
    if unknown:
        raise ConfigError([f"--force {s}: not a step of this pipeline ({', '.join(cfg.steps)})" for s in unknown])
    lock = OutputLock(plan.records) if cfg.lock else None
    previous = _on_sigterm(lock)
    started = time.time()
    results = []
    try:
        if lock is not None:
            lock.acquire(break_lock=break_lock)
        storage.write_text(storage.join(plan.records, "plan.json"), json.dumps(
            {"pipeline": to_dict(cfg), "source": plan.source, "data": plan.data,
             "steps": {s.name: {"output": s.output, "config": to_dict(s.cfg) if s.cfg is not None else s.args}
                       for s in plan.steps}}, indent=2, sort_keys=True, default=str))
        ray_started = False
        ran: dict[str, StepPlan] = {}
        tuned = False  # align took tune's parameters: what follows is wired to it again
        for step in plan.steps:
            if step.name == "align" and plan.step("tune") is not None:
                planned, step = step, _with_tune_params(plan, step)
                tuned = step is not planned
            elif tuned and step.cfg is not None:
                step = _rebuilt(plan, step, dict(ran))
            ran[step.name] = step
            done = None if step.name in force else completed(step)
            if done:
                log.info("pipeline: %s skipped (complete: %s)", step.name, done)
                results.append({"step": step.name, "status": "skipped", "output": step.output, "complete": done})
                continue
            if step.name not in ("world", "import") and not ray_started:

                runtime.init_ray(cfg.ray)  # by module attribute: tests replace it
                ray_started = True
                _on_sigterm(lock)
            log.info("pipeline: %s -> %s", step.name, step.output)
            t0 = time.time()
            runner = {"world": _run_world, "import": _run_import}.get(step.name, _run_job)
            summary = runner(step)
            seconds = round(time.time() - t0, 2)
            _record(plan, step.name, {"output": step.output, "seconds": seconds, "summary": summary})
            log.info("pipeline: %s done in %.1f s", step.name, seconds)
            results.append({"step": step.name, "status": "ran", "output": step.output, "seconds": seconds})
    finally:
        if lock is not None:
            lock.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {"output": paths.absolute(cfg.output), "seconds": round(time.time() - started, 2), "steps": results}


def _with_tune_params(plan: Plan, step: StepPlan) -> StepPlan:
    """The align step with the best parameters of the tune step applied (before align's ``set``)."""
    params = _tune_params(plan.step("tune"))
    if not params:
        return step
    log.info("pipeline: align takes tune's best parameters %s", params)
    return _rebuilt(plan, step, {s.name: s for s in plan.steps[: plan.steps.index(step)]}, params)


def _rebuilt(plan: Plan, step: StepPlan, so_far: dict[str, StepPlan], extra: Optional[dict] = None) -> StepPlan:
    """A config step built again from the steps as they actually ran (after tune changed align)."""
    problems: list[str] = []
    cfg = build_step_config(step.name, plan.cfg, plan.base_dir, plan.data, so_far, problems, extra=extra)
    if cfg is None or problems:
        raise ConfigError(problems, plan.source)
    return StepPlan(step.name, cfg, output_of(step.name, cfg))
