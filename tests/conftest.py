"""Test-session set-up: offline, quiet, no cloud metadata look-ups; shared tiny fixtures."""

import os

# Before anything imports transformers, ray or botocore.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """A small synthetic world (64 px images), generated once per test session."""
    from sea_ray.data.world import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, num_images=60, seed=0, image_size=64)
    return out
