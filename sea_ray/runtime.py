"""Connecting to Ray: a cluster when an address is given (config, ``--address`` or
``RAY_ADDRESS``), else a local Ray started with the config's CPU count. Jobs call
:func:`init_ray` once, after their config validated, never at import.

Two security rules live here and nowhere else:

- **A local Ray listens on loopback only.** Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once,
  when ``ray`` is first imported; set later it does nothing and the node binds the machine's
  external address with listeners on ``0.0.0.0`` (the ShadowRay exposure, CVE-2023-48022).
  :func:`init_ray` sets it before its first ``import ray`` and, when something imported Ray
  earlier, switches the constant Ray read (see :func:`_keep_local_ray_on_loopback`).
- **Credentials never travel in a runtime env.** Ray writes runtime envs into its job metadata
  and its runtime-env agent's log. A local Ray's workers inherit this process's environment, so a
  local run passes no runtime env at all; on a cluster, workers get credentials from the nodes'
  own environment (a Kubernetes Secret, an instance role), and only the non-secret
  :data:`SETTINGS_ENV` are forwarded. :func:`is_credential` is the one test of a name,
  :func:`carries_password` of a value (a URL with a password in it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
import urllib.parse

from sea_ray.errors import ConfigError
from sea_ray.storage import S3_ATTEMPTS_VAR, S3_TIMEOUT_VAR

log = logging.getLogger(__name__)

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Safe defaults for a local Ray on a laptop or CI box; set before Ray is imported.
LOCAL_ENV = {
    LOOPBACK_VAR: "0",  # bind a local Ray to loopback (read by Ray at import)
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Non-secret settings forwarded to a cluster's workers (object-storage endpoint and region, offline
# switches, caches, where the experiment trackers log). Credentials are not among them, on purpose
# (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN/PASSWORD): see the module doc.
SETTINGS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "SEA_RAY_CACHE",
                "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_BASE_URL", "WANDB_DIR", S3_ATTEMPTS_VAR, S3_TIMEOUT_VAR)

# The variables a cluster job names with ``sea-ray submit --cluster-env``: they must be set on the
# cluster's nodes; the job's driver checks that they are (names travel, values never do).
CLUSTER_ENV_VAR = "SEA_RAY_CLUSTER_ENV"

CREDENTIAL_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "RAY_AUTH_TOKEN",
                    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "AZURE_CLIENT_SECRET"}
_CREDENTIAL_PATTERN = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY)")


def is_credential(name: str) -> bool:
    """Whether a variable name holds a secret (never sent to a cluster, never logged)."""
    return name.upper() in CREDENTIAL_NAMES or bool(_CREDENTIAL_PATTERN.search(name.upper()))


def carries_password(value: str) -> bool:
    """Whether a setting's value is a URL with a password in it (``https://user:pass@host``, a
    tracking server's address written with its login): a credential, whatever its variable's name."""
    try:
        return urllib.parse.urlsplit(value.strip()).password is not None
    except ValueError:
        return False


def settings_env(names: tuple[str, ...] = SETTINGS_ENV) -> dict[str, str]:
    """The non-secret settings of this environment that a cluster's workers should see (``names``
    that are set; a value with a password in it is left out, with a warning naming the variable)."""
    found = {}
    for name in names:
        if name in os.environ and carries_password(os.environ[name]):
            log.warning("%s is a URL with a password in it: not sent to the cluster (give the cluster's nodes "
                        "the variable, docs/submit.md#credentials)", name)
        elif name in os.environ:
            found[name] = os.environ[name]
    return found


def submitted_job_env():
    """The env vars of this driver's Ray job runtime env, or None when not a submitted job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except ValueError:
        return {}


def _multi_host_opted_in() -> bool:
    """Whether the caller exported ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (a deliberate,
    multi-host local node)."""
    return os.environ.get(LOOPBACK_VAR, "0").strip().lower() in ("1", "true", "yes")


