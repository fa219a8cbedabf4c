"""Exceptions that the CLI maps to exit codes (2 for configuration errors)."""

from __future__ import annotations


class SeaRayError(Exception):
    """Base class of every error sea_ray raises on purpose."""


class ConfigError(SeaRayError):
    """A configuration failed validation. ``problems`` lists every problem found, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}")


class DataError(SeaRayError):
    """Input data cannot be used at all (not a single bad row: those are skipped and counted)."""


class TrainingFailed(SeaRayError):
    """A training stage's workers failed (their errors, one line per distinct error, in the message;
    the full tracebacks are in the workers' logs above it)."""
