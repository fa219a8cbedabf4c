"""The three Ray Data stages of the labels job: read + decode (CPU tasks), label (actor pool) and
write (tasks).

All are plain callables, usable without Ray (the tests call them directly):

- :func:`decode_batch` reads each row's image (``image_bytes``, or the file at its resolved URI,
  local or ``s3://``, with :func:`sea_ray.storage.read_many`), decodes it with
  :func:`sea_ray.data.images.decode_image` and applies the PIL part of the tower's transform
  (its geometry: resize + centre crop, or with ``data.image_aspect=pad`` first a pad to a
  square). It ships either uint8 pixels ``[B, S, S, 3]`` (``ship="uint8"``, 4x fewer bytes;
  normalised in the actor) or the float tensor ``[B, 3, S, S]``. A row that fails keeps its
  place with ``ok=False``, a ``stage`` (``read`` | ``decode``) and a ``reason``; its pixels are
  zeros and are never labelled.
- :class:`LabelActor` builds the tower from the config (seeded, so every actor holds the same
  random-init tower), the :class:`~sea_ray.labels.labeler.PatchLabeler` (text embeddings once per
  actor), and labels the ``ok`` rows. Pixels are not sent back: its output is the row key,
  ``ok/stage/reason`` and flat ``label_ids`` / ``label_scores`` of ``P * top_n`` values.
- :func:`write_parts` writes the labelled rows of a batch straight to the output, one Parquet part
  per run of consecutive rows of one shard (``LabelsDir.write_part``), and returns only a record
  per part (:data:`RECORD_SCHEMA`: shard, rows, the part's file name, counts, the error rows):
  the label arrays never leave the workers, the driver marks each shard once all its rows are in.

Each row also carries the Ray node that decoded it and the one that labelled it (``decode_node``,
``label_node``; None when a stage runs outside Ray); each record names the nodes of its rows and
the node that wrote the part, and the driver keeps them in the shard's marker (``nodes``).

Each row carries ``seq``, its position among the manifest's valid rows, through the stages: a
batch may hold rows of several shards, in any order (Ray Data bundles blocks as they come), and
the write stage cuts it into runs of consecutive ``seq``, so the parts of a shard, in the order of
their first rows, hold its rows in manifest order.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import numpy as np
import pyarrow as pa

from sea_ray import storage
from sea_ray.labels.dataset import LabelsDir, labels_table

log = logging.getLogger(__name__)

PASS_THROUGH = ("row", "seq", "shard", "image_id", "decode_node")
#: how a labeler actor that cannot build its tower (weights that do not load) says so
LOAD_FAILED = "the labeler could not load model.vision"

# What the write stage returns to the driver: one row per part (a run of one shard's rows).
RECORD_SCHEMA = pa.schema([
    pa.field("shard", pa.int32()),
    pa.field("first_row", pa.int64()),           # the run's first manifest row
    pa.field("rows", pa.int64()),                # rows of the run: labelled + errors
    pa.field("part", pa.string()),               # the part file written, null when no row was labelled
    pa.field("labelled", pa.int64()),            # rows in the part file
    pa.field("error_row", pa.list_(pa.int64())),  # the run's error rows: manifest row, id, stage, reason
    pa.field("error_id", pa.list_(pa.string())),
    pa.field("error_stage", pa.list_(pa.string())),
    pa.field("error_reason", pa.list_(pa.string())),
    pa.field("decode_nodes", pa.list_(pa.string())),  # the Ray nodes that decoded, labelled, wrote the run
    pa.field("label_nodes", pa.list_(pa.string())),
    pa.field("write_node", pa.string()),
])


def node_id() -> Optional[str]:
    """The id of the Ray node this process runs on; None outside Ray (a stage called directly)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _nodes(column) -> list[str]:
    return sorted({str(n) for n in column if n is not None})


