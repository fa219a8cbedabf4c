"""Training datasets on Ray Data: decode and tokenize on CPU actors, split across Train workers.

Stage 1 (align) reads image-caption pairs joined with their SEA labels (:class:`LabelsSource`:
the labels rows, each with its image and caption from the manifest); stage 2 (instruct) reads
LLaVA conversations, text-only ones included (:class:`ManifestSource`). A manifest of image-text
shards (``data.format``: WebDataset tars, image Parquet; :mod:`sea_ray.data.shards`) is used as it
is, without an import: the driver reads ids and captions only, and each preprocessing actor reads
the images of its rows from the shards (:func:`_with_images`). Which rows a worker gets
and in what order is :mod:`sea_ray.train.feed`'s; :class:`Preprocess` turns them into samples.

Images leave the CPU tasks as uint8 ``[H, W, 3]`` after the tower's geometry (``data.image_aspect``:
resize + centre crop, or pad to a square first; :func:`sea_ray.data.images.image_geometry`; 4x
less traffic than float32); workers scale and normalise them, which gives exactly the tensor of
the tower's own transform, the labeler's input too.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from sea_ray import storage
from sea_ray.constants import IGNORE_INDEX
from sea_ray.data.images import decode_image, image_geometry, pil_to_uint8, pixel_limit
from sea_ray.data.shards import read_members
from sea_ray.data.templates import encode_conversation, encode_plain, resolve_template
from sea_ray.errors import DataError
from sea_ray.labels.regrid import resample

log = logging.getLogger(__name__)


def _load_image(ref: Optional[str], data: Optional[bytes], image_root: Optional[str]):
    """``(RGB image, None)`` or ``(None, reason)`` for a manifest image: its embedded bytes, else
    the file ``ref`` points to by the same rule as the labels job (:func:`sea_ray.storage.resolve_image`),
    decoded by the same :func:`~sea_ray.data.images.decode_image`."""
    if data is None:
        uri = storage.resolve_image(ref, image_root)
        if uri is None:
            return None, "no image"
        data, reason = storage.read_many([uri])[0]
        if data is None:
            return None, reason
    return decode_image(data)


RAGGED = ("input_ids", "labels", "label_ids", "label_scores", "grid")


def stack(rows: list[dict]) -> dict:
    """Samples (dicts of one row each) -> one numpy batch: images stacked, ragged columns as 1-D
    object arrays."""
    batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "image":
            batch[key] = np.stack(values)
        elif key in RAGGED:
            arr = np.empty(len(values), dtype=object)
            arr[:] = [np.asarray(v) for v in values]
            batch[key] = arr
        else:
            batch[key] = np.asarray(values)
    return batch


def _fetched(value):
    """``value`` itself, or what it refers to when it is a Ray object ref (a shared source)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _with_images(items: list[tuple], cache: dict) -> list[tuple]:
    """``(sample id, image ref, image bytes, conversations, labels)`` from items that may name
    their image as a member of an image-text shard (``(..., member)``, :mod:`sea_ray.data.shards`):
    those members are read here, in the preprocessing actor, together (a tar's byte ranges, a
    Parquet row group once: ``cache``); a member that cannot be read leaves its row without bytes,
    so the row is dropped with its reason."""
    todo = [i for i, item in enumerate(items) if item[5] is not None and not item[2]]
    out = [item[:5] for item in items]
    for i, (data, reason) in zip(todo, read_members([items[i][5] for i in todo], cache)):
        sid, _, _, conversations, labels = out[i]
        if data is None:
            log.warning("sample %s skipped: image %s", sid, reason)
            out[i] = (sid, None, None, None, None)
        else:
            out[i] = (sid, None, data, conversations, labels)
    return out


