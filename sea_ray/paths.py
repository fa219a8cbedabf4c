"""Relative paths of a job config that runs somewhere else (a submitted Ray job).

A submitted job runs in a temporary copy of the uploaded working dir, inside Ray's session
folder. A relative input there resolves against that copy, a relative output is written into it
and lost when Ray cleans up. So before submission (``sea-ray submit``) every relative path is
either rewritten or refused:

- an input (or a model folder) that lies inside the uploaded working dir is rewritten relative to
  it (the job's working directory), so the job reads the uploaded copy;
- any other relative input, and every relative output (defaults such as ``run.storage: ./runs``
  included), is refused with the value to write instead: an ``s3://`` URI or an absolute path the
  cluster's nodes share.

Inside a submitted job the same walk refuses relative outputs (:func:`package_output_problems`),
so a job submitted with ``ray job submit`` directly cannot write into its package folder either.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable, Optional

from sea_ray import storage
from sea_ray.config.loading import map_paths, path_fields


def _local(value: str) -> Optional[str]:
    """The local path of a value, or None for a URI (s3://, hf://, ...)."""
    if value.startswith("file://"):
        return value[len("file://"):]
    return None if storage.is_remote(value) else value


def names_a_path(value: str, cwd: Optional[Path] = None) -> bool:
    """Whether a model value (``model.llm.name_or_path``, ``model.vision.name``, a tokenizer...)
    names a path rather than a hub id, an architecture or a registered name (``world``): a URI, an
    absolute or explicitly relative path (``./``, ``../``, ``~``), something that exists from
    ``cwd``, or a relative path whose first folder exists from ``cwd`` (``own/clpi`` beside a folder
    ``own``: a misspelt folder, not the hub id of an organisation ``own``). The one rule for the
    input checks and for submission."""
    if value == "world":
        return False
    here = cwd or Path.cwd()
    return ("://" in value or os.path.isabs(value) or value.startswith(("./", "../", "~"))
            or here.joinpath(value).exists() or ("/" in value and here.joinpath(value.split("/", 1)[0]).is_dir()))


# Model values that name something built in, never a path (whatever lies in the working dir).
BUILT_IN_MODEL_NAMES = ("custom", "world")


def absolute(value: Optional[str]) -> Optional[str]:
    """A local path made absolute (a ``file://`` URI becomes its absolute local path); a URI
    (``s3://``, ``hf://``...), None and ``""`` as they are. The rule for every place that hands
    a path to a process with another working directory."""
    local = _local(value) if value else None
    return value if local is None else os.path.abspath(local)


def absolute_paths(cfg):
    """``cfg`` (any job config, nested ones too) with its local paths made absolute, for the
    processes that run it elsewhere in the same filesystem (Ray Train workers, Tune trials, each
    in its own working directory): every input, output and world folder, as marked in
    :mod:`sea_ray.config.schema` (:func:`~sea_ray.config.loading.map_paths`); a model value only when it is an
    existing local path (hub ids, architecture names, ``custom`` and ``world`` stay, see
    :func:`names_a_path`). Returns a copy; ``cfg`` is not changed."""

    def rule(key: str, value: str, role: str) -> str:
        if role == "model":
            local = _local(value)
            if (local is None or value in BUILT_IN_MODEL_NAMES or not names_a_path(value)
                    or not os.path.exists(local)):
                return value
        return absolute(value)

    return map_paths(cfg, rule)


def job_paths(cfg, plan=None) -> list[tuple[str, str, str]]:
    """(override key, value, role) of every path a job reads or writes. A pipeline adds its steps'
    paths (key ``<step>.set.<field>``, applied over the step's recipe and wiring), except those
    the pipeline derives from its own ``output``; its ``data.world`` is an output when the world
    step runs."""
    found = []
    for key, value, role in path_fields(cfg):
        if role == "world":
            role = "output" if "world" in getattr(cfg, "steps", ()) else "input"
        found.append((key, value, role))
    if plan is not None:
        derived = (cfg.output.rstrip("/") + "/", os.path.abspath(cfg.output).rstrip("/") + "/")
        for step in plan.steps:
            if step.cfg is None:
                continue
            for key, value, role in path_fields(step.cfg):
                if not value.startswith(derived):
                    found.append((f"{step.name}.set.{key}", value, role))
    return found


def _relative(paths: Iterable[tuple[str, str, str]], cwd: Path) -> list[tuple[str, str, str, Path]]:
    """The relative local paths among ``paths``, with where they point from ``cwd``; a model value
    only when it names a path (:func:`names_a_path`)."""
    out = []
    for key, value, role in paths:
        local = _local(value)
        if local is None or os.path.isabs(local):
            continue
        if role == "model" and not names_a_path(value, cwd):
            continue
        where = (cwd / local).resolve()
        out.append((key, value, role, where))
    return out


def _uploaded(path: Path, working_dir: Path, excludes: list[str]) -> bool:
    """Whether ``path`` is inside ``working_dir`` and not left out of the upload."""
    try:
        rel = path.relative_to(working_dir.resolve())
    except ValueError:
        return False
    parts = rel.parts
    for pattern in excludes:
        pattern = pattern.strip().strip("/")
        if not pattern:
            continue
        for i in range(len(parts)):
            if fnmatch.fnmatch(parts[i], pattern) or fnmatch.fnmatch("/".join(parts[: i + 1]), pattern):
                return False
    return True


def gitignore_patterns(working_dir: Path) -> list[str]:
    """The plain patterns of the working dir's ``.gitignore`` (Ray leaves those paths out too)."""
    try:
        lines = (working_dir / ".gitignore").read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


def for_submission(cfg, cwd: Path, working_dir: Path, excludes: list[str],
                   plan=None) -> tuple[list[str], list[str]]:
    """(overrides that rewrite relative inputs for the job, problems). ``cwd`` is where the user's
    relative paths point (the submitting directory); ``excludes`` what the upload leaves out."""
    overrides, problems = [], []
    for key, value, role, where in _relative(job_paths(cfg, plan), cwd):
        shared = f"{key}={where}"
        if role == "output":
            problems.append(f"{key}: {value!r} is a relative path; on the cluster the job would write it into "
                            "its temporary copy of the working dir, which is lost. Write an s3:// URI, or "
                            f"{shared} if the cluster's nodes share this filesystem")
        elif _uploaded(where, working_dir, excludes):
            rel = where.relative_to(working_dir.resolve()).as_posix()
            if rel != os.path.normpath(_local(value)):
                overrides.append(f"{key}={rel}")
        else:
            problems.append(f"{key}: {value!r} is a relative path to {where}, which is not uploaded with the "
                            f"working dir {working_dir}; the job would not find it. Write an s3:// URI, "
                            f"{shared} if the cluster's nodes share this filesystem, or put it inside the "
                            "working dir")
    return overrides, problems


def in_job_package(cwd: Optional[Path] = None) -> bool:
    """Whether this process runs in a Ray job's unpacked working dir (Ray's runtime resources)."""
    return "runtime_resources" in (cwd or Path.cwd()).resolve().parts


def package_output_problems(cfg, plan=None) -> list[str]:
    """Inside a Ray job's package folder: every relative output, refused (it would be lost)."""
    if not in_job_package():
        return []
    return [f"{key}: {value!r} is a relative path, and this job runs in Ray's temporary copy of its working dir "
            "(deleted after the job); write an s3:// URI or an absolute path"
            for key, value, role, _ in _relative(job_paths(cfg, plan), Path.cwd()) if role == "output"]
