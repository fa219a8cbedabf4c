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


class TooManyErrors(DataError):
    """More rows were bad than the job's ``max_error_fraction`` allows (or none was usable): the
    job wrote no completion marker. The message holds the error summary (counts by stage and
    reason, a few example rows); ``errors`` and ``rows`` are the counts it judged."""

    def __init__(self, message: str, errors: int, rows: int):
        self.errors, self.rows = errors, rows
        super().__init__(message)


class NotInstalled(SeaRayError):
    """An optional package a model or job needs is not installed; the message says how to install it."""
