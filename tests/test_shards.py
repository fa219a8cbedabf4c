"""Image-text shards as users have them (sea_ray/data/shards.py): a WebDataset tar folder and an
img2dataset-style Parquet folder made from world images, each with a corrupt image and other bad
samples, through the pre-flight checks, ``sea-ray import-manifest``, the labels job and align, the
WebDataset from the moto S3 server."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sea_ray import storage
from sea_ray.config.loading import validate
from sea_ray.data import shards
from sea_ray.data.importer import import_manifest
from sea_ray.data.manifest import caption_conversation, read_manifest
from sea_ray.errors import ConfigError

PER_FILE = 8  # samples per shard file; two files per format


def _jpeg(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def samples(world_dir):
    """(key, caption, JPEG bytes) of 2 x PER_FILE world training images."""
    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())[:2 * PER_FILE]
    return [(r["id"], r["conversations"][1]["value"], _jpeg(world_dir / "images" / r["image"])) for r in rows]


# The bad samples and the reasons they are reported with (kind = sea_ray.data.budget.reason_kind).
WDS_BAD = {1: ("decode", "truncated or corrupt image data"),  # a truncated JPEG
           4: ("manifest", "no caption member")}                # an image without its text member
PQ_BAD = {2: ("decode", "not an image"),                      # corrupt image bytes
          5: ("manifest", "img2dataset status failed_to_download")}


@pytest.fixture(scope="module")
def wds_dir(samples, tmp_path_factory):
    """img2dataset's webdataset layout: 00000.tar, 00001.tar with <key>.jpg, .txt, .json, and the
    per-tar .parquet metadata beside them (ignored)."""
    root = tmp_path_factory.mktemp("wds")
    for f in range(2):
        with tarfile.open(root / f"{f:05d}.tar", "w") as tf:
            for i in range(f * PER_FILE, (f + 1) * PER_FILE):
                key, caption, jpg = samples[i]
                _add(tf, f"{key}.jpg", jpg[: len(jpg) * 2 // 3] if i == 1 else jpg)
                if i != 4:
                    _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "status": "success", "width": 64}).encode())
        pq.write_table(pa.table({"key": [samples[i][0] for i in range(f * PER_FILE, (f + 1) * PER_FILE)]}),
                       root / f"{f:05d}.parquet")
    (root / "00000_stats.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def pq_dir(samples, tmp_path_factory):
    """img2dataset's parquet layout: key, url, caption, jpg, status, error_message, width, height."""
    root = tmp_path_factory.mktemp("i2d")
    for f in range(2):
        part = range(f * PER_FILE, (f + 1) * PER_FILE)
        jpg = [None if i == 5 else b"\xff\xd8 not a jpeg" if i == 2 else samples[i][2] for i in part]
        pq.write_table(pa.table({
            "key": [samples[i][0] for i in part], "url": [f"http://x/{i}.jpg" for i in part],
            "caption": [samples[i][1] for i in part], "jpg": pa.array(jpg, pa.binary()),
            "status": ["failed_to_download" if i == 5 else "success" for i in part],
            "error_message": ["HTTP Error 404" if i == 5 else None for i in part],
            "width": [64] * PER_FILE, "height": [64] * PER_FILE}), root / f"{f:05d}.parquet", row_group_size=3)
    return root


def _labels_raw(manifest, output, **data):
    return {"job": "labels", "output": str(output), "model": {"preset": "tiny-openclip-llama"},
            "data": {"manifest": str(manifest), "max_error_fraction": 0.2, **data}, "vocab": {"min_count": 1},
            "labeler": {"top_n": 3, "batch_size": 8},
            "compute": {"num_actors": 1, "cpus_per_actor": 1, "cpus_per_decode_task": 0.5, "rows_per_shard": 6}}


def _reasons(errors) -> dict[str, tuple[str, str]]:
    from sea_ray.data.budget import reason_kind

    return {e["image_id"]: (e["stage"], reason_kind(e["reason"])) for e in errors}


def _want(samples, bad) -> dict[str, tuple[str, str]]:
    return {samples[i][0]: why for i, why in bad.items()}


