"""The labels job: CLIP patch labels for every image of a manifest, with Ray Data.

Run it::

    sea-ray world --out out/world --num-images 300 --image-size 64
    sea-ray labels --config workflows/configs/tiny_labels.yaml [dotted.key=value ...]

or from Python: ``sea_ray.labels.job.run(load_config(path, job="labels"))``.

Recipe (top to bottom in :func:`run`):

1. **plan, on the driver, before any Ray resource:** read and validate the manifest (bad rows
   go to ``errors/manifest.parquet``), build the vocabulary from its captions, build the tower
   once (seeded) for its transform and patch grid and to check that its text tower works, cut
   the valid rows into shards of ``compute.rows_per_shard`` in manifest order, and compare the
   fingerprint of this setup with the one stored in ``_config.json`` (a re-run must match).
2. **skip** every shard whose completion marker exists (unless the error rows recorded so far
   exceed the error budget: then the shards holding errors are redone, a re-run after fixing the
   data); if none is pending, only refresh ``_meta.json`` and ``_SUCCESS``.
3. **pipeline** over the pending rows: ``from_arrow`` (or, for image-text shards, Ray Data's
   ``read_webdataset`` / ``read_parquet`` of the shard files in Ray tasks, each sample placed by
   its file and id: :func:`sea_ray.data.shards.image_dataset`; the driver reads no image) ->
   ``map_batches(decode_batch)`` (CPU tasks:
   read, decode, the tower's geometry: resize + crop, or pad + resize) ->
   ``map_batches(LabelActor, compute=ActorPoolStrategy)`` (the labeler; ``num_gpus`` per actor,
   or CPUs) -> ``map_batches(write_parts)`` (tasks: each run of one shard's rows written straight
   to the output as a Parquet part, ``shards/shard-K/part-*.parquet``) -> ``iter_batches`` of the
   part records back on the driver: counts, file names and error rows, never a label.
4. **mark** each shard as soon as all its rows are in: its errors (``ERRORS_SCHEMA``), then its
   marker, which lists its parts. A kill at any point loses at most the shards without a marker,
   whose files the next run deletes and writes anew: no id is ever duplicated or lost.
5. **finish:** judge the error budget over the whole dataset (malformed manifest rows plus every
   shard's error rows, against ``data.max_error_fraction`` of the manifest's rows; a dataset with
   no labelled row always fails): over it, the job raises
   :class:`~sea_ray.errors.TooManyErrors` with a summary and writes no ``_SUCCESS`` (the shards
   and markers stay; the pipeline stops early once the outcome is certain). Then check that the
   markers cover every valid row exactly once, write ``_meta.json`` and, last, ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from sea_ray import storage
from sea_ray.config.loading import to_dict
from sea_ray.config.schema import LabelsConfig
from sea_ray.data import budget, shards
from sea_ray.data.manifest import image_root_for, read_manifest
from sea_ray.errors import ConfigError, DataError, SeaRayError, TooManyErrors
from sea_ray.labels import dataset as D
from sea_ray.labels.pipeline import LOAD_FAILED, LabelActor, decode_batch, write_parts
from sea_ray.labels.schema import META_KEYS, SCHEMA_VERSION
from sea_ray.labels.vocab import Vocab, build_vocab, captions_of
from sea_ray.runtime import init_ray

log = logging.getLogger(__name__)

_MAX_BLOCKS = 4096  # cap on input blocks (bigger manifests get bigger blocks)


class LabelsInterrupted(SeaRayError):
    """Raised by the ``stop_after_shards`` test hook: the job stopped as if killed."""


class _OverBudget(SeaRayError):
    """The error rows so far exceed the budget: the pipeline stops, :func:`run` reports."""


class _Stalled(SeaRayError):
    """Nothing moved through the pipeline for ``compute.stall_timeout_s`` before its first shard."""


# How long a stopped pipeline's actors may hold their resources: Ray's graceful-shutdown timeout
# (30 s), then its force kill.
_RELEASE_S = 40.0


@dataclass
class Plan:
    """Everything the driver decides before Ray starts."""

    cfg: LabelsConfig
    rows: list[dict]
    manifest_errors: list[dict]
    manifest_rows: int
    vocab: Vocab
    transform: object
    transform_spec: dict
    grid: tuple[int, int]
    embed_dim: int
    image_root: Optional[str] = None  # data.image_root, else the one the importer recorded
    source: Optional[shards.Source] = None  # what data.manifest holds (image-text shards: read by Ray Data)
    shards: list[list[dict]] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return int(self.transform_spec["image_size"])

    def fingerprint(self) -> dict:
        """What must not change between runs writing the same output."""
        ids = hashlib.sha256("\n".join(r["id"] for r in self.rows).encode("utf-8")).hexdigest()
        lab = self.cfg.labeler
        return {"schema_version": SCHEMA_VERSION, "valid_rows": len(self.rows), "ids_sha256": ids,
                "rows_per_shard": self.cfg.compute.rows_per_shard, "vocab_hash": self.vocab.hash,
                "vision": self.cfg.model.vision.model_dump(mode="json"), "seed": self.cfg.seed,
                "labeler": {"top_n": lab.top_n, "templates": list(lab.templates), "score_sign": lab.score_sign,
                            "features": lab.features},
                "max_image_pixels": self.cfg.data.max_image_pixels, "transform": self.transform_spec}


def _probe_tower(cfg: LabelsConfig):
    """The tower's transform (under ``data.image_aspect``, recorded in the fingerprint and
    ``_meta.json`` as ``transform.resize``), grid and width, from its architecture on the meta device
    (:func:`~sea_ray.model.vision.probe_vision_tower`). Its weights and text tower are first used in
    the actors (a weights file that is not one is refused before, by :mod:`sea_ray.checks`); weights
    that do not fit the tower stop the job with the loader's error (:func:`_stream`)."""
    from sea_ray.model.vision import probe_vision_tower

    try:
        tower = probe_vision_tower(cfg.model.vision, cfg.data.image_aspect)
    except Exception as exc:
        raise ConfigError([f"model.vision: cannot build the tower ({type(exc).__name__}: {exc})"]) from exc
    if cfg.model.vision.backend == "hf" and getattr(tower, "_tokenizer", None) is None:
        raise ConfigError([f"model.vision.name: {cfg.model.vision.name} has no tokenizer; the labeler needs the "
                           "text tower and its tokenizer (save the tokenizer into the model dir)"])
    out = (tower.transform, tower.transform_spec(), tuple(tower.grid), int(tower.embed_dim))
    del tower
    return out


