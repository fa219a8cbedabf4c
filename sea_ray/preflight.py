"""Checks for any job config before anything starts: one call that ``sea-ray validate``, the job
verbs, ``sea-ray pipeline`` and ``sea-ray submit`` share, run once per command.

A single job is checked by the job table (:func:`sea_ray.jobs.check`); a pipeline is planned
(:func:`sea_ray.pipeline.plan`: every step resolved, wired and checked), and the plan is returned
so the caller does not plan again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sea_ray import checks, jobs, paths, pipeline, quickstart, study
from sea_ray.config.loading import path_fields
from sea_ray.errors import ConfigError


def check(cfg, source: str | Path, inputs: bool = True) -> Optional[pipeline.Plan]:
    """Raise one ConfigError listing every problem; return the pipeline's plan (None for a job).
    ``inputs=False`` leaves out the checks of the input paths (a recipe whose data is not there yet)."""
    if cfg.job == "pipeline":
        plan = pipeline.plan(cfg, source)
        # the pipeline's own inputs and the steps' models; the steps' other inputs are made by
        # earlier steps or come from the pipeline's data section
        fields = [f for f in paths.job_paths(cfg) if f[2] != "output"]
        fields += [(f"{step.name}.{key}", value, role) for step in plan.steps if step.cfg is not None
                   for key, value, role in path_fields(step.cfg) if role == "model"]
        problems = (checks.input_problems(fields) if inputs else []) + paths.package_output_problems(cfg, plan)
        if problems:
            raise ConfigError(problems, str(source))
        return plan
    if cfg.job in jobs.JOBS:
        jobs.check(cfg, str(source), inputs=inputs)
    elif cfg.job == "study":
        study.plan(cfg, inputs=inputs)  # every comparison's quickstart and the job configs it runs, their models
    elif cfg.job == "quickstart":
        quickstart.check(cfg, inputs=inputs)  # every job config it runs and the model folders they start from
    return None
