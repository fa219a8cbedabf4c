"""``sea-ray tune``: a Ray Tune search over the align recipe, with Optuna (TPE) or random search,
ASHA early stopping on a held-out alignment metric, resumable in place.

Run::

    sea-ray tune --config workflows/configs/tiny_tune.yaml [dotted.key=value ...]

The experiment folder is ``<base.run.storage>/<base.run.name>`` (local or ``s3://``): Tune's own
state, one folder per trial (``trials/<trial_id>``: checkpoints, history), the held-out images
(``validation/``) and the outputs (:mod:`sea_ray.tune.results`). Running the same config again
resumes the search where it stopped (``Tuner.restore``): finished trials are kept, unfinished
ones continue from their newest checkpoint, the searcher continues from its saved state.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from sea_ray import storage
from sea_ray.checks import job_problems, read_labels_meta, tower_image_size
from sea_ray.config.loading import to_dict, validate
from sea_ray.config.schema import TuneConfig
from sea_ray.errors import ConfigError, SeaRayError
from sea_ray.paths import absolute_paths
from sea_ray.runtime import dashboard_url, init_ray
from sea_ray.train.driver import run_uri
from sea_ray.tune.results import write_outputs
from sea_ray.tune.space import apply_params, optuna_distributions, tune_domains
from sea_ray.tune.trials import TRIALS_DIR, in_process_trial, ray_train_trial

log = logging.getLogger(__name__)

# Parts of a tune config that define the search: a resume must find them unchanged.
SEARCH_DEFINING = ("space", "base", "num_samples", "metric", "mode", "report_every_n_steps", "searcher", "optuna",
                   "asha", "validation", "seed")
STATE_FILE, MODE_FILE = "tune_config.json", "trial_mode"


def experiment_uri(cfg: TuneConfig) -> str:
    return run_uri(cfg.base)


# --------------------------------------------------------------------------- checks


def search_problems(cfg: TuneConfig) -> list[str]:
    """Job-level checks (tower grid, labels) of the base config at every end of every search
    dimension, e.g. ``sea.window`` larger than the patch grid or ``sea.top_n`` above the labels'."""
    problems: list[str] = []
    # the space never moves the data: every variant reads the same labels (read them once)
    meta = read_labels_meta(cfg.base.data.labels) if cfg.base.data.labels else None
    for key, dim in cfg.space.items():
        if dim.type == "choice":
            candidates = list(dim.values)
        else:
            cast = int if dim.type == "randint" else float
            candidates = [cast(dim.low), cast(dim.high)]
        for value in candidates:
            trial = validate(apply_params(cfg.base, {key: value}), job="align")
            problems += [f"space.{key}={value!r}: {p}" for p in job_problems(trial, labels_meta=meta)]
    return problems


def _search_part(raw: dict) -> dict:
    part = {k: raw.get(k) for k in SEARCH_DEFINING}
    part["base"] = {k: v for k, v in (part["base"] or {}).items() if k != "ray"}
    return part


