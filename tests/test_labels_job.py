"""The labels job on Ray Data: 300 world images to a local folder and to a bucket, a kill and a
re-run, every bad input, the CLI. Uses the session's local Ray (``ray_local``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from sea_ray.config.loading import validate
from sea_ray.errors import ConfigError, DataError
from sea_ray.labels import dataset as D
from sea_ray.labels.job import LabelsInterrupted, run
from sea_ray.labels.schema import ERRORS_SCHEMA, LABELS_SCHEMA, META_KEYS, SCHEMA_VERSION
from sea_ray.labels.vocab import vocab_hash

pytestmark = pytest.mark.ray

N_IMAGES = 300
ROWS_PER_SHARD = 64
TOP_N = 5


def _raw_cfg(manifest, output, image_root=None, **sections) -> dict:
    raw = {"job": "labels", "output": str(output), "model": {"preset": "tiny-openclip-llama"},
           "data": {"manifest": str(manifest), "image_root": str(image_root) if image_root else None},
           "vocab": {"min_count": 1}, "labeler": {"top_n": TOP_N, "batch_size": 32},
           "compute": {"num_actors": 1, "cpus_per_actor": 1, "rows_per_shard": ROWS_PER_SHARD}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _cfg(*args, **kwargs):
    return validate(_raw_cfg(*args, **kwargs))


@pytest.fixture(scope="module")
def world300(tmp_path_factory):
    """300 world images (64 px) and one manifest holding all of them, in id order."""
    from sea_ray.world.generator import generate_world

    root = tmp_path_factory.mktemp("world300")
    generate_world(root, num_images=N_IMAGES, seed=0, image_size=64)
    rows = [r for split in ("train", "val", "test") for r in json.loads((root / split / "pretrain.json").read_text())]
    (root / "all.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def reference(ray_local, world300, tmp_path_factory):
    """One uninterrupted local run: (config, output dir, summary)."""
    out = tmp_path_factory.mktemp("labels") / "ref"
    cfg = _cfg(world300 / "all.json", out, world300 / "images")
    return cfg, out, run(cfg)


def _by_id(uri) -> dict[str, tuple]:
    table = D.read_labels(str(uri))
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate image ids"
    lab = np.asarray(table["label_ids"].combine_chunks().flatten()).reshape(len(ids), -1)
    sco = np.asarray(table["label_scores"].combine_chunks().flatten()).reshape(len(ids), -1)
    return {i: (lab[k], sco[k]) for k, i in enumerate(ids)}


def _assert_same_labels(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key][0], b[key][0]), key
        assert np.allclose(a[key][1].astype(np.float32), b[key][1].astype(np.float32), atol=2e-3), key


def test_local_run_writes_the_documented_dataset(reference, world300):
    cfg, out, summary = reference
    assert summary["counts"]["labelled"] == N_IMAGES and summary["counts"]["errors"] == 0
    assert summary["shards_written"] == 5 and summary["shards_skipped"] == 0
    # rows = input images, ids unique, manifest order
    table = D.read_labels(str(out))
    ids = table["image_id"].to_pylist()
    assert ids == [f"world_{i:06d}" for i in range(N_IMAGES)]
    # schema as documented, per-row shapes and invariants
    assert table.schema.equals(LABELS_SCHEMA, check_metadata=True)
    # each shard in parts, every part named by its marker, every stored file a part of some marker
    ldir = D.LabelsDir(str(out))
    markers = ldir.markers()
    listed = [rel for k, m in markers.items() for rel, _ in D.shard_files(k, m)]
    assert sorted(listed) == ldir.list_tree(D.SHARDS) and len(listed) >= len(markers) == 5
    for k, m in markers.items():
        assert sum(part["rows"] for part in m["parts"]) == m["labelled"] == m["rows"]
        for rel, rows in D.shard_files(k, m):
            assert rel.startswith(f"{D.SHARDS}/{D.shard_name(k)}/part-")
            assert pq.read_schema(out / rel).equals(LABELS_SCHEMA) and pq.read_metadata(out / rel).num_rows == rows
    assert set(table["grid_h"].to_pylist()) == {8} and set(table["top_n"].to_pylist()) == {TOP_N}
    labels = _by_id(out)
    meta = json.loads((out / D.META_FILE).read_text())
    vocab = meta["vocab"]["words"]
    for lab, sco in labels.values():
        assert lab.shape == (64 * TOP_N,) and sco.dtype == np.float16
        assert ((lab >= 0) == (sco > 0)).all() and lab.max() < len(vocab) and lab.min() >= -1
        per_patch = sco.astype(np.float32).reshape(64, TOP_N)
        assert (np.diff(per_patch, axis=1) <= 0).all()  # descending per patch
    assert any((lab >= 0).any() for lab, _ in labels.values())
    # _meta.json complete
    assert set(META_KEYS) <= set(meta) and meta["schema_version"] == SCHEMA_VERSION
    assert meta["vocab"]["hash"] == vocab_hash(vocab) == summary["vocab_hash"] and vocab == sorted(vocab)
    assert {"red", "circle", "gray"} <= set(vocab) and "the" not in vocab
    assert meta["grid"] == [8, 8] and meta["transform"]["image_size"] == 64 and meta["top_n"] == TOP_N
    assert meta["score_sign"] == "raw" and meta["features"] == "dense" and meta["templates"] == ["a photo of a {}."]
    assert meta["model"]["vision"]["backend"] == "open_clip"
    assert meta["counts"] == {"manifest_rows": N_IMAGES, "valid_rows": N_IMAGES, "labelled": N_IMAGES, "errors": 0,
                              "errors_by_stage": {"manifest": 0}, "shards": 5}
    assert (out / "_SUCCESS").exists() and D.read_errors(str(out)).num_rows == 0
    # where the work ran: the session's one Ray node, named by the summary and by every marker
    import ray

    here = ray.get_runtime_context().get_node_id()
    assert summary["nodes"] == {"decode": [here], "label": [here], "write": [here]}
    assert all(m["nodes"] == summary["nodes"] for m in markers.values())
    assert D.read_errors(str(out)).schema.equals(ERRORS_SCHEMA)
    # the training-side grid check reads this metadata
    from sea_ray.checks import read_labels_meta

    assert read_labels_meta(str(out))["grid"] == [8, 8]
    # a re-run finds every shard complete and rewrites nothing
    before = {p: p.stat().st_mtime_ns for p in (out / D.SHARDS).rglob("*.parquet")}
    again = run(cfg)
    assert again["shards_skipped"] == 5 and again["shards_written"] == 0 and again["images_processed"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / D.SHARDS).rglob("*.parquet")} == before


def test_changed_setup_on_the_same_output_is_refused(reference, world300):
    _, out, _ = reference
    changed = _cfg(world300 / "all.json", out, world300 / "images", labeler={"top_n": 3})
    with pytest.raises(DataError, match="different setup.*labeler"):
        run(changed)


def test_a_plan_that_would_deadlock_two_cpus_is_refused(ray_local, world300, tmp_path):
    cfg = _cfg(world300 / "all.json", tmp_path / "out", world300 / "images", compute={"cpus_per_actor": 2})
    with pytest.raises(ConfigError, match="deadlock"):
        run(cfg)
    assert not (tmp_path / "out" / D.SHARDS).exists()


def test_weights_that_do_not_fit_the_tower_fail_the_job_with_the_labelers_error(ray_local, world300, tmp_path):
    """Planning builds the tower on the meta device and reads no weights; the labeler actors are
    the first to load them. A readable weights file of another model (it passes the checks before
    Ray starts, tests/test_preflight.py) ends the job with the loader's error: no shard, no ``_SUCCESS``."""
    wrong = tmp_path / "tower.safetensors"
    save_file({"not_a_clip_weight": torch.zeros(2)}, str(wrong))
    out = tmp_path / "out"
    cfg = _cfg(world300 / "all.json", out, world300 / "images", model={"vision": {"weights": str(wrong)}})
    with pytest.raises(DataError, match=r"the labeler could not load model\.vision .*not_a_clip_weight"):
        run(cfg)
    assert not (out / "_SUCCESS").exists() and not list((out / D.SHARDS).glob("*.parquet"))