def test_formats_are_detected_and_bad_paths_are_named_before_anything_starts(wds_dir, pq_dir, world_dir, tmp_path):
    from sea_ray import jobs

    assert shards.resolve(str(wds_dir)).format == "webdataset"  # the .parquet metadata beside the tars ignored
    assert [f.rsplit("/", 1)[-1] for f in shards.resolve(f"{wds_dir}/*.tar").files] == ["00000.tar", "00001.tar"]
    assert shards.resolve(str(pq_dir)).format == "parquet"
    assert shards.resolve(str(world_dir / "train" / "pretrain.json")).format == "llava"
    pq.write_table(pa.table({"id": ["a"], "conversations": [[{"from": "human", "value": "hi"}]]}),
                   tmp_path / "m.parquet")
    assert shards.resolve(str(tmp_path / "m.parquet")).format == "llava"  # an imported manifest's layout

    jobs.check(validate(_labels_raw(f"{wds_dir}/*.tar", tmp_path / "out")))  # a glob of shards passes
    jobs.check(validate(_labels_raw(pq_dir, tmp_path / "out", format="parquet")))
    cases = {
        "data.manifest: .*nope/\\*.tar does not exist \\(the glob matches nothing\\)":
            _labels_raw(tmp_path / "nope" / "*.tar", tmp_path / "out"),
        "data.manifest: .*holds no .parquet file": _labels_raw(f"{wds_dir}/*.tar", tmp_path / "out", format="parquet"),
        # img2dataset's metadata Parquet beside the tars is no image Parquet: its columns are named
        "data.manifest: .*00000.parquet has no image column .*no caption column .*its columns: key":
            _labels_raw(wds_dir, tmp_path / "out", format="parquet"),
        "data.manifest: .*is a JSON manifest, not webdataset shards":
            _labels_raw(world_dir / "train" / "pretrain.json", tmp_path / "out", format="webdataset"),
        "data.manifest: .*has no data.columns.caption='alt'":
            _labels_raw(pq_dir, tmp_path / "out", columns={"caption": "alt"}),
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError, match=message):
            jobs.check(validate(raw))


def test_broken_tars_and_samples_are_error_rows_never_a_crash(samples, tmp_path):
    jpg = samples[0][2]
    with tarfile.open(tmp_path / "a.tar", "w") as tf:  # y: a text member without its image
        for name, data in (("x.jpg", jpg), ("x.txt", b"a cat"), ("y.txt", b"a dog")):
            _add(tf, name, data)
    with tarfile.open(tmp_path / "b.tar", "w") as tf:  # key p's members apart: Ray's reader refuses the file
        for name, data in (("p.jpg", jpg), ("q.jpg", jpg), ("q.txt", b"a q"), ("p.txt", b"a p")):
            _add(tf, name, data)
    with tarfile.open(tmp_path / "c.tar", "w") as tf:
        for name, data in (("r.jpg", jpg), ("r.txt", b"an r"), ("s.jpg", jpg), ("s.txt", b"an s")):
            _add(tf, name, data)
    with tarfile.open(tmp_path / "c.tar") as tf:
        cut = tf.getmember("s.jpg").offset_data + 100
    (tmp_path / "c.tar").write_bytes((tmp_path / "c.tar").read_bytes()[:cut])  # an interrupted download
    (tmp_path / "d.tar").write_bytes(b"not a tar" * 10)
    got = read_manifest(str(tmp_path), require_image=True)
    assert [r["id"] for r in got.rows] == ["x"]
    reasons = {e["image_id"]: e["reason"] for e in got.errors}
    assert reasons["y"] == "no image member"
    assert reasons["p"] == reasons["q"] and "members of key 'p' in b.tar are not next to each other" in reasons["p"]
    assert reasons["r"] == reasons["s"] and reasons["s"].startswith("truncated tar: s.jpg ends past the end of c.tar")
    assert reasons["d.tar"].startswith("unreadable tar d.tar (ReadError")  # one row: the file
    assert got.num_read == 8  # x y | p q p (two runs of p) | r s | d.tar


