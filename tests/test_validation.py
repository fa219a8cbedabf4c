"""A stage's validation on data.val_manifest (sea_ray/train/validation.py), in this process."""

from __future__ import annotations

import math

import pytest

from sea_ray.config.loading import validate
from sea_ray.errors import ConfigError


def _cfg(world, val_labels=None, **extra):
    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"}, "sea": {"enabled": val_labels is not None,
                                                                               "top_n": 3},
           "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images",
                    "labels": val_labels, "val_manifest": f"{world}/val/pretrain.json", "val_labels": val_labels,
                    "max_length": 48},
           "validation": {"max_rows": 4, "batch_size": 3}, **extra}
    return validate(raw)


@pytest.fixture(scope="module")
def val_labels(world_dir, tmp_path_factory):
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.world.oracle import write_oracle_labels

    cfg = _cfg(world_dir)
    out = str(tmp_path_factory.mktemp("val-labels"))
    write_oracle_labels(world_dir, out, 8, build_vision_tower(cfg.model.vision, "crop").transform_spec(), split="val")
    return out


def test_the_validator_measures_the_held_out_loss_and_the_sea_metrics(world_dir, val_labels):
    from sea_ray.train.heldout import heldout_lm, heldout_rows, tower_normalize
    from sea_ray.train.loop import build_model
    from sea_ray.train.validation import StageValidator

    cfg = _cfg(world_dir, val_labels)
    model, _ = build_model(cfg)
    metrics = StageValidator(cfg)(model, 0)
    assert set(metrics) == {"val_loss_lm", "val_ppl", "val_sea_loss", "val_word_acc"}
    rows = heldout_rows(cfg, model.vision.image_size, max_rows=4)
    direct = heldout_lm(model, rows, model.tokenizer.pad_token_id, tower_normalize(model), "cpu", batch_size=2)
    assert metrics["val_loss_lm"] == pytest.approx(direct["loss_lm"], rel=1e-5)  # batch size does not matter
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss_lm"]))
    assert 0.0 <= metrics["val_word_acc"] <= 1.0 and metrics["val_sea_loss"] > 0
    assert model.training  # the validator leaves the model's mode as it was


def test_without_labels_only_the_loss_and_the_rules_around_val_labels(world_dir, val_labels):
    from sea_ray.train.loop import build_model
    from sea_ray.train.validation import StageValidator

    cfg = _cfg(world_dir)
    model, _ = build_model(cfg)
    assert set(StageValidator(cfg)(model, 0)) == {"val_loss_lm", "val_ppl"}
    with pytest.raises(ConfigError, match="data.val_labels: needs data.val_manifest"):
        validate({"job": "align", "data": {"manifest": "m", "labels": "l", "val_labels": val_labels}})