def test_killed_part_way_then_rerun_gives_the_same_rows(reference, world300, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "labels"
    cfg = _cfg(world300 / "all.json", out, world300 / "images")
    with pytest.raises(LabelsInterrupted):
        run(cfg, stop_after_shards=2)
    ldir = D.LabelsDir(str(out))
    marked = ldir.completed_shards()
    errors_files = {int(n[6:11]) for n in ldir.list(D.ERRORS) if n.startswith("shard-")}
    with_parts = {int(rel.split("/")[1][6:]) for rel in ldir.list_tree(D.SHARDS)}
    [torn_shard] = errors_files - marked  # all its files written, its marker not
    assert len(marked) == 2 and marked | {torn_shard} <= with_parts and not (out / "_SUCCESS").exists()
    with pytest.raises(FileNotFoundError):
        D.read_labels(str(out))
    assert D.read_labels(str(out), require_complete=False).num_rows == 2 * ROWS_PER_SHARD
    # make it worse: a part of the unmarked shard torn in half (a non-atomic store), a stray part
    # that no run of this plan would write, temporary files left behind
    torn = sorted((out / D.SHARDS / D.shard_name(torn_shard)).iterdir())[0]
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])
    (torn.parent / D.part_name(torn_shard * ROWS_PER_SHARD + 1, 3)).write_bytes(data)
    (out / D.SHARDS / ".tmp-deadbeef").write_bytes(b"partial")
    (torn.parent / ".tmp-cafe").write_bytes(b"partial")

    summary = run(cfg)
    assert summary["shards_skipped"] == 2 and summary["shards_written"] == 3
    assert summary["counts"]["labelled"] == N_IMAGES
    assert not (out / D.SHARDS / ".tmp-deadbeef").exists() and not (torn.parent / ".tmp-cafe").exists()
    markers = ldir.markers()
    assert sorted(rel for k, m in markers.items() for rel, _ in D.shard_files(k, m)) == ldir.list_tree(D.SHARDS)
    _assert_same_labels(_by_id(out), _by_id(ref_out))
    assert D.read_labels(str(out))["image_id"].to_pylist() == [f"world_{i:06d}" for i in range(N_IMAGES)]