def plan(cfg: LabelsConfig) -> Plan:
    """Step 1 of the recipe (no Ray)."""
    try:
        source = shards.resolve(cfg.data.manifest, cfg.data.format)
        manifest = read_manifest(cfg.data.manifest, require_image=True, fmt=cfg.data.format,
                                 columns=cfg.data.columns)
    except FileNotFoundError as exc:
        raise DataError(f"manifest not found: {cfg.data.manifest} ({exc})") from None
    except ValueError as exc:
        raise DataError(str(exc)) from None
    vocab = build_vocab(captions_of(manifest.rows), cfg.vocab)
    if not vocab.words:
        raise DataError(f"the vocabulary is empty: no caption word of {cfg.data.manifest} passed the vocab rules "
                        f"(min_count={cfg.vocab.min_count}) and no extra_words were given")
    transform, spec, grid, embed_dim = _probe_tower(cfg)
    p = Plan(cfg=cfg, rows=manifest.rows, manifest_errors=manifest.errors, manifest_rows=manifest.num_read,
             vocab=vocab, transform=transform, transform_spec=spec, grid=grid, embed_dim=embed_dim,
             image_root=image_root_for(cfg.data.manifest, cfg.data.image_root), source=source)
    size = cfg.compute.rows_per_shard
    p.shards = [p.rows[i:i + size] for i in range(0, len(p.rows), size)]
    return p


