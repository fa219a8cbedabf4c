"""Labels made on one patch grid, used by a tower with another (``data.label_grid: resample``,
sea_ray/labels/regrid.py): the area weights, the score-weighted resampling, the world's labels
moved from 8 x 8 onto 9 x 9 (the CLIP-L-336 24 x 24 -> SigLIP-384 27 x 27 ratio) scored against the
ground truth on 9 x 9, and an align stage whose SigLIP-shaped tower has a 9 x 9 grid fed with
8 x 8 labels: refused by default, validated and trained with ``resample``."""

from __future__ import annotations

import numpy as np
import pytest

from sea_ray import jobs
from sea_ray.config.loading import validate
from sea_ray.errors import ConfigError
from sea_ray.labels.regrid import area_weights, overlap_1d, resample

# A SigLIP vision tower at world size: 72 px images, 8 px patches = 9 x 9, against the world
# CLIP's 64 px / 8 px = 8 x 8 (SigLIP-SO400M/14-384's 27 x 27 against CLIP-L/14-336's 24 x 24)
SIGLIP_9x9 = {"backend": "hf", "name": "custom", "select_layer": -1,
              "custom": {"model_type": "siglip_vision_model", "image_size": 72, "patch_size": 8, "hidden_size": 32,
                         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}}


def test_area_weights_cover_every_target_patch_once():
    w = overlap_1d(8, 9)
    assert w.shape == (9, 8) and np.allclose(w.sum(1), 1)
    assert w[0, 0] == pytest.approx(1.0) and w[1, 0] == pytest.approx(1 / 8) and w[1, 1] == pytest.approx(7 / 8)
    assert np.allclose(overlap_1d(2, 1), [[0.5, 0.5]])
    assert np.allclose(area_weights((8, 8), (9, 9)).sum(1), 1)
    assert np.array_equal(area_weights((3, 4), (3, 4)), np.eye(12))


def test_a_coarser_grid_sums_the_scores_its_patches_carry():
    # 2 x 2 -> 1 x 1: each source patch is a quarter of the target
    ids = np.array([[0, 1], [0, -1], [2, -1], [0, 2]])
    scores = np.array([[0.8, 0.2], [0.6, 0.0], [0.9, 0.0], [0.4, 0.1]])
    out_ids, out_scores = resample(ids, scores, (2, 2), (1, 1), 2)
    assert out_ids.tolist() == [0, 2]  # word 0: (0.8 + 0.6 + 0.4) / 4; word 2: (0.9 + 0.1) / 4; word 1 dropped
    assert out_scores.tolist() == pytest.approx([0.45, 0.25])
    # 1 x 1 -> 2 x 2: every target patch inherits the one source patch; padding stays padding
    out_ids, out_scores = resample(np.array([[5, -1, -1]]), np.array([[0.7, 0, 0]]), (1, 1), (2, 2), 3)
    assert out_ids.reshape(4, 3).tolist() == [[5, -1, -1]] * 4
    assert out_scores.reshape(4, 3)[:, 0].tolist() == pytest.approx([0.7] * 4)
    # equal grids: the stored labels as they are
    same_ids, same_scores = resample(ids, scores, (2, 2), (2, 2), 2)
    assert same_ids.tolist() == ids.ravel().tolist() and same_scores.tolist() == pytest.approx(scores.ravel())


def test_ties_keep_the_lower_word_id_and_no_label_means_padding():
    ids, scores = resample(np.array([[7], [3]]), np.array([[0.5], [0.5]]), (1, 2), (1, 1), 1)
    assert ids.tolist() == [3] and scores.tolist() == pytest.approx([0.25])  # each word on half the patch
    ids, scores = resample(np.full((4, 2), -1), np.zeros((4, 2)), (2, 2), (3, 3), 2)
    assert (ids == -1).all() and (scores == 0).all()


def _oracle(world_dir, out, grid):
    from sea_ray.world.oracle import write_oracle_labels

    write_oracle_labels(world_dir, str(out), grid, {"image_size": 8 * grid, "patch_size": 8, "grid": [grid, grid]})
    return out