def _late_labeler(starts_file, late_starts: int, late_s: float):
    """A LabelActor whose first ``late_starts`` starts take ``late_s`` longer (each start appends a
    byte to ``starts_file``): a pipeline that stalls while it starts. Defined in a function, so Ray
    ships the class by value."""
    from sea_ray.labels.pipeline import LabelActor

    class LateLabelActor(LabelActor):
        def __init__(self, *args, **kwargs):
            import os
            import time

            with open(starts_file, "ab") as f:
                f.write(b"x")
            if os.path.getsize(starts_file) <= late_starts:
                time.sleep(late_s)
            super().__init__(*args, **kwargs)

    return LateLabelActor


@pytest.mark.parametrize("late_starts", [1, 2])
def test_a_pipeline_stalled_before_its_first_shard_is_started_once_more(reference, world300, tmp_path, monkeypatch,
                                                                         caplog, late_starts):
    import logging

    from sea_ray.labels import job

    # the timeout leaves room for a normal start (up to 13 s in a full default run on 2 cores)
    starts = tmp_path / "starts"
    monkeypatch.setattr(job, "LabelActor", _late_labeler(str(starts), late_starts, late_s=90))
    out = tmp_path / "labels"
    cfg = _cfg(world300 / "all.json", out, world300 / "images", compute={"stall_timeout_s": 30})
    with caplog.at_level(logging.WARNING, logger="sea_ray.labels.job"):
        if late_starts == 1:  # stalled once: the second pipeline labels everything
            summary = run(cfg)
            assert summary["counts"]["labelled"] == N_IMAGES
            _assert_same_labels(_by_id(out), _by_id(reference[1]))
        else:  # stalled twice: the job fails, naming the setting
            with pytest.raises(DataError, match=r"stall_timeout_s=30s before its first shard, twice.*; when it "
                                                r"stopped, [\d.]+ of [\d.]+ CPUs free\)"):
                run(cfg)
            assert not (out / "_SUCCESS").exists()
    assert starts.read_bytes() == b"xx"
    assert "no progress for 30s before its first shard: starting it once more" in caplog.text


