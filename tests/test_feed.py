"""The one data feed of the stage recipe (sea_ray.train.feed): its documented order, the same on
1 or N workers, resume without re-reading, reading only the labels' row groups it needs, and the
Ray Data source yielding exactly the in-memory source's micro-batches."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sea_ray.config.loading import validate
from sea_ray.train.feed import Order, chunk_of, materialize, memory_micro_batches


def _step_batches(order, world_size, steps):
    """{step: sorted stream positions of its global batch} as the workers together consume them."""
    per_step = order.global_size // order.per_worker
    out = {}
    for rank in range(world_size):
        for chunk in order.chunks(world_size, rank, 0, steps):
            out.setdefault(chunk // per_step, []).extend(range(chunk * order.per_worker,
                                                               (chunk + 1) * order.per_worker))
    return {s: sorted(v) for s, v in out.items()}


def test_every_epoch_is_a_permutation_in_the_documented_order():
    order = Order(num_rows=23, global_size=8, per_worker=2, seed=5, window=10)
    for e in range(3):
        rows, starts = order.epoch(e)
        assert sorted(rows) == list(range(23))
        # windows of 10 consecutive rows, each visited whole, in a seeded order
        windows = [rows[a:b] for a, b in zip(starts, list(starts[1:]) + [23])]
        assert sorted(int(w.min()) // 10 for w in windows) == [0, 1, 2]
        assert all(len(set(int(r) // 10 for r in w)) == 1 for w in windows)
        expected_windows = np.random.default_rng([5, e]).permutation(3)
        assert [int(w[0]) // 10 for w in windows] == list(expected_windows)
        w0 = int(expected_windows[0])
        assert list(windows[0]) == list(w0 * 10 + np.random.default_rng([5, e, w0]).permutation(len(windows[0])))
    assert list(order.epoch(0)[0]) != list(order.epoch(1)[0])
    assert list(Order(23, 8, 2, 6, 10).epoch(0)[0]) != list(order.epoch(0)[0])  # the seed matters


def test_the_same_global_batches_on_one_two_or_four_workers():
    order = Order(num_rows=50, global_size=16, per_worker=2, seed=1, window=64)
    one = _step_batches(order, 1, 10)
    assert one == _step_batches(order, 2, 10) == _step_batches(order, 4, 10)
    assert one[0] == list(range(16)) and one[9] == list(range(144, 160))  # spans epochs: nothing dropped
    rows = order.rows(np.arange(160))
    assert sorted(rows[:50]) == list(range(50)) and sorted(rows[50:100]) == list(range(50))
    # worker r takes chunks r, r + W, ...: its micro-batches are the global batch's chunks
    assert list(order.chunks(2, 1, 0, 2)) == [1, 3, 5, 7, 9, 11, 13, 15]
    with pytest.raises(ValueError, match="divisible"):
        list(order.chunks(3, 0, 0, 1))


def test_a_micro_batchs_place_in_the_global_batch_is_the_same_on_any_number_of_workers():
    """``chunk_of`` (what keys a micro-batch's SEA sampling and dropout) names the chunk the feed
    gives worker r at accumulation step m: the same rows get the same key at any world size."""
    order = Order(num_rows=50, global_size=16, per_worker=2, seed=1, window=64)
    per_step = 8
    for workers in (1, 2, 4, 8):
        accum = per_step // workers
        keys = [chunk_of(rank, micro, workers) for rank in range(workers) for micro in range(accum)]
        assert sorted(keys) == list(range(per_step))  # one key per chunk of the step, at every size
        for rank in range(workers):
            got = list(order.chunks(workers, rank, 3, 4))  # step 3's chunks of this worker, in order
            assert got == [3 * per_step + chunk_of(rank, micro, workers) for micro in range(accum)]
    assert [chunk_of(1, m, 2) for m in range(4)] == [1, 3, 5, 7]  # worker r: chunks r, r + W, ...


def test_a_global_batch_larger_than_the_data_still_steps():
    """Rows carry over the epoch boundary, so a batch of 64 over 24 rows is 64 rows (no hang)."""
    order = Order(num_rows=24, global_size=64, per_worker=8, seed=0, window=8192)
    chunks = list(order.chunks(1, 0, 0, 2))
    assert len(chunks) == 16
    rows = order.rows(np.arange(128))
    assert len(rows) == 128 and set(rows) == set(range(24))


def test_resume_starts_at_the_step_and_segments_follow_windows():
    order = Order(num_rows=40, global_size=8, per_worker=4, seed=2, window=16)
    full = list(order.chunks(2, 0, 0, 10))
    assert list(order.chunks(2, 0, 4, 10)) == full[4:]  # one chunk per worker per step
    segments = order.segments(full)
    positions = np.concatenate([p for _, p in segments])
    assert list(positions) == [q for c in full for q in range(c * 4, c * 4 + 4)]
    for rows, pos in segments:  # one window of one epoch each: the reading unit
        assert len({int(q) // 40 for q in pos}) == 1 and len({int(r) // 16 for r in rows}) == 1
        assert list(rows) == list(order.rows(pos))


def test_reading_stored_rows_reads_only_their_row_groups(tmp_path, monkeypatch):
    from sea_ray.train.data import LABEL_COLUMNS, read_stored_rows

    shards = []
    for k, (start, n) in enumerate([(0, 10), (10, 7), (17, 12)]):
        table = pa.table({"image_id": [f"img{i}" for i in range(start, start + n)], "grid_h": [2] * n,
                          "grid_w": [2] * n, "top_n": [1] * n,
                          "label_ids": [[i, i, i, i] for i in range(start, start + n)],
                          "label_scores": [[0.5] * 4] * n})
        path = tmp_path / f"shard-{k}.parquet"
        pq.write_table(table, path, row_group_size=3)
        shards.append((str(path), n))
    read_groups = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read_groups.append(list(groups)) or real(self, groups, **kw))
    wanted = np.array([28, 3, 11, 0, 27, 16])
    table = read_stored_rows(shards, wanted)
    assert table.column_names == LABEL_COLUMNS
    assert table.column("image_id").to_pylist() == [f"img{i}" for i in wanted]
    assert [r[0] for r in table.column("label_ids").to_pylist()] == list(wanted)
    assert read_groups == [[0, 1], [0, 2], [3]]  # of 4, 3 and 4 row groups


def _configs(world, labels, runs):
    common = {"model": {"preset": "tiny-openclip-llama"}, "run": {"storage": runs, "seed": 4},
              "batch": {"global_size": 8, "per_worker": 2}, "optim": {"max_steps": 4}}
    align = validate({**common, "job": "align", "data": {"manifest": f"{world}/train/pretrain.json",
                                                          "image_root": f"{world}/images", "labels": labels,
                                                          "shuffle_window": 20}})
    instruct = validate({**common, "job": "instruct", "data": {"manifest": f"{world}/train/instruct.json",
                                                                "image_root": f"{world}/images"}})
    return align, instruct


def _ids(batches):
    return [None if b is None else list(b["sample_id"]) for b in batches]


@pytest.mark.ray
def test_ray_data_feed_yields_the_in_memory_feeds_micro_batches(ray_local, world_dir, tmp_path):
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import order_of, ray_micro_batches
    from sea_ray.world.oracle import write_oracle_labels

    labels = str(tmp_path / "labels")
    align, instruct = _configs(world_dir, labels, str(tmp_path / "runs"))
    tower = build_vision_tower(align.model.vision, align.data.image_aspect)
    write_oracle_labels(world_dir, labels, 8, tower.transform_spec(), rows_per_shard=7)
    runs = []
    for cfg, sizes in ((align, (1, 2)), (instruct, (2,))):
        source = source_of(cfg)
        kwargs = preprocess_kwargs(cfg, 64)
        rows = materialize(source_of(cfg, shared=False), kwargs, in_process=True)
        order = order_of(cfg, source.num_rows)
        runs += [(source, kwargs, rows, order, w, r) for w in sizes for r in range(w)]

    def lazy_feed(run):  # a worker's feed from step 1 on (a resumed run), an actor of 0.25 CPU
        source, kwargs, _, order, world_size, rank = run
        return list(ray_micro_batches(source, kwargs, order, world_size, rank, 1, 4, actor_cpus=0.25))

    with ThreadPoolExecutor(len(runs)) as pool:  # the pipelines side by side: their actors start at once
        lazy_feeds = list(pool.map(lazy_feed, runs))
    for (_, _, rows, order, world_size, rank), lazy in zip(runs, lazy_feeds):
        kept = list(memory_micro_batches(rows, order, world_size, rank, 1, 4))
        assert _ids(lazy) == _ids(kept) and len(lazy) == 3 * 4 // world_size
        for a, b in zip(lazy, kept):
            assert np.array_equal(a["image"], b["image"])
            assert all(np.array_equal(x, y) for x, y in zip(a["input_ids"], b["input_ids"]))
            if "label_ids" in a:
                assert all(np.array_equal(x, y) for x, y in zip(a["label_ids"], b["label_ids"]))


def test_dropped_rows_shorten_their_micro_batch(world_dir, tmp_path):
    """An unreadable image drops its sample from its micro-batch; a micro-batch with no usable
    row is None (the recipe then steps with a zero-weight stand-in); the rest is unchanged."""
    from sea_ray.train.data import preprocess_kwargs, source_of

    rows = json.loads((world_dir / "train" / "instruct.json").read_text())[:8]
    with_image = [r for r in rows if r.get("image")]
    broken = [dict(r, image="missing.png") if r in with_image[:2] else r for r in rows]
    manifest = tmp_path / "instruct.json"
    manifest.write_text(json.dumps(broken))
    cfg = validate({"job": "instruct", "model": {"preset": "tiny-openclip-llama"},
                    "data": {"manifest": str(manifest), "image_root": f"{world_dir}/images"},
                    "batch": {"global_size": 2, "per_worker": 1}})
    source = source_of(cfg, shared=False)
    kept = materialize(source, preprocess_kwargs(cfg, 64), in_process=True)
    assert len(kept["sample_id"]) == 6 and source.num_rows == 8
    order = Order(8, 2, 1, 0, 8192)
    batches = list(memory_micro_batches(kept, order, 1, 0, 0, 4))
    assert sum(b is None for b in batches) == 2 and len(batches) == 8
    dropped = {r["id"] for r in with_image[:2]}
    assert {b["sample_id"][0] for b in batches if b is not None} == {r["id"] for r in rows} - dropped