class LabelsSource:
    """Align rows: the labels dataset's rows in shard order (``index``: which stored rows, when a
    search holds some out), each joined by image id with its manifest row (``manifest``: an object
    ref of ``{id: (image, image_bytes, conversations, member)}``; ``member``: the image's place in
    an image-text shard, or None)."""

    kind = "labels"

    def __init__(self, shards: list[tuple[str, int]], manifest, index: Optional[np.ndarray] = None):
        self.shards, self.manifest, self.index = shards, manifest, index
        self.num_rows = len(index) if index is not None else sum(n for _, n in shards)
        self._cache: dict = {}

    def open(self):
        """This source in a worker: the manifest fetched (once per actor)."""
        return LabelsSource(self.shards, _fetched(self.manifest), self.index)

    def read(self, rows: np.ndarray) -> list[tuple]:
        """``(sample id, image ref, image bytes, conversations, label columns)`` of source ``rows``."""
        stored = self.index[rows] if self.index is not None else rows
        table = read_stored_rows(self.shards, stored)
        columns = {k: table.column(k).to_pylist() for k in LABEL_COLUMNS}
        out = []
        for i, sid in enumerate(columns["image_id"]):
            row = self.manifest.get(str(sid))
            if row is None:
                log.warning("labels row %s has no manifest row: skipped", sid)
                out.append((str(sid), None, None, None, None, None))
                continue
            out.append((str(sid), row[0], row[1], row[2], {k: v[i] for k, v in columns.items()}, row[3]))
        return _with_images(out, self._cache)


class ManifestSource:
    """Instruct rows: the manifest's rows (``items``: an object ref of the list of
    ``(id, image, image_bytes, conversations, member)``, :func:`manifest_items`)."""

    kind = "manifest"

    def __init__(self, items, num_rows: int):
        self.items, self.num_rows = items, num_rows
        self._cache: dict = {}

    def open(self):
        return ManifestSource(_fetched(self.items), self.num_rows)

    def read(self, rows: np.ndarray) -> list[tuple]:
        return _with_images([(*self.items[int(r)][:4], None, self.items[int(r)][4]) for r in rows], self._cache)


class Preprocess:
    """Ray Data callable class: segments of source rows -> model-ready arrays (one tokenizer and
    one opened source per actor), yielded in the segments' order with each row's stream position."""

    def __init__(self, stage: str, tokenizer_spec: str, image_size: int, image_aspect: str,
                 image_mean: Optional[tuple], image_root: Optional[str], max_length: int, template: str = "plain",
                 source=None, rows_per_batch: int = 64, label_grid: Optional[tuple] = None):
        from sea_ray.model.llm import load_tokenizer

        self.stage, self.image_size, self.image_root, self.max_length = stage, image_size, image_root, max_length
        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.template = "plain" if stage == "align" else resolve_template(template, self.tokenizer)
        self.geometry = image_geometry(image_aspect, image_size, image_mean)
        self.source = source.open() if source is not None else None
        self.rows_per_batch = rows_per_batch
        self.label_grid = tuple(label_grid) if label_grid else None  # labels resampled onto it (labels/regrid.py)

    def _encode(self, conversations) -> dict:
        from sea_ray.data.manifest import caption_of

        if self.template == "plain":
            return encode_plain(caption_of({"conversations": conversations}), self.tokenizer, self.max_length)
        return encode_conversation(conversations, self.tokenizer, self.template, self.max_length)

    def sample(self, sid: str, image_ref, image_bytes, conversations, labels: Optional[dict]) -> Optional[dict]:
        """One model-ready sample, or None (logged) when it cannot be used."""

        if conversations is None:
            return None
        try:
            encoded = self._encode(list(conversations))
        except ValueError as exc:  # nothing left to supervise after truncation, etc.
            log.warning("sample %s skipped: %s", sid, exc)
            return None
        has_image = bool(image_ref) or bool(image_bytes)
        image = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        if has_image:
            pil, reason = _load_image(image_ref or None, image_bytes or None, self.image_root)
            if pil is not None:
                reason = self.geometry.refusal(*pil.size, pixel_limit())
                pil = None if reason else pil
            if pil is None:
                log.warning("sample %s skipped: image %s", sid, reason)
                return None
            image = pil_to_uint8(self.geometry(pil))
        labels_arr = np.asarray(encoded["labels"], dtype=np.int32)
        out = {"sample_id": sid, "input_ids": np.asarray(encoded["input_ids"], dtype=np.int32), "labels": labels_arr,
               "image": image, "has_image": has_image, "num_tokens": int((labels_arr != IGNORE_INDEX).sum())}
        if labels is not None:
            grid, top_n = (int(labels["grid_h"]), int(labels["grid_w"])), int(labels["top_n"])
            ids, scores = labels["label_ids"], labels["label_scores"]
            if self.label_grid and grid != self.label_grid:
                ids, scores = resample(ids, scores, grid, self.label_grid, top_n)
                grid = self.label_grid
            out.update(label_ids=np.asarray(ids, dtype=np.int32), label_scores=np.asarray(scores, dtype=np.float32),
                       grid=np.asarray(grid, dtype=np.int32), top_n=top_n)
        return out

    def __call__(self, batch: dict):
        for rows, positions in zip(batch["rows"], batch["positions"]):
            samples = []
            for raw, position in zip(self.source.read(np.asarray(rows)), positions):
                sample = self.sample(*raw)
                if sample is not None:
                    samples.append(dict(sample, position=int(position)))
                if len(samples) == self.rows_per_batch:
                    yield stack(samples)
                    samples = []
            if samples:
                yield stack(samples)