def test_the_driver_gets_counts_and_error_rows_only_and_the_rows_are_the_labelers(ray_local, world300, tmp_path,
                                                                                  monkeypatch):
    """What the pipeline yields to the driver holds no label array (part records: counts, file
    names, error rows); the dataset written by the workers is row for row what the labeler gives
    for each image, called directly without Ray, in manifest order, as the driver wrote it before."""
    from sea_ray.data.images import split_transform
    from sea_ray.labels import job
    from sea_ray.labels.pipeline import RECORD_SCHEMA, LabelActor, decode_batch

    rows = json.loads((world300 / "all.json").read_text())[:150]
    rows.insert(70, {"id": "gone", "image": "no_such_image.png", "conversations": rows[0]["conversations"]})
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(rows))
    out = tmp_path / "labels"
    cfg = _cfg(manifest, out, world300 / "images", compute={"decode_batch_size": 24})  # batches cross shards
    received = []
    add = job._ShardWriter.add
    monkeypatch.setattr(job._ShardWriter, "add", lambda self, batch: received.append(batch) or add(self, batch))
    summary = run(cfg)
    assert summary["counts"]["labelled"] == 150 and summary["counts"]["errors_by_stage"] == {"manifest": 0, "read": 1}

    assert received and all(batch.schema.equals(RECORD_SCHEMA) for batch in received)
    records = [rec for batch in received for rec in batch.to_pylist()]
    assert sum(rec["rows"] for rec in records) == 151 and sum(rec["labelled"] for rec in records) == 150
    assert [(e, r) for rec in records for e, r in zip(rec["error_id"], rec["error_row"])] == [("gone", 70)]
    assert summary["driver_received_bytes"] == sum(batch.nbytes for batch in received) < 100 * len(rows)
    [error] = D.read_errors(str(out)).to_pylist()
    assert error["image"] == "no_such_image.png" and error["stage"] == "read"

    # the reference: the decode and label stages called in this process, every valid row in order
    p = job.plan(cfg)
    pil_part, tensor_part = split_transform(p.transform)
    block = job._input_blocks(p, list(range(len(p.shards))), len(p.rows))[0]
    decoded = decode_batch(block, pil_part, None, p.image_size, max_pixels=cfg.data.max_image_pixels)
    actor = LabelActor(cfg.model.vision, cfg.data.image_aspect, cfg.labeler, p.vocab.words, seed=cfg.seed,
                       device="cpu", torch_threads=1, tensor_part=tensor_part)
    expected = actor(decoded)
    good = np.flatnonzero(expected["ok"])
    table = D.read_labels(str(out))
    assert table["image_id"].to_pylist() == [str(expected["image_id"][i]) for i in good]
    width = 64 * TOP_N
    ids = np.asarray(table["label_ids"].combine_chunks().flatten()).reshape(-1, width)
    scores = np.asarray(table["label_scores"].combine_chunks().flatten()).reshape(-1, width)
    assert np.array_equal(ids, expected["label_ids"][good])
    assert np.allclose(scores.astype(np.float32), expected["label_scores"][good].astype(np.float32), atol=2e-3)


def test_bucket_input_and_output(reference, world300, s3_bucket, s3_server):
    """Manifest (Parquet, half the rows with inline image bytes) and images in the bucket, labels too."""
    import boto3

    from sea_ray import storage
    from sea_ray.data.manifest import read_manifest, rows_to_table

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3", endpoint_url=s3_server)
    rows = read_manifest(str(world300 / "all.json")).rows
    for i, r in enumerate(rows):
        data = (world300 / "images" / r["image"]).read_bytes()
        if i % 2:
            r["image_bytes"], r["image"] = data, None
        else:
            client.put_object(Bucket=bucket, Key=f"world/images/{r['image']}", Body=data)
    fs, path = storage.pyarrow_fs(f"{s3_bucket}/world/manifest.parquet")
    with fs.open_output_stream(path) as f:
        pq.write_table(rows_to_table(rows), f)
    out = f"{s3_bucket}/labels/run1"
    cfg = _cfg(f"{s3_bucket}/world/manifest.parquet", out, f"{s3_bucket}/world/images")
    summary = run(cfg)
    assert summary["counts"]["labelled"] == N_IMAGES and summary["output"] == out
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/run1/")["Contents"]}
    assert {"labels/run1/_SUCCESS", "labels/run1/_meta.json", "labels/run1/_config.json",
            "labels/run1/vocab.json", "labels/run1/errors/manifest.parquet"} <= keys
    assert sum(k.startswith("labels/run1/markers/") for k in keys) == 5
    meta = json.loads(client.get_object(Bucket=bucket, Key="labels/run1/_meta.json")["Body"].read())
    assert set(META_KEYS) <= set(meta) and meta["counts"]["labelled"] == N_IMAGES
    # the same images give the same labels, wherever they were read from
    _assert_same_labels(_by_id(out), _by_id(reference[1]))
    assert run(cfg)["shards_skipped"] == 5  # markers are found in the bucket too