def test_the_worlds_labels_moved_to_another_grid_still_name_the_patches(world_dir, tmp_path):
    """Oracle labels on 8 x 8 resampled onto 9 x 9 against the ground truth on 9 x 9 (precision@1),
    beside a baseline that ignores the geometry (each 9 x 9 patch takes the 8 x 8 patch of the same
    index, clipped)."""
    from sea_ray.labels.dataset import read_labels
    from sea_ray.world.generator import load_ground_truth, patch_ground_truth, patch_words

    table = read_labels(str(_oracle(world_dir, tmp_path / "labels", 8))).to_pylist()
    truth = {r["id"]: r for r in load_ground_truth(world_dir)}
    words = patch_words()
    hits = naive = total = 0
    for row in table:
        ids, _ = resample(row["label_ids"], row["label_scores"], (8, 8), (9, 9), row["top_n"])
        grid_truth = patch_ground_truth(truth[row["image_id"]], 9, 9)
        stored = np.asarray(row["label_ids"]).reshape(64, -1)
        for p, true_words in enumerate(grid_truth):
            total += 1
            hits += words[ids.reshape(81, -1)[p, 0]] in true_words
            r, c = divmod(p, 9)
            naive += words[stored[min(r, 7) * 8 + min(c, 7), 0]] in true_words
    precision, baseline = hits / total, naive / total
    print(f"\noracle 8x8 labels resampled to 9x9: precision@1 {precision:.4f}; index-clipped baseline {baseline:.4f}")
    assert precision > 0.9 and precision > baseline


def _align_raw(world_dir, labels, storage_dir, **data):
    return {"job": "align", "model": {"preset": "tiny-openclip-llama", "vision": SIGLIP_9x9},
            "run": {"name": "siglip", "storage": str(storage_dir), "seed": 0},
            "data": {"manifest": f"{world_dir}/train/pretrain.json", "image_root": f"{world_dir}/images",
                     "labels": str(labels), "max_length": 48, **data},
            "batch": {"global_size": 4, "per_worker": 4}, "optim": {"max_steps": 2, "lr": 2e-3},
            "sea": {"top_n": 3}, "log_every_n_steps": 1}


def test_an_align_stage_on_another_grid_is_refused_then_resamples_and_trains(world_dir, tmp_path):
    from sea_ray.train import checkpoint as ckpt
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize, num_rows
    from sea_ray.train.loop import LocalIO, run_stage

    labels = _oracle(world_dir, tmp_path / "labels", 8)
    exact = validate(_align_raw(world_dir, labels, tmp_path / "runs"))
    with pytest.raises(ConfigError) as refused:
        jobs.check(exact)
    assert any("8, 8] grid but the vision tower gives [9, 9]" in p and "data.label_grid: resample" in p
               for p in refused.value.problems), refused.value.problems
    cfg = validate(_align_raw(world_dir, labels, tmp_path / "runs", label_grid="resample"))
    jobs.check(cfg)
    source = source_of(cfg, shared=False)
    source.num_rows = 8  # the first 8 rows: two steps of 4
    rows = materialize(source, preprocess_kwargs(cfg, 72), in_process=True)
    assert {tuple(g) for g in rows["grid"]} == {(9, 9)}
    assert {len(ids) for ids in rows["label_ids"]} == {81 * 3}
    uri = str(tmp_path / "runs" / "siglip")
    metrics = run_stage(cfg, LocalIO(uri, rows, num_rows(rows)))
    step, last = ckpt.list_checkpoints(uri)[-1]
    assert step == 2 and ckpt.load_checkpoint(last)["config"]["data"]["label_grid"] == "resample"
    assert metrics["sea_pairs"] > 0 and np.isfinite(metrics["loss_sea"])


def test_the_audit_reports_transferred_precision_beside_the_native_one(world_dir, tmp_path):
    from sea_ray.world.audit import audit, to_markdown

    cfg = validate({"job": "labels", "output": str(tmp_path / "labels"), "model": {"preset": "world-clip-llama"},
                    "data": {"manifest": f"{world_dir}/train/pretrain.json", "image_root": f"{world_dir}/images"},
                    "vocab": {"min_count": 1}, "labeler": {"top_n": 5}})
    report = audit(cfg, str(world_dir), limit=16, variants=(("dense", "raw"),), transfer_grid=(9, 9))
    row = report["results"][0]
    print(f"\nworld CLIP labels: precision@1 on 8x8 {row['precision_at_1']}, resampled to 9x9 "
          f"{row['transferred_precision_at_1']} (chance {report['chance_precision_at_1']})")
    assert report["grid"] == [8, 8] and report["transfer_grid"] == [9, 9]
    assert row["transferred_precision_at_1"] > 2 * report["chance_precision_at_1"]
    assert "precision@1 on 9x9 (resampled)" in to_markdown(report)