def decode_batch(batch, pil_part, tensor_part, image_size: int, ship: str = "uint8",
                 max_pixels: Optional[int] = None) -> dict:
    """One Ray Data batch (pyarrow Table or dict of columns: row, shard, image_id, uri, image_bytes)
    -> dict of numpy columns: row, shard, image_id, ok, stage, reason, image.

    With ``ship="uint8"`` and CLIP's standard transform (``pil_part`` a ResizeCenterCrop or its
    padding subclass) this never imports torch; ``tensor_part`` is only used (and may be None
    otherwise) for ``float32``. An image the geometry would blow up past the pixel limit (a
    1 x 20000 strip) is refused with its reason (``ResizeCenterCrop.refusal``)."""
    from sea_ray.data.images import ResizeCenterCrop, decode_image, pil_to_uint8, pixel_limit

    cols = batch.to_pydict() if hasattr(batch, "to_pydict") else {k: list(v) for k, v in batch.items()}
    n = len(cols["row"])
    inline = cols.get("image_bytes") or [None] * n
    uris = [None if inline[i] else cols["uri"][i] for i in range(n)]
    fetched = storage.read_many(uris)  # uris resolved by the driver (storage.resolve_image)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    stage = np.full(n, "", dtype=object)
    reason = np.full(n, "", dtype=object)
    for i in range(n):
        data, why = (inline[i], None) if inline[i] else fetched[i]
        if data is None:
            stage[i], reason[i] = "read", why or "no image"
            continue
        img, why = decode_image(data, max_pixels)
        if img is None:
            stage[i], reason[i] = "decode", why
            continue
        if isinstance(pil_part, ResizeCenterCrop):  # a 1 x 20000 strip would resize to 224 x 4.5 M
            why = pil_part.refusal(*img.size, pixel_limit(max_pixels))
            if why:
                stage[i], reason[i] = "decode", why
                continue
        try:
            arr = pil_to_uint8(pil_part(img))
            if arr.shape != (image_size, image_size, 3):
                raise ValueError(f"the transform gave {arr.shape}, expected {(image_size, image_size, 3)}")
            pixels[i] = arr
            ok[i] = True
        except Exception as exc:  # noqa: BLE001 - a transform failure skips this image only
            stage[i], reason[i] = "decode", f"transform failed ({type(exc).__name__}: {exc})"
    out = {"row": np.asarray(cols["row"], dtype=np.int64), "shard": np.asarray(cols["shard"], dtype=np.int32),
           "image_id": np.asarray(cols["image_id"], dtype=object), "ok": ok, "stage": stage, "reason": reason,
           "decode_node": np.full(n, node_id(), dtype=object)}
    if "seq" in cols:
        out["seq"] = np.asarray(cols["seq"], dtype=np.int64)
    if ship == "uint8":
        out["image"] = pixels
    else:
        from sea_ray.data.images import to_model_input

        out["image"] = to_model_input(pixels, tensor_part).numpy()
    return out


