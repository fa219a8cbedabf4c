"""Training datasets on Ray Data: decode and tokenize on CPU actors, split across Train workers.

Stage 1 (align) streams image-caption pairs joined with their SEA labels: the labels Parquet is
read in its (manifest) order and each row gets its image and caption from the manifest. Stage
2 (instruct) streams LLaVA conversations, text-only ones included. Both pipelines keep their
order (``preserve_order``), so every worker sees the same samples in the same order on every run
and a resumed run can skip exactly what it already consumed.

Images leave the CPU tasks as uint8 ``[H, W, 3]`` after the tower's resize + centre crop (4x
less traffic than float32); workers scale and normalise them, which gives exactly the tensor of
the tower's own transform, the labeler's input too.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from sea_ray import storage
from sea_ray.constants import IGNORE_INDEX

log = logging.getLogger(__name__)


def pil_geometry(image_size: int):
    """The PIL half of the tower's eval transform (resize + centre crop): it depends on the
    image size only; the worker applies the tensor half (scale + normalise) with the tower's
    own mean and std (:func:`sea_ray.data.images.to_model_input`)."""
    from sea_ray.data.images import split_transform
    from sea_ray.model.vision import CLIP_MEAN, CLIP_STD, _pil_transform

    return split_transform(_pil_transform(image_size, CLIP_MEAN, CLIP_STD))[0]


def _load_image(ref: Optional[str], data: Optional[bytes], image_root: Optional[str]):
    """``(RGB image, None)`` or ``(None, reason)`` for a manifest image: its embedded bytes, else
    the file ``ref`` points to by the same rule as the labels job (:func:`sea_ray.storage.resolve_image`),
    decoded by the same :func:`~sea_ray.data.images.decode_image`."""
    from sea_ray.data.images import decode_image

    if data is None:
        uri = storage.resolve_image(ref, image_root)
        if uri is None:
            return None, "no image"
        data, reason = storage.read_many([uri])[0]
        if data is None:
            return None, reason
    return decode_image(data)


class Preprocess:
    """Ray Data callable class: rows -> model-ready arrays (one tokenizer per actor)."""

    def __init__(self, stage: str, tokenizer_spec: str, image_size: int, image_root: Optional[str],
                 max_length: int, template: str = "plain", manifest_ref=None):
        from sea_ray.data.templates import resolve_template
        from sea_ray.model.llm import load_tokenizer

        self.stage, self.image_size, self.image_root, self.max_length = stage, image_size, image_root, max_length
        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.template = "plain" if stage == "align" else resolve_template(template, self.tokenizer)
        self.geometry = pil_geometry(image_size)
        self.by_id = None
        if manifest_ref is not None:
            import ray

            self.by_id = ray.get(manifest_ref)

    def _encode(self, conversations) -> dict:
        from sea_ray.data.manifest import caption_of
        from sea_ray.data.templates import encode_conversation, encode_plain

        if self.template == "plain":
            return encode_plain(caption_of({"conversations": conversations}), self.tokenizer, self.max_length)
        return encode_conversation(conversations, self.tokenizer, self.template, self.max_length)

    def __call__(self, batch: dict) -> dict:
        from sea_ray.data.images import pil_to_uint8

        out: dict[str, list] = {k: [] for k in ("sample_id", "input_ids", "labels", "image", "has_image",
                                                "num_tokens")}
        with_labels = "label_ids" in batch
        if with_labels:
            out.update(label_ids=[], label_scores=[], grid=[], top_n=[])
        n = len(batch["sample_id"] if "sample_id" in batch else batch["image_id"])
        blank = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        for i in range(n):
            if with_labels:
                sid = str(batch["image_id"][i])
                row = self.by_id.get(sid)
                if row is None:
                    log.warning("labels row %s has no manifest row: skipped", sid)
                    continue
                image_ref, image_bytes, conversations = row
            else:
                sid = str(batch["sample_id"][i])
                image_ref, image_bytes = batch["image"][i], batch["image_bytes"][i]
                conversations = list(batch["conversations"][i])
            try:
                encoded = self._encode(conversations)
            except ValueError as exc:  # nothing left to supervise after truncation, etc.
                log.warning("sample %s skipped: %s", sid, exc)
                continue
            image = blank
            has_image = bool(image_ref) or bool(image_bytes)
            if has_image:
                pil, reason = _load_image(image_ref or None, image_bytes or None, self.image_root)
                if pil is None:
                    log.warning("sample %s skipped: image %s", sid, reason)
                    continue
                image = pil_to_uint8(self.geometry(pil))
            ids = np.asarray(encoded["input_ids"], dtype=np.int32)
            labels = np.asarray(encoded["labels"], dtype=np.int32)
            out["sample_id"].append(sid)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["image"].append(image)
            out["has_image"].append(has_image)
            out["num_tokens"].append(int((labels != IGNORE_INDEX).sum()))
            if with_labels:
                out["label_ids"].append(np.asarray(batch["label_ids"][i], dtype=np.int32))
                out["label_scores"].append(np.asarray(batch["label_scores"][i], dtype=np.float32))
                out["grid"].append(np.asarray([batch["grid_h"][i], batch["grid_w"][i]], dtype=np.int32))
                out["top_n"].append(int(batch["top_n"][i]))
        result = {k: v for k, v in out.items()}
        result["image"] = np.stack(out["image"]) if out["image"] else np.zeros((0, self.image_size,
                                                                                 self.image_size, 3), np.uint8)
        for key in ("input_ids", "labels", "label_ids", "label_scores"):
            if key in result:
                arr = np.empty(len(result[key]), dtype=object)
                arr[:] = result[key]
                result[key] = arr
        return result


def manifest_rows(uri: str, require_image: bool):
    from sea_ray.data.manifest import read_manifest

    result = read_manifest(uri, require_image=require_image)
    if result.errors:
        log.warning("%s: %d bad manifest rows skipped (first: row %s, %s)", uri, len(result.errors),
                    result.errors[0]["row"], result.errors[0]["reason"])
    if not result.rows:
        from sea_ray.errors import DataError

        raise DataError(f"{uri}: no usable rows ({len(result.errors)} bad)")
    return result


LABEL_COLUMNS = ["image_id", "grid_h", "grid_w", "top_n", "label_ids", "label_scores"]


def label_shards(labels_uri: str) -> tuple[list[str], int]:
    """The completed labels shards' URIs in order, and their total row count (from the markers).

    Only a finished labels dataset (``_SUCCESS`` present) is read; a shard without its marker
    (a killed run's last one) is never used."""
    from sea_ray.errors import DataError
    from sea_ray.labels.dataset import completed_shards

    if not storage.is_complete(labels_uri):
        raise DataError(f"{labels_uri} is not a complete labels dataset (no {storage.MARKER}): "
                        "re-run the labels job to finish it")
    files, rows = completed_shards(labels_uri)
    if not files:
        raise DataError(f"no labels shards under {labels_uri}")
    return files, rows


def read_label_shard(batch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in batch.column("path").to_pylist():
        fs, path = storage.pyarrow_fs(uri)
        # use_threads=False: threaded reads sometimes abort pyarrow at interpreter exit
        tables.append(pq.read_table(path, filesystem=fs, columns=LABEL_COLUMNS, use_threads=False))
    return pa.concat_tables(tables)


def build_dataset(cfg, image_size: int, num_actors: int = 1, actor_cpus: float = 0.5):
    """(Ray Dataset of preprocessed samples, number of input rows) for an align/instruct config."""
    import ray

    from sea_ray.data import ingest

    stage = cfg.job
    manifest = manifest_rows(cfg.data.manifest, require_image=stage == "align")
    tokenizer_spec = cfg.model.llm.tokenizer or cfg.model.llm.name_or_path
    kwargs = dict(stage=stage, tokenizer_spec=tokenizer_spec, image_size=image_size,
                  image_root=cfg.data.image_root, max_length=cfg.data.max_length,
                  template=getattr(cfg, "template", "plain"))
    labels = cfg.data.labels if stage == "align" else None
    if labels:
        by_id = {r["id"]: (r["image"], r["image_bytes"], r["conversations"]) for r in manifest.rows}
        kwargs["manifest_ref"] = ray.put(by_id)
        shards, num_rows = label_shards(labels)
        source = ingest.from_files(shards, read_label_shard, cpus=actor_cpus / 2)  # shard (= manifest) order
    else:
        items = [{"sample_id": r["id"], "image": r["image"] or "", "image_bytes": r["image_bytes"] or b"",
                  "conversations": r["conversations"]} for r in manifest.rows]
        source = ingest.from_rows(items)
        num_rows = len(items)
    ds = ingest.preprocessed(source, Preprocess, kwargs, num_actors, actor_cpus)
    return ds, num_rows
