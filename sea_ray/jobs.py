"""The job table: each sea_ray job by name, with its config class, its checks and its run function.

Everything that starts a job goes through here: ``sea-ray <job>``, ``sea-ray validate``, the
pipeline's steps, ``sea-ray submit`` (which checks before uploading) and the workflow entry
points. From Python::

    from sea_ray import jobs
    from sea_ray.config.loading import load_config

    jobs.run(load_config("workflows/configs/tiny_align.yaml", job="align"))

:func:`check` finds every problem a job can know before Ray starts and raises one
:class:`~sea_ray.errors.ConfigError` listing them; :func:`run` checks once, then runs. The run
functions themselves assume a checked config. The pipeline (:mod:`sea_ray.pipeline`) composes
these jobs and sits above this table; :mod:`sea_ray.preflight` checks any config, pipeline
included.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sea_ray import checks, paths
from sea_ray.config.loading import path_fields, validate
from sea_ray.config.schema import JOBS as CONFIG_CLASSES
from sea_ray.errors import ConfigError
from sea_ray.eval import job as eval_job
from sea_ray.export import benchmark
from sea_ray.labels import job as labels_job
from sea_ray.train import driver, tracking
from sea_ray.tune import search


@dataclass(frozen=True)
class Job:
    name: str
    summary: str
    run: Callable[[Any], dict]
    checks: tuple[Callable[[Any], list[str]], ...] = (checks.job_problems,)

    @property
    def config(self) -> type:
        """The job's config class (one map, :data:`sea_ray.config.schema.JOBS`, which validation reads)."""
        return CONFIG_CLASSES[self.name]


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("labels", "precompute CLIP patch labels with Ray Data", labels_job.run),
    Job("align", "stage 1: SEA alignment pretraining with Ray Train", driver.run,
        (checks.job_problems, tracking.problems)),
    Job("instruct", "stage 2: instruction tuning with Ray Train", driver.run,
        (checks.job_problems, tracking.problems)),
    Job("tune", "search SEA and adapter hyperparameters with Ray Tune + Optuna", search.run,
        (checks.job_problems, search.search_problems, tracking.problems)),
    Job("eval", "evaluate a checkpoint on a world or your own data (held-out LM loss, alignment diagnostics, "
        "QA accuracy)", eval_job.run),
    Job("benchmark", "lmms-eval benchmarks of exported models, side by side (one Ray task per model)",
        benchmark.run, (checks.job_problems, benchmark.problems)),
)}


def get_job(name: str) -> Job:
    """The job called ``name``; an unknown name is a ConfigError naming the valid ones."""
    if name not in JOBS:
        close = difflib.get_close_matches(name, JOBS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError([f"job: unknown job {name!r}{hint}; valid: {', '.join(JOBS)}"])
    return JOBS[name]


def job_problems(cfg) -> list[str]:
    """The problems the job's own checks find in a validated config."""
    found = []
    for check in get_job(cfg.job).checks:
        found += check(cfg)
    return found


def problems(cfg, inputs: bool = True) -> list[str]:
    """Every problem of a validated job config that is known before Ray starts: its job's checks,
    its inputs (every path exists, model folders hold a model; ``inputs=False`` leaves them out),
    and its outputs' place."""
    fields = [field for field in path_fields(cfg) if field[2] != "output"] if inputs else []
    return job_problems(cfg) + checks.input_problems(fields) + paths.package_output_problems(cfg)


def check(cfg, source: Optional[str] = None, inputs: bool = True) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (nothing when it may start)."""
    found = problems(cfg, inputs)
    if found:
        raise ConfigError(found, None if source is None else str(source))


def validated(raw: dict, job: str, where: str, found: list[str]):
    """``raw`` validated as a ``job`` config and checked by its job: the config, or None when
    validation fails. Every problem is appended to ``found`` prefixed with ``where`` (a step of a
    pipeline or the quickstart), so one report covers many jobs."""
    try:
        cfg = validate(raw, job=job)
    except ConfigError as exc:
        found.extend(f"{where}: {p}" for p in exc.problems)
        return None
    found.extend(f"{where}: {p}" for p in job_problems(cfg))
    return cfg


def run(cfg, source: Optional[str] = None, checked: bool = False) -> dict:
    """Check ``cfg`` (unless the caller just did) and run its job; returns the job's summary."""
    if not checked:
        check(cfg, source)
    return get_job(cfg.job).run(cfg)
