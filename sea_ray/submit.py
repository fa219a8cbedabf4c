"""``sea-ray submit`` and ``sea-ray jobs``: sea_ray jobs on a Ray cluster, through the Ray Jobs API.

Run it::

    sea-ray submit --address http://127.0.0.1:8265 --wait -- pipeline --config workflows/configs/tiny_pipeline.yaml
    sea-ray jobs --address http://127.0.0.1:8265 [list | status ID | logs ID [--follow] | stop ID]

``submit`` validates the job's config here, then submits ``python -m workflows.<verb> <args>`` with
a runtime environment: the working directory (default: this repository, without ``.venv``,
``out``, ``runs`` and what ``.gitignore`` lists), optional pip requirements, and non-secret
environment settings. **Credentials never travel**: Ray keeps a job's runtime env in its job
metadata (``ray job list``, the dashboard) and its runtime-env agent's log, so a credential
(:func:`sea_ray.runtime.is_credential`) is refused in ``--env``; the cluster holds its own
(a Kubernetes Secret, an instance role), and ``--cluster-env NAME`` names the variables the job
needs from it (its driver checks them at start). Relative paths in the config are rewritten into
the uploaded working dir or refused (:mod:`sea_ray.paths`). With ``--wait`` it streams the job's
logs and returns the job's exit code (0 when it SUCCEEDED).

Authentication follows Ray's: with ``RAY_AUTH_MODE=token`` the token comes from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; with
``RAY_AUTH_MODE`` unset a token found in those places is used (Ray's own CLI only sends one in
token mode); ``RAY_AUTH_MODE=disabled`` sends none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from sea_ray import paths, pipeline, preflight
from sea_ray.config.loading import load_config
from sea_ray.config.schema import JOBS
from sea_ray.errors import ConfigError, SeaRayError
from sea_ray.runtime import CLUSTER_ENV_VAR, SETTINGS_ENV, carries_password, is_credential, settings_env

log = logging.getLogger(__name__)

# Never uploaded: the environment, outputs and caches (.gitignore'd paths are skipped by Ray too).
WORKING_DIR_EXCLUDES = [".git", ".venv", "out", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache",
                        ".whl", "*.pyc"]

# Passed when set here: the object-storage endpoint and region, offline switches, the trackers'
# settings (never a credential; never this machine's local folders).
DEFAULT_ENV = tuple(k for k in SETTINGS_ENV if k not in ("HF_HOME", "SEA_RAY_CACHE", "WANDB_DIR"))

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(SeaRayError):
    """The cluster cannot be reached, refused the job, or the job could not be followed."""


# --------------------------------------------------------------------------- client


def repo_root() -> Optional[Path]:
    """The repository this package runs from (it holds ``workflows/``), if any."""
    here = Path(__file__).resolve().parents[1]
    if (here / "workflows" / "__init__.py").is_file() and (here / "sea_ray").is_dir():
        return here
    return None


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(["--address: required (the cluster's dashboard URL, e.g. http://127.0.0.1:8265), or "
                           "set RAY_API_SERVER_ADDRESS"])
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def enable_token_auth_if_available() -> None:
    """With ``RAY_AUTH_MODE`` unset, present a token when one is configured (env or file), as
    ``ray start`` does. Ray's Jobs SDK alone sends a token only when ``RAY_AUTH_MODE=token``."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: its own defaults apply
        return
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception as exc:  # an unreadable token file: let the request fail with Ray's message
        log.debug("token auto-detection failed: %s", type(exc).__name__)