class LabelActor:
    """Ray Data actor: labels the decoded rows of each batch (see the module docstring)."""

    def __init__(self, vision_cfg, image_aspect: str, labeler_cfg, words: list[str], seed: int, device: str,
                 torch_threads: Optional[int], tensor_part, ship: str = "uint8"):
        import time

        import torch

        from sea_ray.labels.labeler import PatchLabeler
        from sea_ray.model.vision import build_vision_tower

        start = time.time()

        if device == "cuda" and not torch.cuda.is_available():
            log.warning("no CUDA device visible in this actor; labeling on the CPU")
            device = "cpu"
        if device == "cpu" and torch_threads:
            torch.set_num_threads(int(torch_threads))
        torch.manual_seed(seed)
        try:
            tower = build_vision_tower(vision_cfg, image_aspect).eval().to(device)
        except Exception as exc:  # the driver finds LOAD_FAILED in Ray's actor error and names it
            lines = [line.strip()[:200] for line in f"{type(exc).__name__}: {exc}".strip().splitlines()[:3]]
            raise RuntimeError(f"{LOAD_FAILED} ({' / '.join(lines)})") from exc
        self.device = device
        self.ship = ship
        self.tensor_part = tensor_part
        self.labeler = PatchLabeler.from_config(tower, words, labeler_cfg)
        self.width = tower.num_patches * labeler_cfg.top_n
        self.node = node_id()
        log.info("labeler ready on %s in %.1fs (%d words, %d torch threads)", device, time.time() - start,
                 len(words), torch.get_num_threads())

    def _inputs(self, images: np.ndarray):
        """The model's input batch, on the actor's device. uint8 pixels travel to the GPU as uint8
        and are converted and normalised there (on a GPU the CPU-side conversion cost more than the
        H2D copy of 4x the bytes: ViT-L/14-336 fp16 on an H200, 348 -> 533 img/s)."""
        from sea_ray.data.images import as_tensor, to_model_input

        x = as_tensor(images)
        if self.device != "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return to_model_input(x, self.tensor_part) if self.ship == "uint8" else x

    def _label(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.labeler.label(self._inputs(images))
        return ids.reshape(len(images), -1).numpy(), scores.reshape(len(images), -1).numpy()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row"])
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        stage = np.asarray(batch["stage"], dtype=object).copy()
        reason = np.asarray(batch["reason"], dtype=object).copy()
        ids = np.full((n, self.width), -1, dtype=np.int32)
        scores = np.zeros((n, self.width), dtype=np.float16)
        todo = np.flatnonzero(ok)
        if len(todo):
            images = np.asarray(batch["image"])
            images = images if len(todo) == n else images[todo]
            try:
                ids[todo], scores[todo] = self._label(images)
            except Exception as exc:  # noqa: BLE001 - fall back to one image at a time
                log.warning("labeling a batch failed (%s); retrying image by image", exc)
                for j, i in enumerate(todo):
                    try:
                        ids[i], scores[i] = (a[0] for a in self._label(images[j:j + 1]))
                    except Exception as one:  # noqa: BLE001
                        ok[i], stage[i], reason[i] = False, "label", f"labeling failed ({type(one).__name__}: {one})"
        out = {k: batch[k] for k in PASS_THROUGH if k in batch}
        out.update(ok=ok, stage=stage, reason=reason, label_ids=ids, label_scores=scores,
                   label_node=np.full(n, self.node, dtype=object))
        return out


def write_parts(batch: dict, output: str, grid: tuple[int, int], top_n: int) -> pa.Table:
    """Write stage: the labelled rows of ``batch`` (the label actor's output) to the labels
    dataset ``output``, one part per run of consecutive ``seq`` of one shard, written whole
    (``LabelsDir.write_part``); returns one :data:`RECORD_SCHEMA` row per run, with no labels.
    A retried task writes the same files again (named by their rows)."""
    out = LabelsDir(output)
    seq = np.asarray(batch["seq"], dtype=np.int64)
    shard = np.asarray(batch["shard"], dtype=np.int64)
    order = np.lexsort((seq, shard))
    cuts = np.flatnonzero((np.diff(shard[order]) != 0) | (np.diff(seq[order]) != 1)) + 1
    ok = np.asarray(batch["ok"], dtype=bool)
    rows, ids = np.asarray(batch["row"], dtype=np.int64), np.asarray(batch["image_id"], dtype=object)
    none = np.full(len(rows), None, dtype=object)
    decoded_on, labelled_on = (np.asarray(batch.get(k, none), dtype=object) for k in ("decode_node", "label_node"))
    here = node_id()
    records = {name: [] for name in RECORD_SCHEMA.names}
    for run in np.split(order, cuts):
        good, bad = run[ok[run]], run[~ok[run]]
        part = None
        if len(good):
            table = labels_table([str(i) for i in ids[good]], grid, top_n, np.asarray(batch["label_ids"])[good],
                                 np.asarray(batch["label_scores"])[good])
            part = out.write_part(int(shard[run[0]]), int(rows[good[0]]), table)
        for name, value in (("shard", int(shard[run[0]])), ("first_row", int(rows[run[0]])), ("rows", len(run)),
                            ("part", part), ("labelled", len(good)), ("error_row", rows[bad].tolist()),
                            ("error_id", [str(i) for i in ids[bad]]),
                            ("error_stage", [str(s) or "label" for s in np.asarray(batch["stage"])[bad]]),
                            ("error_reason", [str(r) for r in np.asarray(batch["reason"])[bad]]),
                            ("decode_nodes", _nodes(decoded_on[run])), ("label_nodes", _nodes(labelled_on[good])),
                            ("write_node", here)):
            records[name].append(value)
    return pa.table(records, schema=RECORD_SCHEMA)
