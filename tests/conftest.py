"""Test-session set-up: offline, quiet, no cloud metadata look-ups; shared tiny fixtures."""

import os

# Before anything imports transformers, ray or botocore.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Faster Ray Train start-up and failure detection in tests.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# A Ray Data job that stops moving fails after 5 minutes instead of Ray's 30.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")

import pytest  # noqa: E402

# The files that take minutes, the longest first. The suite runs in two processes (pytest-xdist,
# each file whole in one of them, in this order: pyproject's addopts): starting the long files
# first keeps both processes busy to the end instead of leaving one to finish them alone.
LONGEST_FIRST = ("test_docs.py", "test_submit_cluster.py", "test_train.py", "test_tune.py", "test_docs_pipeline.py",
                 "test_labels_job.py", "test_s3_outage.py", "test_security.py", "test_submit_token.py", "test_quickstart.py",
                 "test_feed.py", "test_bad_data.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
    # Opt-in markers: their tests run only when the -m expression names them (`-m multinode`).
    expression = config.getoption("markexpr") or ""
    for marker, why in OPT_IN.items():
        if marker not in expression:
            skip = pytest.mark.skip(reason=f"{why}; opt in with -m {marker}")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


# Markers whose tests are too heavy for the default suite (what each costs).
OPT_IN = {"multinode": "starts a private Ray cluster of a head and two worker nodes and runs jobs on it "
                       "(minutes on 2 cores)"}


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """A small synthetic world (64 px images), generated once per test session."""
    from sea_ray.world.generator import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, num_images=60, seed=0, image_size=64)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on loopback (moto's server), for the whole session.

    Exports AWS_ENDPOINT_URL and test credentials so that everything started afterwards
    (Ray workers included) reaches it; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket per test; yields its s3:// URI."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(autouse=True)
def _ray_resources_released(request):
    """After each test on the session's Ray: every CPU it held is free again (within 30 s).

    A test that leaves an actor or a placement group behind would otherwise starve a later test
    of the same process, which then waits for CPUs that never come."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + 30
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.time() < deadline:
        time.sleep(0.5)
    if free < total:
        pytest.fail(f"{request.node.nodeid} left {total - free:g} of the session Ray's {total:g} CPUs held after 30 s "
                    "(an actor, a task or a placement group it started is still alive)", pytrace=False)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole test session (2 CPUs, no dashboard), started after the S3
    server so workers inherit its endpoint and credentials."""
    import ray

    from sea_ray.runtime import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                    runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