def test_every_bad_input_is_skipped_with_its_reason_through_the_cli(ray_local, world300, tmp_path, capsys):
    from sea_ray.cli import main
    from tests.test_images import EXPECTED_REASON, GOOD_AFTER_CONVERSION, bad_and_awkward_images

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    good = json.loads((world300 / "train" / "pretrain.json").read_text())[:40]
    lines = [json.dumps(r) for r in good]
    turns = good[0]["conversations"]
    for name, data in bad_and_awkward_images().items():
        ext = ".jpg" if "jpeg" in name or "jpg" in name or name == "zero_bytes" else ".png"
        (bad_dir / (name + ext)).write_bytes(data)
        lines.append(json.dumps({"id": name, "image": str(bad_dir / (name + ext)), "conversations": turns}))
    lines.append(json.dumps({"id": "missing_file", "image": "no_such_image.png", "conversations": turns}))
    lines.append("{this line is not json")
    lines.append(json.dumps(["a", "list"]))
    lines.append(json.dumps({"image": "world_000001.png", "conversations": turns}))
    lines.append(json.dumps({"id": "empty_caption", "image": "world_000002.png",
                             "conversations": [turns[0], {"from": "gpt", "value": "   "}]}))
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels"
    cfg_path = tmp_path / "labels.yaml"
    cfg_path.write_text(json.dumps(_raw_cfg(manifest, out, world300 / "images", compute={"rows_per_shard": 16},
                                            data={"max_error_fraction": 0.5})))  # many bad rows on purpose

    assert main(["labels", "--config", str(cfg_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected_labelled = {r["id"] for r in good} | GOOD_AFTER_CONVERSION
    assert set(_by_id(out)) == expected_labelled
    assert summary["counts"]["labelled"] == len(expected_labelled)

    errors = D.read_errors(str(out)).to_pylist()
    by_id = {e["image_id"]: e for e in errors if e["image_id"]}
    for name, why in EXPECTED_REASON.items():
        assert by_id[name]["stage"] == "decode" and why in by_id[name]["reason"], by_id[name]
        assert by_id[name]["image"].endswith(name + (".jpg" if "jpg" in name or "jpeg" in name
                                                        or name == "zero_bytes" else ".png"))
    assert by_id["missing_file"]["stage"] == "read" and "missing file" in by_id["missing_file"]["reason"]
    assert by_id["empty_caption"]["stage"] == "manifest" and "empty answer or caption" in by_id["empty_caption"]["reason"]
    manifest_errors = [e for e in errors if e["stage"] == "manifest"]
    reasons = " | ".join(e["reason"] for e in manifest_errors)
    assert len(manifest_errors) == 4 and "malformed JSON" in reasons and "not an object" in reasons
    assert "missing id" in reasons
    assert len(errors) == len(EXPECTED_REASON) + 1 + 4
    meta = json.loads((out / D.META_FILE).read_text())
    assert meta["counts"]["errors_by_stage"] == {"decode": len(EXPECTED_REASON), "manifest": 4, "read": 1}
    assert meta["counts"]["labelled"] == len(expected_labelled)
    assert meta["counts"]["manifest_rows"] == len(lines)


def test_bench_dry_run_prints_the_driver_memory_and_the_four_result_lines(ray_local, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "labels.py"
    spec = importlib.util.spec_from_file_location("bench_labels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--dry-run", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    rss, lines = printed[-7:-4], printed[-4:]
    assert [line.split(":")[0] for line in lines] == ["labeler_alone_img_s", "end_to_end_img_s", "ratio",
                                                     "bytes_per_image"]
    # the driver's memory at 32 and 64 images, each in its own driver process
    assert [line.split(":")[0] for line in rss] == ["driver_peak_rss_mb_32", "driver_peak_rss_mb_64",
                                                   "driver_peak_rss_ratio"]
    assert float(rss[2].split(": ")[1]) == pytest.approx(result["driver_peak_rss_ratio"], abs=1e-3)
    assert all(mb > 0 for mb in result["driver_peak_rss_mb"].values())
    assert float(lines[2].split(": ")[1]) == pytest.approx(result["ratio"], abs=1e-3) and result["ratio"] > 0
    assert result["bytes_per_image"] == 64 * 64 * 3  # uint8 pixels of the tiny tower's 64 px input
