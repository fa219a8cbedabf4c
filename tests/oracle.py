"""Test helper: re-exports the library's oracle labels writer."""

from sea_ray.world.oracle import write_oracle_labels  # noqa: F401
