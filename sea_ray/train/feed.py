"""The one data feed of the stage recipe: which training rows each worker's micro-batches hold.

Every caller of :func:`sea_ray.train.loop.run_stage` (Ray Train workers, the quickstart, tune
trials, benchmarks) gets its micro-batches from here, in one documented order.

**Source rows.** ``n`` rows numbered ``0 .. n-1``: for align the labels dataset's rows in shard
order, for instruct the manifest's rows, in both cases minus the rows a search holds out. A row
that preprocessing drops (an unreadable image, a conversation with nothing left to supervise)
still has its number; its micro-batch is one sample short.

**The order** (:class:`Order`). The rows are cut into windows of ``window`` consecutive rows
(``data.shuffle_window``). Epoch ``e`` visits the windows in the permutation
``numpy.random.default_rng([seed, e])`` draws and the rows of window ``w`` in the permutation
``default_rng([seed, e, w])`` draws; the stream is epoch 0, epoch 1, ... one after the other.
Optimizer step ``s`` consumes stream positions ``[s * G, (s + 1) * G)`` (``G`` the global batch);
a global batch may span an epoch boundary, so no accumulation is ever dropped. Those ``G``
positions are ``G / p`` chunks of ``p = batch.per_worker`` consecutive positions; worker ``r`` of
``W`` takes chunks ``r, r + W, r + 2W, ...`` as its micro-batches. So a step's global batch, and
its chunks, are the same whatever the number of workers; only who computes which chunk changes.
A resumed run starts at the position of its step: nothing consumed is read again.

A window is the unit of reading: a worker reads the rows of a window it needs in one go (for
align, the labels' row groups that hold them), so a larger window shuffles more widely and reads
more at once. With ``n <= window`` every epoch is a full permutation.

**Two sources, the same batches.** :func:`ray_micro_batches` preprocesses a worker's rows lazily
on Ray Data (an actor pool of :class:`sea_ray.train.data.Preprocess` per worker, window shares in
stream order); :func:`memory_micro_batches` takes them from rows preprocessed once by the same
``Preprocess`` (:func:`materialize`) and kept in memory, for callers that train many short runs on
one small set (the quickstart, in-process tune trials). Both yield exactly the same micro-batches
(tested); a micro-batch whose every row was dropped is ``None``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from sea_ray.data import ingest
from sea_ray.errors import DataError
from sea_ray.train.data import Preprocess, stack

log = logging.getLogger(__name__)


def chunk_of(rank: int, micro: int, world_size: int) -> int:
    """Which micro-batch of its step's global batch (0 .. global / per_worker - 1) worker ``rank``
    reads at accumulation step ``micro``: the rows, whatever the number of workers, so that the
    per-micro-batch randomness keyed by it is the same on any number of workers."""
    return rank + micro * world_size


@dataclass(frozen=True)
class Order:
    """The documented order of one run (see the module docstring)."""

    num_rows: int
    global_size: int
    per_worker: int
    seed: int
    window: int
    _epochs: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_rows < 1:
            raise ValueError("a feed needs at least one row")
        if self.global_size % self.per_worker:
            raise ValueError(f"global batch {self.global_size} is not divisible by the micro-batch {self.per_worker}")

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(source rows in epoch ``e``'s order, the stream offsets where its windows start)."""
        if e not in self._epochs:
            n, size = self.num_rows, self.window
            windows = np.random.default_rng([self.seed, e]).permutation(-(-n // size))
            parts = [w * size + np.random.default_rng([self.seed, e, int(w)]).permutation(min(size, n - w * size))
                     for w in windows]
            starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[e] = (np.concatenate(parts).astype(np.int64), starts)
        return self._epochs[e]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Source rows at stream ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.num_rows
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[0][positions[sel] % self.num_rows]
        return out

    def chunks(self, world_size: int, rank: int, start_step: int, steps: int) -> Iterator[int]:
        """The chunk numbers of worker ``rank``'s micro-batches from ``start_step`` to ``steps``, in
        order (chunk ``c`` holds stream positions ``[c * p, (c + 1) * p)``)."""
        per_step = self.global_size // self.per_worker
        if per_step % world_size:
            raise ValueError(f"global batch {self.global_size} is not divisible by "
                             f"{world_size} workers x {self.per_worker}")
        for s in range(start_step, steps):
            yield from (s * per_step + chunk_of(rank, micro, world_size) for micro in range(per_step // world_size))

    def segments(self, chunks: Iterable[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(source rows, stream positions)`` of ``chunks``, grouped into runs of one window of
        one epoch (the reading unit), in stream order."""
        p = self.per_worker
        positions = np.concatenate([np.arange(c * p, (c + 1) * p, dtype=np.int64) for c in chunks] or [[]])
        if not len(positions):
            return []
        epochs = positions // self.num_rows
        window = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            window[sel] = np.searchsorted(self.epoch(int(e))[1], positions[sel] % self.num_rows, side="right")
        key = epochs * (self.num_rows + 1) + window
        cuts = np.flatnonzero(np.diff(key)) + 1
        return [(self.rows(pos), pos) for pos in np.split(positions, cuts)]


def order_of(cfg, num_rows: int) -> Order:
    return Order(num_rows, cfg.batch.global_size, cfg.batch.per_worker, cfg.run.seed, cfg.data.shuffle_window)


# --------------------------------------------------------------------------- micro-batches


def _unstack(batch: dict) -> list[dict]:
    n = len(batch["position"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _regroup(blocks: Iterable[dict], chunks: list[int], per_worker: int) -> Iterator[Optional[dict]]:
    """Preprocessed rows in stream order -> one batch per expected chunk (None: all rows dropped)."""
    pending: list[dict] = []
    k = 0
    for block in blocks:
        for row in _unstack(block):
            chunk = int(row["position"]) // per_worker
            while chunk > chunks[k]:
                yield stack(pending) if pending else None
                pending, k = [], k + 1
            pending.append(row)
    while k < len(chunks):
        yield stack(pending) if pending else None
        pending, k = [], k + 1


def ray_micro_batches(source, preprocess: dict, order: Order, world_size: int, rank: int, start_step: int,
                      steps: int, actors: int = 1, actor_cpus: float = 0.5) -> Iterator[Optional[dict]]:
    """Worker ``rank``'s micro-batches from ``start_step`` on, preprocessed on Ray Data as they go
    (``preprocess``: the keyword arguments of :class:`~sea_ray.train.data.Preprocess` but the source)."""
    chunks = list(order.chunks(world_size, rank, start_step, steps))
    segments = order.segments(chunks)
    if not segments:
        return iter(())
    ingest.configure(progress_bars=False, preserve_order=True)  # this process's Ray Data context
    ds = ingest.segments(segments, Preprocess, dict(preprocess, source=source), actors, actor_cpus)
    return _regroup(ingest.blocks(ds), chunks, order.per_worker)


def materialize(source, preprocess: dict, actors: int = 1, actor_cpus: float = 0.5, rows_per_segment: int = 512,
                in_process: bool = False) -> dict[str, np.ndarray]:
    """Every source row preprocessed once, in memory: ``{column: array}`` sorted by ``position``
    (= the source row); rows preprocessing drops are absent. On Ray Data, or with
    ``in_process`` in this process (the same :class:`~sea_ray.train.data.Preprocess`, no Ray)."""
    n = source.num_rows
    segments = [(np.arange(a, min(n, a + rows_per_segment)),) * 2 for a in range(0, n, rows_per_segment)]
    if in_process:
        fn = Preprocess(**preprocess, source=source)
        blocks = (b for rows, pos in segments for b in fn({"rows": [rows], "positions": [pos]}))
    else:
        ingest.configure(progress_bars=None, preserve_order=True)
        blocks = ingest.blocks(ingest.segments(segments, Preprocess, dict(preprocess, source=source), actors,
                                               actor_cpus))
    samples = [row for block in blocks for row in _unstack(block)]
    if not samples:
        raise DataError("the dataset yielded no usable sample")
    return stack(samples)


def memory_micro_batches(rows: dict[str, np.ndarray], order: Order, world_size: int, rank: int, start_step: int,
                         steps: int) -> Iterator[Optional[dict]]:
    """The same micro-batches as :func:`ray_micro_batches`, taken from :func:`materialize`'s rows."""
    have = rows["position"]
    p = order.per_worker
    for chunk in order.chunks(world_size, rank, start_step, steps):
        wanted = order.rows(np.arange(chunk * p, (chunk + 1) * p))
        at = np.clip(np.searchsorted(have, wanted), 0, len(have) - 1)
        index = at[have[at] == wanted]
        yield {k: v[index] for k, v in rows.items()} if len(index) else None


def num_rows(rows: dict[str, np.ndarray]) -> int:
    return len(rows["position"])