def _keep_local_ray_on_loopback() -> None:
    """Make the local Ray about to start bind loopback. The caller may opt out by exporting
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (a deliberate, multi-host local node)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if _multi_host_opted_in():
        return
    if "ray" in sys.modules:
        # Ray was imported before this call (by the caller or a library) and has read the variable
        # already. ENABLE_RAY_CLUSTER is the one switch Ray's node-address lookup reads at start
        # (ray._private.services.get_node_ip_address); tests/test_security.py pins the behaviour.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def check_loopback(ray) -> None:
    """Refuse a local Ray that came up on a non-loopback address (shut it down first)."""
    if _multi_host_opted_in():
        return
    address = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(address).is_loopback:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {address}, not on loopback; refusing to run exposed "
                           f"(set {LOOPBACK_VAR}=0 before anything imports ray)")


def check_cluster_env() -> None:
    """In a submitted job: every variable the job names (``submit --cluster-env``) is set on this
    node. One ConfigError lists the missing names (never a value)."""
    names = [n for n in os.environ.get(CLUSTER_ENV_VAR, "").split(",") if n]
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise ConfigError([f"{name}: the job needs it from the cluster (submit --cluster-env), but the cluster's "
                           "environment does not set it; give the cluster's pods or nodes the variable (a "
                           "Kubernetes Secret, docs/submit.md#credentials)" for name in missing])


# Ray's own INFO chatter in a job's output (worker-group starts, "Reporting training result", Ray
# Data's execution plans, and without a dashboard the Train placement-group cleaner's "Failed to
# query" warning every second): off when this variable is 1. The CLI sets it unless -v.
QUIET_VAR = "SEA_RAY_QUIET"
_QUIET_LEVELS = {"ray.train": logging.WARNING, "ray.data": logging.WARNING,
                 "aiobotocore.credentials": logging.WARNING, "botocore.credentials": logging.WARNING,
                 "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}
# Ray Train's worker context logs "Reporting training result ..." at every report on a logger
# named by its file's path (``getLogger(__file__)``), which no "ray.train" setting reaches.
_PATH_NAMED = "ray.train.v2._internal.execution.context"
# The logger that warns, once per process, that progress bars are off (sea_ray turns them off).
_PROGRESS_LOGGER = "ray.data._internal.progress"
# huggingface_hub's switch for its progress bars, which transformers follows when it is imported.
_HF_BARS_VAR = "HF_HUB_DISABLE_PROGRESS_BARS"


def _not_progress_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Progress bars")


def ray_logs_quiet() -> bool:
    return os.environ.get(QUIET_VAR) == "1"


def quiet_ray_logs() -> None:
    """When :data:`QUIET_VAR` is 1: Ray Train's and Ray Data's INFO logs off in this process (a
    local Ray's workers run it at start, as their ``worker_process_setup_hook``; Train workers run
    it again after their imports; Ray Train's own loggers follow the run's ``LoggingConfig``), and
    transformers' progress bars off where stderr is not a terminal. Warnings and errors stay."""
    if not ray_logs_quiet():
        return
    import importlib.util

    for name, level in _QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    spec = importlib.util.find_spec(_PATH_NAMED)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    progress = logging.getLogger(_PROGRESS_LOGGER)
    if _not_progress_notice not in progress.filters:
        progress.addFilter(_not_progress_notice)
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar: one line per model load in a log
        os.environ.setdefault(_HF_BARS_VAR, "1")  # read when transformers is imported (this process's workers)
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:  # imported already: its own switch
            hf_logging.disable_progress_bar()


def init_ray(ray_cfg=None, quiet: bool = False, dashboard: bool = False):
    """Connect to (or start) Ray unless this process already did; returns the ray module.

    ``dashboard`` gives a local Ray its dashboard (on 127.0.0.1), which tune's ray_train trials
    need; a cluster keeps its own."""
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if not address:
        _keep_local_ray_on_loopback()  # before the first `import ray`
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": not quiet}
    if address:
        check_cluster_env()
        if submitted_job_env() is None:
            # A driver connecting from a node: its workers inherit their own node's environment,
            # so only the non-secret settings are forwarded. Inside a submitted job the job's
            # runtime env already reaches every worker.
            kwargs["runtime_env"] = {"env_vars": settings_env()}
        log.info("connecting to the Ray cluster at %s", address)
        _remember(ray, ray.init(address=address, **kwargs))
        return ray
    num_cpus = getattr(ray_cfg, "num_cpus", None)
    log.info("starting a local Ray (%s CPUs)%s", num_cpus or "all", " with its dashboard" if dashboard else "")
    # No runtime env: the local workers inherit this process's environment (credentials included),
    # and nothing is written into Ray's metadata or logs.
    extra = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if dashboard else {"include_dashboard": False}
    if ray_logs_quiet():  # the hook's name is all this runtime env holds
        extra["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.quiet_ray_logs"}
        import ray.data  # noqa: F401 - Ray Data sets its loggers' levels when imported: before quieting

        quiet_ray_logs()
    _remember(ray, start_local_ray(num_cpus=num_cpus, **extra, **kwargs))
    check_loopback(ray)
    return ray


_LOCAL_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"  # Ray's message (ray._private.node) when its raylet is late


def start_local_ray(**init_kwargs):
    """``ray.init(address="local", **init_kwargs)``, started again (up to 3 attempts) when Ray's
    raylet misses the fixed 30 s Ray gives it to register, as it can on a busy machine; returns
    Ray's context."""
    import ray

    for attempt in range(1, _LOCAL_START_ATTEMPTS + 1):
        try:
            return ray.init(address="local", **init_kwargs)
        except Exception as exc:
            if _STARTUP_TIMEOUT not in str(exc) or attempt == _LOCAL_START_ATTEMPTS:
                raise
            log.warning("the local Ray did not start in time (attempt %d of %d): starting it again", attempt,
                        _LOCAL_START_ATTEMPTS)
            ray.shutdown()


# The context ray.init returned to init_ray, by the job id of that connection (a later ray.init,
# after a ray.shutdown, is another job: its context is not this one).
_CONNECTION: dict = {}


def _remember(ray, context) -> None:
    _CONNECTION.clear()
    _CONNECTION[ray.get_runtime_context().get_job_id()] = context


def dashboard_url():
    """The dashboard address of the Ray this process is connected to; None without a dashboard
    or a connection. Public API only: the ``dashboard_url`` of the context ``ray.init`` returned
    (Ray's own advice for its deprecated ``get_dashboard_url``). For a connection made outside
    :func:`init_ray` (a caller's own ``ray.init``), ``ray.init(ignore_reinit_error=True)`` hands
    back that connection's context: on a connected driver it connects and starts nothing
    (``address="local"`` only skips Ray's search for a running cluster)."""
    import ray

    if not ray.is_initialized():
        return None
    context = _CONNECTION.get(ray.get_runtime_context().get_job_id())
    if context is None:
        from ray.util.client import ray as ray_client

        if ray_client.is_connected():
            return None  # a Ray Client connection made elsewhere: its context is not ours to ask for
        context = ray.init(address="local", ignore_reinit_error=True)
    return getattr(context, "dashboard_url", None) or None