def check_same_search(cfg: TuneConfig, exp_uri: str, resuming: bool) -> None:
    """A new search records its config in the experiment folder; a resumed one must find the
    same search there (else resuming would mix two searches)."""
    path = storage.join(exp_uri, STATE_FILE)
    now = to_dict(cfg)
    if resuming and storage.exists(path):
        before = _search_part(json.loads(storage.read_text(path)))
        changed = sorted(k for k, v in _search_part(now).items() if before.get(k) != v)
        if changed:
            raise ConfigError([f"{k}: differs from the search already in {exp_uri}" for k in changed] +
                              ["resume needs the same search: restore those values, or pick another base.run.name"])
        return
    storage.makedirs(exp_uri)
    storage.write_text(path, json.dumps(now, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- Ray and the trial mode


def _dashboard_up() -> bool:
    try:
        return bool(dashboard_url())
    except Exception:  # noqa: BLE001 - not connected, or a Ray that cannot say: say no
        return False


def _init_ray(cfg: TuneConfig):
    """Connect to (or start) Ray. A local Ray started here for ray_train trials gets a dashboard."""
    address = cfg.base.ray.address or os.environ.get("RAY_ADDRESS")
    local_cpus = cfg.base.ray.num_cpus or os.cpu_count() or 1
    wants_train = cfg.trial_mode == "ray_train" or (cfg.trial_mode == "auto"
                                                     and local_cpus >= cfg.auto_ray_train_min_cpus)
    return init_ray(cfg.base.ray, dashboard=bool(wants_train and not address))


def resolve_trial_mode(cfg: TuneConfig) -> tuple[str, str]:
    """(in_process | ray_train, why). auto: ray_train where multi-worker trials pay off and a
    stopped one fails cleanly (several nodes, GPUs or many CPUs, and the dashboard on); else
    in_process."""
    import ray

    dashboard = _dashboard_up()
    if cfg.trial_mode == "in_process":
        return "in_process", "trial_mode=in_process"
    if cfg.trial_mode == "ray_train":
        if not dashboard:
            raise SeaRayError("trial_mode=ray_train needs the Ray dashboard (without it, trials that ASHA stops "
                              "leak their placement groups and later trials wait forever): start Ray with the "
                              "dashboard, or use trial_mode=in_process")
        return "ray_train", "trial_mode=ray_train"
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    big = nodes > 1 or resources.get("GPU", 0) > 0 or resources.get("CPU", 0) >= cfg.auto_ray_train_min_cpus
    if big and dashboard:
        return "ray_train", f"auto: {nodes} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
    why = "no dashboard" if big else (f"a small Ray ({nodes} node, {resources.get('CPU', 0):g} CPUs, no GPU; "
                                      f"ray_train from {cfg.auto_ray_train_min_cpus} CPUs)")
    return "in_process", f"auto: {why}"


def _same_trial_mode(cfg: TuneConfig, exp_uri: str, resuming: bool, mode: str, why: str) -> tuple[str, str]:
    """A resumed search keeps the trial mode it started with (its trainable)."""
    path = storage.join(exp_uri, MODE_FILE)
    if resuming and storage.exists(path):
        before = storage.read_text(path).strip()
        if before != mode:
            if cfg.trial_mode != "auto":
                raise ConfigError([f"trial_mode: {cfg.trial_mode} but the search in {exp_uri} runs {before} trials"])
            return before, f"the search started with {before} trials"
    else:
        storage.write_text(path, mode)
    return mode, why


# --------------------------------------------------------------------------- data


def _eval_kwargs(cfg: TuneConfig) -> dict[str, Any]:
    v, base = cfg.validation, cfg.base
    return {"temperature": v.temperature or base.sea.init_temperature, "window": v.window or base.sea.window,
            "top_n": v.top_n or base.sea.top_n, "batch_size": v.batch_size or base.batch.per_worker,
            "seed": v.seed, "lm_loss": v.lm_loss}


def prepare_data(cfg: TuneConfig, exp_uri: str, mode: str, resuming: bool) -> dict[str, Any]:
    """Held-out labels (written when the search starts, reused when it resumes), the held-out
    rows, and for in_process trials the training rows (everything else), preprocessed once."""
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize, num_rows
    from sea_ray.tune.validation import VALIDATION_DIR, write_holdout

    base, v = cfg.base, cfg.validation
    val_labels = storage.join(exp_uri, VALIDATION_DIR, "labels")
    held_out = write_holdout(v.labels or base.data.labels, val_labels, v.num_images, v.seed, reuse=resuming)
    excluded = [] if v.labels else held_out
    (image_size, _), _ = tower_image_size(base.model.vision)
    actors, cpus = base.data.preprocess_actors, base.data.preprocess_cpus
    preprocess = preprocess_kwargs(base, image_size)
    train_source = source_of(base, excluded)
    out: dict[str, Any] = {"val_labels": val_labels, "held_out_ids": excluded, "eval": _eval_kwargs(cfg),
                           "num_train": train_source.num_rows}
    if mode == "in_process":
        out["train_rows"] = materialize(train_source, preprocess, actors, cpus)
    val_cfg = base.model_copy(update={"data": base.data.model_copy(update={
        "labels": val_labels, "manifest": base.data.val_manifest if v.labels else base.data.manifest})})
    out["val_rows"] = materialize(source_of(val_cfg), preprocess, actors, cpus)
    log.info("validation: %d held-out images (%s); %d training rows", num_rows(out["val_rows"]),
             "from validation.labels" if v.labels else "excluded from training", out["num_train"])
    return out


# --------------------------------------------------------------------------- the search


def build_search(cfg: TuneConfig, steps: int):
    """(search algorithm, scheduler, param_space)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.searcher == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from sea_ray.tune.optuna_search import AshaAwareOptunaSearch, GoodFraction

        kwargs = {"seed": cfg.seed, "n_startup_trials": cfg.optuna.n_startup_trials,
                  "multivariate": cfg.optuna.multivariate}
        try:
            with warnings.catch_warnings():  # Optuna 4.9 deprecated `gamma` (removal planned for 6.0)
                warnings.simplefilter("ignore", FutureWarning)
                sampler = optuna.samplers.TPESampler(
                    **kwargs, **({"gamma": GoodFraction(cfg.optuna.gamma)} if cfg.optuna.gamma else {}))
        except TypeError:
            log.warning("this Optuna's TPESampler takes no gamma: optuna.gamma=%s ignored", cfg.optuna.gamma)
            sampler = optuna.samplers.TPESampler(**kwargs)
        search = AshaAwareOptunaSearch(space=optuna_distributions(cfg), metric=cfg.metric, mode=cfg.mode,
                                       sampler=sampler, max_steps=steps)
        searcher = ConcurrencyLimiter(search, max_concurrent=cfg.max_concurrent)
        space: dict = {}
    else:
        searcher = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent)
        space = tune_domains(cfg)
    if cfg.asha.enabled:
        every = cfg.report_every_n_steps
        # max_t one past the last step: ASHA stops a trial that reaches max_t at that very report,
        # which would cut off what the recipe does after its last report; the rungs are the same
        scheduler = ASHAScheduler(time_attr="step", max_t=steps + 1,
                                  grace_period=min(steps, cfg.asha.grace_period * every),
                                  reduction_factor=cfg.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return searcher, scheduler, space


def _trial_dirname(trial) -> str:
    return trial.trial_id


def run(cfg: TuneConfig, stop=None) -> dict:
    """Run (or resume) the search; write the outputs; return the summary. ``stop``: a Tune stopper
    (``ray.tune.Stopper``) for a new search, such as bench/tune.py's compute budget."""
    from ray import tune

    from sea_ray.train.loop import total_steps

    exp_uri = experiment_uri(cfg)
    fs, path = storage.pyarrow_fs(cfg.base.run.storage)
    exp_path = f"{path.rstrip('/')}/{cfg.base.run.name}"
    resuming = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    check_same_search(cfg, exp_uri, resuming)
    _init_ray(cfg)
    mode, why = _same_trial_mode(cfg, exp_uri, resuming, *resolve_trial_mode(cfg))
    log.info("tune: %d trials, %d at once, %s trials (%s) -> %s%s", cfg.num_samples, cfg.max_concurrent, mode, why,
             exp_uri, " (resuming)" if resuming else "")
    # Tune starts every trial in its own working directory: the trials (and the driver's data
    # tasks) see the config with its local paths absolute; the summary and outputs use cfg
    trial_cfg = absolute_paths(cfg)
    data = prepare_data(trial_cfg, exp_uri, mode, resuming)
    steps = total_steps(cfg.base, data["num_train"])
    trials_root = storage.join(exp_uri, TRIALS_DIR)
    setup = {"tune": trial_cfg, "trials_root": trials_root, "val_labels": data["val_labels"],
             "held_out_ids": data["held_out_ids"], "eval": data["eval"], "num_train": data["num_train"]}
    if mode == "in_process":
        trainable = tune.with_parameters(in_process_trial, setup=setup, train_rows=data["train_rows"],
                                         val_rows=data["val_rows"])
        gpus = cfg.base.scaling.gpus_per_worker if cfg.base.scaling.use_gpu else 0
        trainable = tune.with_resources(trainable, {"CPU": cfg.trial_cpus, "GPU": gpus})
    else:
        trainable = tune.with_parameters(ray_train_trial, setup=setup, val_rows=data["val_rows"])
        # the Train workers hold the real resources (Tune refuses an empty request)
        trainable = tune.with_resources(trainable, {"CPU": 0.01})
    searcher, scheduler, space = build_search(cfg, steps)

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(cfg.state_save_period_s))
    if resuming:
        log.info("resuming the search in %s", exp_uri)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, storage_filesystem=fs, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.num_samples, trial_dirname_creator=_trial_dirname,
                                        reuse_actors=mode == "in_process"),  # no re-import per trial
            run_config=tune.RunConfig(name=cfg.base.run.name, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_trial_failures),
                                      stop=stop, verbose=1),
        )
    results = tuner.fit()
    summary = write_outputs(cfg, exp_uri, results, trials_root, steps)
    summary.update(trial_mode=mode, total_steps_per_trial=steps)
    if not summary["status"]["completed"] + summary["status"]["stopped"]:
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error]
        raise SeaRayError(f"no trial of {exp_uri} produced a result ({len(errors)} failed; first error: "
                          f"{errors[0] if errors else 'none reported'}); see {exp_uri}/results.csv")
    return summary