def client(address: Optional[str]):
    """A JobSubmissionClient for ``address`` (auth from the environment, see the module doc)."""
    enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _sdk(what: str):
    """Errors of the Jobs SDK (HTTP, auth, unknown job id) become one-line SubmitErrors (exit 1)."""
    try:
        yield
    except (SeaRayError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise SubmitError(f"{what}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- runtime env


def parse_env(items: list[str], defaults: bool = True) -> tuple[dict[str, str], list[str]]:
    """(env_vars, names missing here) from ``--env NAME`` (value from this environment) and
    ``--env NAME=VALUE`` (a literal). Both are for settings that are not secret: a credential's
    name, or a URL with a password in it, is refused, whichever way it is given."""
    env: dict[str, str] = {}
    missing: list[str] = []
    if defaults:
        env.update(settings_env(DEFAULT_ENV))
    refused = []
    for item in items:
        name, sep, value = item.partition("=")
        if not name.isidentifier():
            raise ConfigError([f"--env {name!r}: not a variable name"])
        if is_credential(name) or carries_password(value if sep else os.environ.get(name, "")):
            refused.append(f"--env {name}: a credential; sea-ray never sends credential values to a cluster (Ray "
                           "keeps a job's environment in its job metadata and logs). Give the cluster the "
                           f"variable (a Kubernetes Secret or an instance role, docs/submit.md#credentials) and "
                           f"pass --cluster-env {name}")
            continue
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
        else:
            missing.append(name)
    if refused:
        raise ConfigError(refused)
    return env, missing


def parse_cluster_env(names: list[str]) -> dict[str, str]:
    """``--cluster-env NAME``: the variables the job needs from the cluster's own environment.
    Only the names travel (in ``SEA_RAY_CLUSTER_ENV``); the job's driver checks them at start."""
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ConfigError([f"--cluster-env {n!r}: not a variable name" for n in bad])
    return {CLUSTER_ENV_VAR: ",".join(dict.fromkeys(names))} if names else {}


def runtime_env(working_dir: Path, env_vars: dict[str, str], pip: list[str], excludes: list[str]) -> dict:
    out: dict = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES + list(excludes)}
    if env_vars:
        out["env_vars"] = dict(env_vars)
    if pip:
        if len(pip) == 1 and Path(pip[0]).is_file():
            out["pip"] = str(Path(pip[0]).resolve())  # a requirements file
        else:
            out["pip"] = list(pip)
    return out


# --------------------------------------------------------------------------- the command


def _config_arg(args: list[str]) -> Optional[int]:
    for i, word in enumerate(args):
        if word == "--config" and i + 1 < len(args):
            return i + 1
        if word.startswith("--config="):
            return i
    return None


def entrypoint_for(command: list[str], working_dir: Path, python: str) -> str:
    """``python -m workflows.<verb> ARGS`` (or ``-m sea_ray.cli <verb>`` for a verb without an entry
    point), quoted for the shell."""
    verb, rest = command[0], command[1:]
    module = f"workflows.{verb.replace('-', '_')}"
    if (working_dir / "workflows" / f"{verb.replace('-', '_')}.py").is_file():
        words = [python, "-m", module, *rest]
    else:
        words = [python, "-m", "sea_ray.cli", verb, *rest]
    return " ".join(shlex.quote(w) if i else w for i, w in enumerate(words))


def prepare_command(command: list[str], working_dir: Path, parser: argparse.ArgumentParser, verbs: list[str],
                    validate: bool = True, excludes: Optional[list[str]] = None,
                    cwd: Optional[Path] = None) -> list[str]:
    """Check the verb (one of ``verbs``, parsed by ``parser``: the CLI's), make ``--config``
    relative to the working dir (what the job sees), check the config here, and rewrite or refuse
    its relative paths (:func:`sea_ray.paths.for_submission`), all before anything is uploaded."""
    cwd = cwd or Path.cwd()
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError(["nothing to submit: give the job after `--`, e.g. -- pipeline --config FILE"])
    verb = command[0]
    if verb not in verbs:
        valid = ", ".join(verbs)
        raise ConfigError([f"{verb!r} is not a sea-ray job verb; valid: {valid}"])
    command = list(command)
    index = _config_arg(command)
    if index is not None:
        raw = command[index].split("=", 1)[1] if command[index].startswith("--config=") else command[index]
        path = Path(raw)
        local = path if path.is_absolute() else working_dir / path
        if not local.is_file() and not path.is_absolute() and (cwd / raw).is_file():
            local = (cwd / raw).resolve()  # given relative to the current dir
        try:
            rel = local.resolve().relative_to(working_dir.resolve())
        except ValueError:
            raise ConfigError([f"--config {raw}: not inside the working dir {working_dir}; the job would not "
                               "find it (copy it there or pass --working-dir)"]) from None
        if not local.is_file():
            raise ConfigError([f"--config {raw}: file not found under {working_dir}"])
        command[index] = rel.as_posix() if not command[index].startswith("--config=") else f"--config={rel.as_posix()}"
    try:
        args = parser.parse_args(command)
    except SystemExit as exc:
        raise ConfigError([f"the job's command line is not valid: {shlex.join(command)}"]) from exc
    if getattr(args, "config", None):
        rewrites = _portable_paths(args, working_dir, cwd, validate, excludes or [])
        command += rewrites
    return command


def _portable_paths(args, working_dir: Path, cwd: Path, validate: bool, excludes: list[str]) -> list[str]:
    """Check the config here (unless told not to) and return the overrides that make its
    relative inputs point into the uploaded working dir; refuse every other relative path."""
    source = working_dir / args.config
    try:
        cfg = load_config(source, args.overrides, job=args.verb if args.verb in JOBS else None)
    except ConfigError:
        if validate:
            raise
        log.warning("--no-validate: the config does not load here, so its relative paths are not checked")
        return []
    plan = None
    if validate:
        plan = preflight.check(cfg, source)
    elif cfg.job == "pipeline":
        try:
            plan = pipeline.plan(cfg, source)
        except ConfigError:
            pass
    upload_excludes = WORKING_DIR_EXCLUDES + excludes + paths.gitignore_patterns(working_dir)
    rewrites, problems = paths.for_submission(cfg, cwd, working_dir, upload_excludes, plan)
    if problems:
        raise ConfigError(problems, str(source))
    return rewrites


def submit(command: list[str], parser: argparse.ArgumentParser, verbs: list[str], address: Optional[str] = None,
           wait: bool = False, working_dir: Optional[str] = None, pip: Optional[list[str]] = None,
           env: Optional[list[str]] = None, cluster_env: Optional[list[str]] = None, default_env: bool = True,
           excludes: Optional[list[str]] = None, python: str = "python",
           submission_id: Optional[str] = None, validate: bool = True, entrypoint_num_cpus: Optional[float] = None,
           out=None) -> int:
    """Submit a sea-ray job; with ``wait``, stream its logs and return its exit code."""
    out = out or sys.stdout
    wd = Path(working_dir) if working_dir else (repo_root() or Path.cwd())
    if not wd.is_dir():
        raise ConfigError([f"--working-dir {wd}: not a directory"])
    if not (wd / "workflows").is_dir():
        log.warning("%s has no workflows/ folder: the job runs `python -m sea_ray.cli`, which the cluster must "
                    "have installed", wd)
    command = prepare_command(command, wd, parser, verbs, validate=validate, excludes=excludes)
    env_vars, missing = parse_env(env or [], defaults=default_env)
    if missing:
        raise ConfigError([f"--env {name}: not set in this environment (nothing to pass through)" for name in missing])
    env_vars.update(parse_cluster_env(cluster_env or []))
    runtime = runtime_env(wd, env_vars, pip or [], excludes or [])
    entrypoint = entrypoint_for(command, wd, python)
    sid = submission_id or f"sea-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    jobs = client(address)
    print(f"submitting {sid}: {entrypoint}", file=out)
    print(f"  working dir: {wd}" + (f"; pip: {runtime['pip']}" if "pip" in runtime else ""), file=out)
    if env_vars:
        print(f"  environment: {', '.join(sorted(env_vars))} (values not shown)", file=out)
    if cluster_env:
        print(f"  from the cluster's own environment: {', '.join(cluster_env)}", file=out)
    unsent = sorted(k for k in os.environ if is_credential(k) and k.startswith(("AWS_", "HF_")) and
                    k not in (cluster_env or []))
    if unsent:
        print(f"  not sent (credentials never are): {', '.join(unsent)}; the cluster uses its own "
              "(docs/submit.md#credentials)", file=out)
    try:
        jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime, submission_id=sid,
                        metadata={"sea_ray_verb": command[0]}, entrypoint_num_cpus=entrypoint_num_cpus)
    except Exception as exc:
        raise SubmitError(f"the cluster refused the job: {_first_line(exc)}") from exc
    if not wait:
        print(f"submitted {sid}; follow it with: sea-ray jobs --address {resolve_address(address)} logs {sid} --follow",
              file=out)
        return 0
    with _sdk(f"following {sid}"):
        return follow(jobs, sid, out=out)