def test_import_embeds_the_shards_images_and_reports_every_bad_sample(samples, wds_dir, pq_dir, tmp_path):
    for src, bad in ((wds_dir, WDS_BAD), (pq_dir, PQ_BAD)):
        out = tmp_path / src.name
        summary = import_manifest(str(src), str(out), max_error_fraction=0.2)
        assert summary["format"] == shards.resolve(str(src)).format and summary["embed_images"]
        assert (summary["rows_read"], summary["rows_skipped"]) == (len(samples), len(bad))
        assert _reasons(pq.read_table(out / "_errors.parquet").to_pylist()) == _want(samples, bad)
        back = read_manifest(str(out))
        good = [s for i, s in enumerate(samples) if i not in bad]
        assert [r["id"] for r in back.rows] == [k for k, _, _ in good]
        assert [r["image_bytes"] for r in back.rows] == [jpg for _, _, jpg in good]
        assert [r["conversations"] for r in back.rows] == [caption_conversation(c) for _, c, _ in good]
    with pytest.raises(Exception, match="more than --max-error-fraction"):  # the budget counts shard errors
        import_manifest(str(pq_dir), str(tmp_path / "strict"), max_error_fraction=0.1)


@pytest.mark.ray
def test_labels_and_align_read_the_shards_where_they_are(ray_local, samples, wds_dir, pq_dir, s3_bucket, tmp_path):
    from sea_ray.labels import dataset as D
    from sea_ray.labels import job as labels_job
    from sea_ray.checks import tower_image_size
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.driver import run as train
    from sea_ray.train.feed import materialize

    fs, path = storage.pyarrow_fs(f"{s3_bucket}/wds")
    for tar in sorted(wds_dir.glob("*.tar")):  # the WebDataset from the bucket
        with fs.open_output_stream(f"{path}/{tar.name}") as f:
            f.write(tar.read_bytes())
    inputs = {"wds": (f"{s3_bucket}/wds", WDS_BAD, f"{s3_bucket}/labels"), "pq": (str(pq_dir), PQ_BAD,
                                                                                 str(tmp_path / "labels"))}
    for name, (manifest, bad, out) in inputs.items():
        cfg = validate(_labels_raw(manifest, out))
        plan = labels_job.plan(cfg)
        assert plan.source.is_shards and all(r["image_bytes"] is None for r in plan.rows)  # no image on the driver
        summary = labels_job.run(cfg)
        good = [k for i, (k, _, _) in enumerate(samples) if i not in bad]
        assert summary["counts"]["labelled"] == len(good), name
        assert _reasons(D.read_errors(out).to_pylist()) == _want(samples, bad), name
        assert D.read_labels(out)["image_id"].to_pylist() == good, name  # every shard in manifest order
        assert summary["driver_received_bytes"] < sum(len(j) for _, _, j in samples) / 4, name

    def align(name, steps=2):
        manifest, _, labels = inputs[name]
        return validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                         "run": {"name": f"align-{name}", "storage": str(tmp_path / "runs")},
                         "data": {"manifest": manifest, "labels": labels, "max_length": 48},
                         "scaling": {"num_workers": 1}, "batch": {"global_size": 4, "per_worker": 4},
                         "optim": {"max_steps": steps}, "checkpoint": {"every_n_steps": steps}, "sea": {"top_n": 3}})

    # align straight from the shards: a Ray Train run on the bucket's WebDataset ...
    result = train(align("wds"))
    assert result["steps"] == 2 and result["checkpoint"]
    assert result["metrics"]["sea_pairs"] > 0 and result["metrics"]["loss_sea"] > 0
    # ... and the Parquet's every row through align's data path (one Ray Train run is enough: the
    # source and the preprocessing actors' reads are the same code; here in this process)
    cfg = align("pq")
    size = tower_image_size(cfg.model.vision)[0][0]
    rows = materialize(source_of(cfg, shared=False), preprocess_kwargs(cfg, size), in_process=True)
    good = [k for i, (k, _, _) in enumerate(samples) if i not in PQ_BAD]
    assert list(rows["sample_id"]) == good and rows["has_image"].all()
    assert rows["image"].reshape(len(good), -1).any(axis=1).all()  # decoded pixels, not the zeros of a missing image
