"""The Ray Data side of the training stages' ingest: where rows come from, the actor pool that
preprocesses them, and the switches of the Ray Data context. What a row becomes (decode,
tokenize, mask) is :class:`sea_ray.train.data.Preprocess`; this module only moves rows.

Ordering: every dataset here keeps its input order (labels shards in shard order, manifest rows
in manifest order), so a resumed run sees the very same samples in the same place.
"""

from __future__ import annotations

from typing import Any, Callable


def from_files(paths: list[str], read: Callable, cpus: float):
    """One light task per file, in the given order; ``read(pyarrow batch of {"path"}) -> table``.
    (``read_parquet``'s file listing asks for a whole CPU, which a 2-core box running Train
    workers cannot give.)"""
    import ray.data

    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        read, batch_size=1, batch_format="pyarrow", num_cpus=cpus)


def from_rows(rows: list[dict], rows_per_block: int = 64, max_blocks: int = 200):
    """A dataset of in-memory rows, in order."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // rows_per_block, max_blocks)))


def preprocessed(source, fn_class: type, kwargs: dict[str, Any], num_actors: int, actor_cpus: float,
                 batch_size: int = 32):
    """``source`` mapped by ``fn_class(**kwargs)`` in a pool of ``num_actors`` actors (numpy batches)."""
    import ray.data

    return source.map_batches(fn_class, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=actor_cpus)


def filtered(ds, keep: Callable, cpus: float):
    """``ds`` with each whole numpy block passed through ``keep(batch) -> batch``."""
    return ds.map_batches(keep, batch_format="numpy", batch_size=None, num_cpus=cpus)


def configure(progress_bars: bool | None = None, preserve_order: bool | None = None) -> None:
    """Set the current Ray Data context's progress bars and ordering (None leaves a switch as is)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if progress_bars is not None:
        ctx.enable_progress_bars = progress_bars
    if preserve_order is not None:
        ctx.execution_options.preserve_order = preserve_order