def follow(jobs, sid: str, out=None, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; return its exit code (0 on SUCCEEDED)."""
    out = out or sys.stdout

    async def tail():
        async for chunk in jobs.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        try:
            asyncio.run(tail())
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the stream broke: fall back to polling, the job goes on
            log.warning("log stream of %s interrupted (%s); waiting for the job to end", sid, _first_line(exc))
        info = jobs.get_job_info(sid)
        while str(info.status) not in TERMINAL and getattr(info.status, "value", None) not in TERMINAL:
            time.sleep(poll_s)
            info = jobs.get_job_info(sid)
    except KeyboardInterrupt:
        print(f"\nstopped following {sid}; the job goes on (sea-ray jobs stop {sid} stops it)", file=out)
        return 130
    return exit_code(info, out)


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def exit_code(info, out=None) -> int:
    status = _status(info)
    code = getattr(info, "driver_exit_code", None)
    if out is not None:
        extra = f", exit code {code}" if code is not None else ""
        message = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
        print(f"job {info.submission_id} {status}{extra}{message}", file=out)
    if status == "SUCCEEDED":
        return 0
    return code if isinstance(code, int) and code > 0 else 1


# --------------------------------------------------------------------------- jobs


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def list_jobs(address: Optional[str], out=None) -> int:
    """One line per job: id, status, start, end, exit code, entrypoint. Runtime-env values are
    never shown (they may hold credentials); only the variable names are."""
    out = out or sys.stdout
    with _sdk("listing the jobs"):
        jobs = client(address).list_jobs()
    jobs.sort(key=lambda j: j.start_time or 0)
    print(f"{'SUBMISSION ID':42s} {'STATUS':10s} {'START':19s} {'END':19s} {'EXIT':4s} ENTRYPOINT", file=out)
    for job in jobs:
        code = job.driver_exit_code if job.driver_exit_code is not None else "-"
        print(f"{str(job.submission_id or job.job_id):42s} {_status(job):10s} {_when(job.start_time):19s} "
              f"{_when(job.end_time):19s} {str(code):4s} {job.entrypoint}", file=out)
    return 0


def job_status(address: Optional[str], sid: str, out=None) -> int:
    out = out or sys.stdout
    with _sdk(f"job {sid}"):
        info = client(address).get_job_info(sid)
    names = sorted(((info.runtime_env or {}).get("env_vars") or {}))
    print(f"{sid}: {_status(info)}" + (f" ({info.message})" if info.message else ""), file=out)
    print(f"  entrypoint: {info.entrypoint}", file=out)
    if names:
        print(f"  environment: {', '.join(names)} (values not shown)", file=out)
    return 0


def job_logs(address: Optional[str], sid: str, follow_logs: bool = False, out=None) -> int:
    out = out or sys.stdout
    jobs = client(address)
    with _sdk(f"logs of {sid}"):
        if follow_logs:
            return follow(jobs, sid, out=out)
        out.write(jobs.get_job_logs(sid))
    return 0


def stop_job(address: Optional[str], sid: str, wait_s: float = 30.0, out=None) -> int:
    out = out or sys.stdout
    jobs = client(address)
    with _sdk(f"stopping {sid}"):
        if not jobs.stop_job(sid):
            print(f"{sid}: already {_status(jobs.get_job_info(sid))}", file=out)
            return 0
        deadline = time.time() + wait_s
        info = jobs.get_job_info(sid)
        while _status(info) not in TERMINAL and time.time() < deadline:
            time.sleep(0.5)
            info = jobs.get_job_info(sid)
    print(f"{sid}: {_status(info)}", file=out)
    return 0 if _status(info) in TERMINAL else 1