def manifest_rows(uri: str, require_image: bool, fmt: str = "auto", columns=None):
    """The valid rows of a stage's manifest (``fmt``, ``columns``: ``data.format``, ``data.columns``)."""
    from sea_ray.data.manifest import read_manifest

    result = read_manifest(uri, require_image=require_image, fmt=fmt, columns=columns)
    if result.errors:
        log.warning("%s: %d bad manifest rows skipped (first: row %s, %s)", uri, len(result.errors),
                    result.errors[0]["row"], result.errors[0]["reason"])
    if not result.rows:
        raise DataError(f"{uri}: no usable rows ({len(result.errors)} bad)")
    return result


LABEL_COLUMNS = ["image_id", "grid_h", "grid_w", "top_n", "label_ids", "label_scores"]


def label_shards(labels_uri: str) -> list[tuple[str, int]]:
    """``(URI, rows)`` of the completed labels shards, in order (rows from their markers).

    Only a finished labels dataset (``_SUCCESS`` present) is read; a shard without its marker
    (a killed run's last one) is never used."""
    from sea_ray.labels.dataset import LabelsDir, completed_shard_rows

    why = LabelsDir(labels_uri).incomplete()
    if why:
        raise DataError(why)
    shards = completed_shard_rows(labels_uri)
    if not shards:
        raise DataError(f"no labels shards under {labels_uri}")
    return shards