def _check_output(out: D.LabelsDir, p: Plan) -> bool:
    """Read-only: True when ``_config.json`` exists and its fingerprint matches this plan; False on
    a fresh output; raises when the output holds labels made differently."""
    fingerprint = p.fingerprint()
    if out.exists(D.CONFIG_FILE):
        stored = out.read_json(D.CONFIG_FILE).get("fingerprint", {})
        diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if diff:
            raise DataError(f"{out.uri} holds labels made with a different setup (changed: {', '.join(diff)}); "
                            "write to a new output, or delete it to start over")
        return True
    if out.completed_shards():
        raise DataError(f"{out.uri} holds label shards but no {D.CONFIG_FILE}: not written by this job version; "
                        "write to a new output")
    return False


def _meta(p: Plan, markers: dict[int, dict]) -> dict:
    by_stage = Counter({"manifest": len(p.manifest_errors)})
    for m in markers.values():
        by_stage.update(m.get("errors_by_stage", {}))
    labelled = sum(m["labelled"] for m in markers.values())
    lab = p.cfg.labeler
    meta = {
        "schema_version": SCHEMA_VERSION,
        "vocab": p.vocab.to_dict(to_dict(p.cfg.vocab)),
        "model": {"vision": p.cfg.model.vision.model_dump(mode="json"), "embed_dim": p.embed_dim,
                  "seed": p.cfg.seed},
        "transform": p.transform_spec,
        "grid": list(p.grid),
        "top_n": lab.top_n,
        "score_sign": lab.score_sign,
        "features": lab.features,
        "templates": list(lab.templates),
        "counts": {"manifest_rows": p.manifest_rows, "valid_rows": len(p.rows), "labelled": labelled,
                   "errors": sum(by_stage.values()), "errors_by_stage": dict(sorted(by_stage.items())),
                   "shards": len(p.shards)},
        "manifest": p.cfg.data.manifest,
        "image_root": p.image_root,
        "max_error_fraction": p.cfg.data.max_error_fraction,
        "rows_per_shard": p.cfg.compute.rows_per_shard,
        "max_image_pixels": p.cfg.data.max_image_pixels,
    }
    assert set(META_KEYS) <= set(meta)
    return meta


def _pending(p: Plan, pending: list[int]) -> tuple[list[tuple[int, dict]], list[int]]:
    """The ``(shard, row)`` pairs of the pending shards and each row's ``seq``, its position among
    the valid rows."""
    rows = [(k, r) for k in pending for r in p.shards[k]]
    size = len(p.shards[0]) if p.shards else 0  # every shard but the last is full
    return rows, [k * size + j for k in pending for j in range(len(p.shards[k]))]


def _shard_images(p: Plan, pending: list[int]):
    """The pipeline's input for image-text shards: the pending rows' images read by Ray Data's
    readers in Ray tasks (:func:`sea_ray.data.shards.image_dataset`), placed by a lookup shared once
    through the object store; the driver holds no image byte."""
    import ray

    rows, seq = _pending(p, pending)
    lookup = shards.lookup_of([r for _, r in rows], [(r["row"], s, k) for (k, r), s in zip(rows, seq)])
    return shards.image_dataset(p.source, [r for _, r in rows], ray.put(lookup), p.cfg.data.columns)


def _input_blocks(p: Plan, pending: list[int], block_rows: int):
    import pyarrow as pa

    rows, seq = _pending(p, pending)
    block_rows = max(block_rows, math.ceil(len(rows) / _MAX_BLOCKS))
    blocks = []
    for i in range(0, len(rows), block_rows):
        chunk = rows[i:i + block_rows]
        blocks.append(pa.table({
            "row": pa.array([r["row"] for _, r in chunk], pa.int64()),
            "seq": pa.array(seq[i:i + block_rows], pa.int64()),
            "shard": pa.array([k for k, _ in chunk], pa.int32()),
            "image_id": pa.array([r["id"] for _, r in chunk], pa.string()),
            "uri": pa.array([storage.resolve_image(r.get("image"), p.image_root) for _, r in chunk],
                            pa.string()),
            "image_bytes": pa.array([r.get("image_bytes") for _, r in chunk], pa.binary()),
        }))
    return blocks


def _cpus_needed(comp) -> float:
    """The CPUs the pipeline needs at once: its labeler actors and one decode task."""
    return comp.num_actors * comp.cpus_per_actor + comp.cpus_per_decode_task


def _resources(ray, cfg: LabelsConfig) -> tuple[float, str]:
    """(GPUs per actor, device) after the CPU fallback; refuses a CPU plan that cannot run."""
    comp = cfg.compute
    res = ray.cluster_resources()
    gpus = comp.gpus_per_actor
    if gpus > 0 and res.get("GPU", 0) == 0 and comp.cpu_fallback:
        log.warning("compute.gpus_per_actor=%s but the cluster shows no GPU: labeling on CPUs "
                    "(compute.cpu_fallback=false waits for GPUs instead)", gpus)
        gpus = 0.0
    cpus = res.get("CPU", 0)
    need = _cpus_needed(comp)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if 0 < cpus < need and len(alive) == 1:  # a fixed single-node Ray: this plan would hang forever
        raise ConfigError([f"compute: {comp.num_actors} actor(s) x {comp.cpus_per_actor} CPU + "
                           f"{comp.cpus_per_decode_task} CPU per decode task need {need:g} CPUs but this Ray has "
                           f"{cpus:g}; the actors would leave nothing for the decode tasks (deadlock). Lower "
                           "compute.cpus_per_actor / cpus_per_decode_task (fractions are fine)"])
    return gpus, ("cuda" if gpus > 0 else "cpu")


class _ShardWriter:
    """On the driver: collects the write stage's part records (counts and error rows, no labels)
    per shard, and once every row of a shard is in, writes its errors file and then its marker."""

    def __init__(self, out: D.LabelsDir, p: Plan, pending: list[int], stop_after: Optional[int],
                 prior_errors: int = 0):
        self.out, self.p = out, p
        self.prior_errors = prior_errors  # manifest errors + those of the shards kept from earlier runs
        self.expected = {k: len(p.shards[k]) for k in pending}
        self.image_of = {r["row"]: r.get("image") or shards.member_name(r.get("member"))
                         for k in pending for r in p.shards[k]}
        self.got: dict[int, list[dict]] = {k: [] for k in pending}
        self.rows: dict[int, int] = {k: 0 for k in pending}
        self.written = 0
        self.stop_after = stop_after
        self.labelled = 0
        self.errors = 0
        self.received_bytes = 0  # what the driver got from the pipeline
        self.first_batch_s: Optional[float] = None  # pipeline start-up: until the first labelled batch
        self.nodes: dict[str, set] = {}  # stage -> the Ray nodes that ran it, over the shards written

    def add(self, batch) -> int:
        """One batch of part records (a pyarrow table of ``RECORD_SCHEMA``); returns its rows."""
        self.received_bytes += batch.nbytes
        n = 0
        for rec in batch.to_pylist():
            k = rec["shard"]
            if k not in self.got:
                raise DataError(f"the pipeline returned rows of shard {k}, which is not pending")
            self.got[k].append(rec)
            self.rows[k] += rec["rows"]
            n += rec["rows"]
            if self.rows[k] > self.expected[k]:
                raise DataError(f"the pipeline returned {self.rows[k]} rows of shard {k}, which has {self.expected[k]}")
            if self.rows[k] == self.expected[k]:
                self._flush(k)
        return n

    def _flush(self, k: int) -> None:
        records = sorted(self.got.pop(k), key=lambda rec: rec["first_row"])
        del self.rows[k]
        parts = [{"file": rec["part"], "rows": rec["labelled"]} for rec in records if rec["part"]]
        labelled = sum(part["rows"] for part in parts)
        bad = sorted((r, i, s, why) for rec in records for r, i, s, why in
                     zip(rec["error_row"], rec["error_id"], rec["error_stage"], rec["error_reason"]))
        self.out.write_errors(k, D.errors_table([{"row": r, "image_id": i, "image": self.image_of.get(r),
                                                  "stage": s, "reason": why} for r, i, s, why in bad]))
        if self.stop_after is not None and self.written >= self.stop_after:
            raise LabelsInterrupted(f"stopped after {self.written} shard(s), shard {k} written without its marker")
        shard_ids = [r["id"] for r in self.p.shards[k]]
        self.out.write_marker(k, {
            "shard": k, "rows": self.expected[k], "labelled": labelled, "errors": len(bad),
            "errors_by_stage": dict(Counter(s for _, _, s, _ in bad)), "parts": parts,
            "first_row": self.p.shards[k][0]["row"] if shard_ids else None,
            "last_row": self.p.shards[k][-1]["row"] if shard_ids else None,
            "ids_sha256": hashlib.sha256("\n".join(shard_ids).encode("utf-8")).hexdigest(),
            "nodes": _shard_nodes(records)})
        self.written += 1
        for stage, ids in _shard_nodes(records).items():
            self.nodes.setdefault(stage, set()).update(ids)
        self.labelled += labelled
        self.errors += len(bad)
        log.info("shard %s written: %d labelled in %d part(s), %d error(s)", D.shard_name(k), labelled, len(parts),
                 len(bad))
        if self.got and budget.over_budget(self.prior_errors + self.errors, self.p.manifest_rows,
                                           self.p.cfg.data.max_error_fraction):  # shards left: stop early
            raise _OverBudget(f"{self.prior_errors + self.errors} error rows after shard {k}")

    @property
    def incomplete(self) -> list[int]:
        return sorted(self.got)


def _shard_nodes(records: list[dict]) -> dict[str, list[str]]:
    """The Ray nodes that decoded, labelled and wrote a shard's rows (its part records)."""
    return {"decode": sorted({n for rec in records for n in rec["decode_nodes"] or []}),
            "label": sorted({n for rec in records for n in rec["label_nodes"] or []}),
            "write": sorted({rec["write_node"] for rec in records if rec["write_node"]})}


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with ray[data]
        return None
    return tqdm(total=total, unit="img", desc="labels", disable=None if sys.stderr.isatty() else True,
                mininterval=1.0)


def _dataset(p: Plan, pending: list[int], out: D.LabelsDir, gpus: float, device: str):
    """Step 3: the Ray Data pipeline over the pending shards. Its rows are part records
    (:data:`~sea_ray.labels.pipeline.RECORD_SCHEMA`): the labels themselves are written by its
    last stage and never reach the driver."""
    import ray.data

    from sea_ray.data.images import split_transform

    cfg = p.cfg
    comp = cfg.compute
    pil_part, tensor_part = split_transform(p.transform)
    decode_bs = comp.decode_batch_size or cfg.labeler.batch_size
    threads = comp.torch_threads or max(1, round(comp.cpus_per_actor))
    ds = _shard_images(p, pending) if p.source.is_shards else ray.data.from_arrow(_input_blocks(p, pending, decode_bs))
    ds = ds.map_batches(decode_batch, batch_size=decode_bs, batch_format="pyarrow",
                        num_cpus=comp.cpus_per_decode_task,
                        # max_calls=0 is Ray's default (unlimited) for tasks; stating it makes the
                        # remote args differ from the actors', which keeps Ray Data from fusing the
                        # decode tasks into the actors (fused, decoding would stall labeling).
                        max_calls=0,
                        fn_kwargs={"pil_part": pil_part, "image_size": p.image_size,
                                   "tensor_part": tensor_part if comp.ship == "float32" else None,
                                   "ship": comp.ship, "max_pixels": cfg.data.max_image_pixels})
    ds = ds.map_batches(LabelActor, batch_size=cfg.labeler.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=comp.num_actors),
                        num_cpus=comp.cpus_per_actor, num_gpus=gpus,
                        fn_constructor_kwargs={"vision_cfg": cfg.model.vision,
                                               "image_aspect": cfg.data.image_aspect, "labeler_cfg": cfg.labeler,
                                               "words": p.vocab.words, "seed": cfg.seed, "device": device,
                                               "torch_threads": threads, "tensor_part": tensor_part,
                                               "ship": comp.ship})
    # the write tasks: each actor output block as it is (batch_size=None), written straight to the
    # output. I/O-bound: they reserve no CPU (so they never wait behind the decode tasks for one)
    # and at most two per actor run at a time.
    return ds.map_batches(write_parts, batch_size=None, batch_format="numpy", num_cpus=0,
                          compute=ray.data.TaskPoolStrategy(size=2 * comp.num_actors),
                          fn_kwargs={"output": out.uri, "grid": tuple(p.grid), "top_n": cfg.labeler.top_n})


def _stall_timeout(cfg: LabelsConfig) -> float:
    """``compute.stall_timeout_s``, or Ray Data's own no-progress timeout when it is not set."""
    import ray.data

    return cfg.compute.stall_timeout_s or ray.data.DataContext.get_current().execution_no_progress_timeout_s


def _stream(p: Plan, pending: list[int], out: D.LabelsDir, stop_after: Optional[int], gpus: float,
            device: str, prior_errors: int = 0) -> _ShardWriter:
    """Steps 3 and 4: the pipeline over the pending shards; each shard marked as it completes."""
    import ray.data
    from ray.data.exceptions import ExecutionTimeoutError
    from ray.exceptions import RayActorError

    writer = _ShardWriter(out, p, pending, stop_after, prior_errors)
    total = sum(writer.expected.values())
    ctx = ray.data.DataContext.get_current()
    old_bars, old_stall = ctx.enable_progress_bars, ctx.execution_no_progress_timeout_s
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = _stall_timeout(p.cfg)  # read by the dataset made below
    bar = _progress(total)
    iterator = None
    started = time.time()
    try:
        ds = _dataset(p, pending, out, gpus, device)
        # an explicit generator, so that close() below stops the executor at once on any exit
        iterator = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
        for batch in iterator:
            if writer.first_batch_s is None:
                writer.first_batch_s = time.time() - started
            n = writer.add(batch)
            if bar is not None:
                bar.update(n)
    except RayActorError as exc:
        message = str(exc)
        if not (exc.actor_init_failed and LOAD_FAILED in message):
            raise
        raise DataError(message[message.index(LOAD_FAILED):].splitlines()[0]) from None
    except ExecutionTimeoutError as exc:
        timeout = ctx.execution_no_progress_timeout_s
        free = _free_resources()  # while the stalled pipeline still holds what it got
        if not writer.written:
            raise _Stalled(free) from exc
        raise DataError(f"the labels pipeline made no progress for compute.stall_timeout_s={timeout:g}s after "
                        f"{writer.written} shard(s) were written ({free}); re-run the job (the finished shards "
                        "are kept)") from exc
    finally:
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()  # shuts the streaming executor down (actors released)
        if bar is not None:
            bar.close()
        ctx.enable_progress_bars, ctx.execution_no_progress_timeout_s = old_bars, old_stall
    if writer.incomplete:
        raise DataError(f"the pipeline ended with shards {writer.incomplete} incomplete; re-run the job")
    return writer


def _stream_started(p: Plan, pending: list[int], out: D.LabelsDir, stop_after: Optional[int], gpus: float,
                    device: str, prior_errors: int) -> _ShardWriter:
    """:func:`_stream`, started once more when it stalled before its first shard.

    Seen on the project's 2-core test machine (Ray 2.60, late in a long test session): the GCS
    logs a labeler actor created, but the driver never receives its ALIVE notification, and the
    pipeline waits for it until Ray Data's no-progress timeout. Before the first shard nothing is
    kept, so the second start loses nothing; a second stall is taken as the cluster's answer (no
    room for the actors, or they start slower than the timeout) and fails the job."""
    timeout = _stall_timeout(p.cfg)
    try:
        return _stream(p, pending, out, stop_after, gpus, device, prior_errors)
    except _Stalled:
        log.warning("the labels pipeline made no progress for %gs before its first shard: starting it once more",
                    timeout)
    _wait_released(p.cfg, gpus, bound_s=_RELEASE_S)
    out.remove_shard_files(pending)
    try:
        return _stream(p, pending, out, stop_after, gpus, device, prior_errors)
    except _Stalled as exc:
        comp = p.cfg.compute
        raise DataError(f"the labels pipeline made no progress for compute.stall_timeout_s={timeout:g}s before its "
                        f"first shard, twice: the cluster has no room for the {comp.num_actors} labeler actor(s) "
                        f"(cpus_per_actor={comp.cpus_per_actor:g}, gpus_per_actor={comp.gpus_per_actor:g}; "
                        f"when it stopped, {exc}), or they start slower than that (raise "
                        "compute.stall_timeout_s where nodes must start first)") from exc


def _free_resources() -> str:
    """What this Ray has free and in all, for a stall's message: whether the pipeline waited for
    room or for something else."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(key, 0):g} of {total[key]:g} {key}s free" for key in ("CPU", "GPU") if key in total)


def _wait_released(cfg: LabelsConfig, gpus: float, bound_s: float) -> None:
    """Waits (at most ``bound_s``) until this Ray again has room for the pipeline. A stopped
    pipeline's actors are released, not killed, and Ray takes a while to stop one (up to its 30-s
    graceful-shutdown timeout): a second pool started before then would wait for the first one's
    resources. On a cluster that never had the room (actors waiting for nodes) this waits the
    whole bound and the second start decides."""
    import ray

    comp = cfg.compute
    need_cpu, need_gpu = _cpus_needed(comp), comp.num_actors * gpus
    start = time.monotonic()
    while time.monotonic() < start + bound_s:
        free = ray.available_resources()
        if free.get("CPU", 0) >= need_cpu and free.get("GPU", 0) >= need_gpu:
            log.info("the labels pipeline's resources are free again after %.1fs", time.monotonic() - start)
            return
        time.sleep(0.5)
    log.warning("the labels pipeline's resources are not free %gs after it stopped", bound_s)


def _retry(p: Plan, markers: dict[int, dict]) -> set[int]:
    """The finished shards to redo: every one holding error rows when the error rows recorded so
    far (malformed manifest rows and the finished shards') exceed the budget, the state a failed
    run leaves; a re-run after fixing the data (e.g. ``data.image_root``) then relabels them.
    Otherwise none: finished shards stay finished."""
    recorded = len(p.manifest_errors) + sum(m["errors"] for m in markers.values())
    if not budget.over_budget(recorded, p.manifest_rows, p.cfg.data.max_error_fraction):
        return set()
    return {k for k, m in markers.items() if m["errors"]}


def _refuse(out: D.LabelsDir, p: Plan, markers: dict[int, dict], wrote: bool, early: bool = False):
    """Raise :class:`TooManyErrors` with the error summary; the dataset is left incomplete (no
    ``_SUCCESS``, no ``_meta.json``), its finished shards and markers kept for the re-run."""
    out.delete(storage.MARKER)
    out.delete(D.META_FILE)
    errors = D.read_errors(out.uri).to_pylist() if wrote else list(p.manifest_errors)
    count = len(p.manifest_errors) + sum(m["errors"] for m in markers.values())
    rows, max_fraction = p.manifest_rows, p.cfg.data.max_error_fraction
    if budget.over_budget(count, rows, max_fraction):
        stop = " (stopped early: no later row can bring it back within the budget)" if early else ""
        head = (f"labels: {'at least ' if early else ''}{count} of {rows} manifest rows are error rows "
                f"({budget.fraction(count, rows)}), more than data.max_error_fraction = {max_fraction:g} allows{stop}")
    else:
        head = f"labels: none of the {rows} manifest rows was labelled ({count} error rows)"
    kept = (f"; the {len(markers)} finished shard(s) stay: fix the data and re-run sea-ray labels, which keeps the "
            "shards without errors and redoes the others") if markers else "; fix the data and re-run sea-ray labels"
    raise TooManyErrors(
        f"{head}; {out.uri} is not complete (no {storage.MARKER} written)\n"
        + budget.describe(errors, "data.image_root", p.image_root)
        + f"\n  every error row with its reason: {storage.join(out.uri, D.ERRORS)}/ "
        f"(sea_ray.labels.dataset.read_errors){kept}", count, rows)


def run(cfg: LabelsConfig, *, stop_after_shards: Optional[int] = None) -> dict:
    """Run the labels job (recipe in the module docstring); returns a JSON-able summary.

    ``stop_after_shards`` (tests): after that many shards, write the next shard's files but not
    its marker and raise :class:`LabelsInterrupted`, as a kill at the worst moment would.
    Raises :class:`~sea_ray.errors.TooManyErrors` when the error budget is exceeded.
    """
    start = time.time()
    p = plan(cfg)
    out = D.LabelsDir(cfg.output)
    known = _check_output(out, p)
    if budget.over_budget(len(p.manifest_errors), p.manifest_rows, cfg.data.max_error_fraction):
        _refuse(out, p, {}, wrote=False, early=True)  # malformed manifest rows alone: before Ray starts
    markers = out.markers() if known else {}
    retry = _retry(p, markers)
    pending = [k for k in range(len(p.shards)) if k not in markers or k in retry]
    log.info("%d valid rows in %d shard(s): %d complete, %d pending; %d malformed manifest row(s)",
             len(p.rows), len(p.shards), len(p.shards) - len(pending), len(pending), len(p.manifest_errors))
    if retry:
        log.warning("the error rows recorded so far exceed data.max_error_fraction=%g: redoing the %d finished "
                    "shard(s) that hold errors", cfg.data.max_error_fraction, len(retry))
    gpus, device = 0.0, "cpu"
    if pending:  # connect and check the cluster before writing anything
        gpus, device = _resources(init_ray(cfg.ray), cfg)
    if not known:
        out.write_json(D.CONFIG_FILE, {"fingerprint": p.fingerprint(), "config": to_dict(cfg)})
    removed = out.clean_temporaries()
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    out.write_json(D.VOCAB_FILE, p.vocab.to_dict(to_dict(cfg.vocab)))  # fixed by the fingerprint
    out.write_table(f"{D.ERRORS}/{D.MANIFEST_ERRORS}.parquet", D.errors_table(p.manifest_errors))
    writer = None
    early = False
    if pending:
        out.delete(storage.MARKER)
        out.delete(D.META_FILE)
        for k in sorted(retry):
            out.delete_marker(k)
        out.remove_shard_files(pending)  # what earlier runs left of them: the pipeline writes them anew
        prior = len(p.manifest_errors) + sum(m["errors"] for k, m in markers.items() if k not in retry)
        try:
            writer = _stream_started(p, pending, out, stop_after_shards, gpus, device, prior)
        except _OverBudget:
            early = True

    markers = out.markers()
    missing = sorted(set(range(len(p.shards))) - set(markers))
    errors = len(p.manifest_errors) + sum(m["errors"] for m in markers.values())
    if early or budget.over_budget(errors, p.manifest_rows, cfg.data.max_error_fraction) or (
            not missing and not sum(m["labelled"] for m in markers.values())):
        _refuse(out, p, markers, wrote=True, early=early)
    covered = sum(m["rows"] for m in markers.values())
    if missing or covered != len(p.rows):
        raise DataError(f"{out.uri}: shards {missing} have no marker or rows are unaccounted for "
                        f"({covered} of {len(p.rows)}); re-run the job")
    meta = _meta(p, markers)
    out.write_json(D.META_FILE, meta)
    out.write_text(storage.MARKER, "")
    seconds = time.time() - start
    processed = sum(writer.expected.values()) if writer else 0
    return {"output": out.uri, "counts": meta["counts"], "vocab_size": len(p.vocab), "vocab_hash": p.vocab.hash,
            "grid": list(p.grid), "shards_skipped": len(p.shards) - len(pending), "shards_redone": len(retry),
            "shards_written": writer.written if writer else 0, "images_processed": processed,
            "seconds": round(seconds, 2), "img_per_s": round(processed / seconds, 2) if processed else None,
            "first_batch_s": round(writer.first_batch_s, 2) if writer and writer.first_batch_s else None,
            "driver_received_bytes": writer.received_bytes if writer else 0,
            "nodes": {stage: sorted(ids) for stage, ids in sorted(writer.nodes.items())} if writer else {}}
