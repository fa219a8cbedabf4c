"""The Ray Data side of the training stages' ingest: where rows come from, the actor pool that
preprocesses them, and the switches of the Ray Data context. What a row becomes (decode,
tokenize, mask) is :class:`sea_ray.train.data.Preprocess`; this module only moves rows.

Ordering: the order of the rows is decided by :mod:`sea_ray.train.feed`; the datasets here keep
it (``preserve_order``).
"""

from __future__ import annotations

from typing import Any

from sea_ray.runtime import quiet_ray_logs


def segments(segments: list, fn_class: type, kwargs: dict[str, Any], num_actors: int, actor_cpus: float):
    """A dataset of ``(source rows, stream positions)`` segments, in order, each mapped by
    ``fn_class(**kwargs)`` (a generator of numpy batches) in a pool of ``num_actors`` actors."""
    import ray.data

    items = [{"rows": rows, "positions": positions} for rows, positions in segments]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn_class, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=actor_cpus)


def blocks(ds, prefetch: int = 2):
    """The numpy batches of ``ds`` as they were produced (no re-batching)."""
    return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch)


def configure(progress_bars: bool | None = None, preserve_order: bool | None = None) -> None:
    """Set the current Ray Data context's progress bars and ordering (None leaves a switch as is),
    and quiet Ray Data's INFO logs in this process when the job asks for it."""
    import ray.data

    quiet_ray_logs()

    ctx = ray.data.DataContext.get_current()
    if progress_bars is not None:
        ctx.enable_progress_bars = progress_bars
    if preserve_order is not None:
        ctx.execution_options.preserve_order = preserve_order