def read_stored_rows(shards: list[tuple[str, int]], stored: np.ndarray):
    """The label columns of the stored rows ``stored`` (numbers across the shards in order), in
    that order; only the Parquet row groups that hold them are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stored = np.asarray(stored, dtype=np.int64)
    starts = np.cumsum([0] + [n for _, n in shards])
    shard_of = np.searchsorted(starts, stored, side="right") - 1
    parts, order = [], []
    for k in np.unique(shard_of):
        uri, count = shards[int(k)]
        which = np.flatnonzero(shard_of == k)
        local = stored[which] - starts[k]
        fs, path = storage.pyarrow_fs(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows != count:
                raise DataError(f"{uri} holds {pf.metadata.num_rows} rows, its marker says {count}")
            group_starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                            for g in range(pf.metadata.num_row_groups)])
            group_of = np.searchsorted(group_starts, local, side="right") - 1
            groups = np.unique(group_of)
            # use_threads=False: threaded reads sometimes abort pyarrow at interpreter exit
            table = pf.read_row_groups([int(g) for g in groups], columns=LABEL_COLUMNS, use_threads=False)
        read_starts = np.cumsum([0] + [int(group_starts[g + 1] - group_starts[g]) for g in groups])
        at = read_starts[np.searchsorted(groups, group_of)] + (local - group_starts[group_of])
        parts.append(table.take(pa.array(at)))
        order.append(which)
    table = pa.concat_tables(parts)
    return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def source_of(cfg, exclude_ids=(), shared: bool = True):
    """The source rows of an align/instruct config (see :mod:`sea_ray.train.feed`): the labels
    dataset's rows joined with the manifest (align with labels), else the manifest's rows;
    ``exclude_ids``: sample ids held out (a search's validation images). ``shared``: the manifest
    goes to the object store once for every worker (Ray must be up); else it stays in the source."""
    import ray

    share = ray.put if shared else (lambda value: value)
    manifest = manifest_rows(cfg.data.manifest, require_image=cfg.job == "align", fmt=cfg.data.format,
                             columns=cfg.data.columns)
    excluded = {str(i) for i in exclude_ids}
    if cfg.job == "align" and cfg.data.labels:
        shards = label_shards(cfg.data.labels)
        by_id = {r["id"]: (r["image"], r["image_bytes"], r["conversations"], r["member"]) for r in manifest.rows}
        index = None
        if excluded:
            ids = read_label_ids(shards)
            index = np.flatnonzero(~np.isin(ids, list(excluded)))
            if not len(index):
                raise DataError(f"{cfg.data.labels}: every row is held out")
        return LabelsSource(shards, share(by_id), index)
    items = manifest_items([r for r in manifest.rows if r["id"] not in excluded])
    return ManifestSource(share(items), len(items))


def manifest_items(rows: list[dict]) -> list[tuple]:
    """The items of a :class:`ManifestSource` from manifest rows (:func:`sea_ray.data.manifest.read_manifest`'s)."""
    return [(r["id"], r["image"] or "", r["image_bytes"] or b"", r["conversations"], r.get("member")) for r in rows]


def read_label_ids(shards: list[tuple[str, int]]) -> np.ndarray:
    """The image id of every stored labels row, in order (one column read)."""
    import pyarrow.parquet as pq

    ids = []
    for uri, _ in shards:
        fs, path = storage.pyarrow_fs(uri)
        ids.extend(pq.read_table(path, filesystem=fs, columns=["image_id"], use_threads=False)
                   .column("image_id").to_pylist())
    return np.asarray([str(i) for i in ids])


def preprocess_kwargs(cfg, image_size: int) -> dict:
    """The keyword arguments of :class:`Preprocess` for a config (the source aside); the image root
    is ``data.image_root``, else the one ``sea-ray import-manifest`` recorded for the manifest."""
    from sea_ray.data.manifest import image_root_for

    tower = _TowerFacts(cfg)
    return dict(stage=cfg.job, tokenizer_spec=cfg.model.llm.tokenizer or cfg.model.llm.name_or_path,
                image_size=image_size, image_aspect=cfg.data.image_aspect, image_mean=tower.pad_mean(),
                image_root=image_root_for(cfg.data.manifest, cfg.data.image_root), max_length=cfg.data.max_length,
                template=getattr(cfg, "template", "plain"), label_grid=tower.label_grid())


class _TowerFacts:
    """What preprocessing needs to know of a config's vision tower, the tower built at most once
    (with a forked random state: a random-init tower must not move the caller's)."""

    def __init__(self, cfg):
        self.cfg, self._tower = cfg, None

    def _built(self):
        if self._tower is None:
            import torch

            from sea_ray.model.vision import build_vision_tower

            with torch.random.fork_rng(devices=[]):
                self._tower = build_vision_tower(self.cfg.model.vision, self.cfg.data.image_aspect)
        return self._tower

    def label_grid(self) -> Optional[tuple]:
        """The tower's patch grid when align resamples its labels onto it (``data.label_grid``),
        else None; from the config when the tower is described on this machine, else built."""
        cfg = self.cfg
        if cfg.job != "align" or cfg.data.label_grid != "resample":
            return None
        from sea_ray.checks import tower_grid

        grid, _ = tower_grid(cfg.model.vision)
        if grid is None:  # only the weights know (a tower not described on this machine)
            grid = self._built().grid
        return tuple(int(x) for x in grid)

    def pad_mean(self) -> Optional[tuple]:
        """The tower's mean colour, which ``image_aspect=pad`` fills with (None with ``crop``,
        which needs none). Only the built tower knows it for sure (open_clip's preprocessing
        config, a Hugging Face dir's image processor), as the labels job does on its driver."""
        if self.cfg.data.image_aspect != "pad":
            return None
        return tuple(float(m) for m in self._built().mean)
