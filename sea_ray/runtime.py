"""Connecting to Ray: a cluster when an address is given (config, ``--address`` or
``RAY_ADDRESS``), else a local Ray started with the config's CPU count. Jobs call
:func:`init_ray` once, after their config validated, never at import."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Safe defaults for a local Ray on a laptop or CI box; a real cluster's env wins.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind a local Ray to loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
}

# Environment forwarded to every worker: object-storage endpoint/region and offline flags.
# Credentials are forwarded by name from this process's environment, never logged.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "SEA_RAY_CACHE")


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def _submitted_job_env():
    """The env vars of this driver's Ray job runtime env, or None when not a submitted job."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except ValueError:
        return {}


def init_ray(ray_cfg=None, quiet: bool = False):
    """Connect to (or start) Ray unless this process already did; returns the ray module."""
    import ray

    if ray.is_initialized():
        return ray
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": not quiet}
    job_env = _submitted_job_env()
    if job_env is not None:
        # Inside a submitted Ray job the job's runtime env already reaches every worker; passing
        # the same names again makes Ray refuse the merge (and print their values).
        kwargs["runtime_env"]["env_vars"] = {k: v for k, v in worker_env().items() if k not in job_env}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        num_cpus = getattr(ray_cfg, "num_cpus", None)
        log.info("starting a local Ray (%s CPUs)", num_cpus or "all")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray
