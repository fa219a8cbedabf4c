"""`data.image_aspect`: LLaVA-1.5's pad to a square (`pad`) beside resize + centre crop (`crop`),
one geometry for labels, training, evaluation and export, and the checks that keep labels and
align on the same pixels. Fast: tiny towers, no Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sea_ray.checks import job_problems
from sea_ray.config.loading import to_dict, validate
from sea_ray.config.schema import VisionConfig
from sea_ray.data.images import (
    PAD_RULE,
    RESIZE_RULE,
    PadSquareResizeCenterCrop,
    ResizeCenterCrop,
    image_geometry,
    pad_color,
    pil_to_uint8,
    split_transform,
    to_model_input,
)
from sea_ray.model.vision import build_vision_tower
from sea_ray.presets import _TINY_OPEN_CLIP

CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "configs"
# eight stripes of 16 px across a 128 x 64 photo, none of them near CLIP's mean colour
STRIPES = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255),
           (0, 0, 0)]


def _striped(width: int = 128, height: int = 64) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    step = width // len(STRIPES)
    for i, colour in enumerate(STRIPES):
        arr[:, i * step:(i + 1) * step] = colour
    return Image.fromarray(arr)


def _tower(aspect: str):
    torch.manual_seed(0)
    return build_vision_tower(VisionConfig(**_TINY_OPEN_CLIP), aspect)


def _seen(tower, img) -> np.ndarray:
    """The tensor the tower sees, back in uint8 pixels ``[H, W, 3]``."""
    x = tower.transform(img)
    mean, std = torch.tensor(tower.mean)[:, None, None], torch.tensor(tower.std)[:, None, None]
    return (x * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _has(pixels: np.ndarray, colour, tol: int = 6) -> bool:
    return bool((np.abs(pixels.astype(int) - np.asarray(colour)).max(-1) <= tol).any())


def _align(**data):
    return validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                     "data": {"manifest": "m.json", **data}, "batch": {"global_size": 8, "per_worker": 8}})


# --------------------------------------------------------------------------- the geometry


def test_pad_keeps_the_whole_photo_and_crop_cuts_its_sides():
    photo = _striped()
    pad, crop = _tower("pad"), _tower("crop")
    size = pad.image_size
    assert size == 64
    padded = _seen(pad, photo)
    assert padded.shape == (size, size, 3)
    fill = pad_color(pad.mean)
    assert fill == (122, 116, 104)  # LLaVA's tuple(int(x * 255) for x in image_mean) of CLIP's mean
    # the photo fills rows 16..47 (128 -> 64: halved, centred); every stripe is there, in order
    middle = padded[32]
    for i, colour in enumerate(STRIPES):
        centre = i * 8 + 4
        assert np.abs(middle[centre].astype(int) - colour).max() <= 6, (i, middle[centre], colour)
    # the bands above and below are the mean colour, exactly (bicubic reaches 2 px into them)
    for band in (padded[:14], padded[50:]):
        assert (np.abs(band.astype(int) - fill).max()) <= 1, band.reshape(-1, 3)[:3]
    # crop keeps the middle half: the outer stripes are gone, and there is no band
    cropped = _seen(crop, photo)
    assert not _has(cropped, STRIPES[0]) and not _has(cropped, STRIPES[-1])
    assert _has(cropped, STRIPES[2]) and _has(cropped, STRIPES[5]) and not _has(cropped, fill, tol=1)
    # and a tall photo is padded left and right
    tall = _seen(pad, _striped().transpose(Image.Transpose.ROTATE_90))
    assert np.abs(tall[:, :14].astype(int) - fill).max() <= 1 and np.abs(tall[:, 50:].astype(int) - fill).max() <= 1


def test_pad_equals_crop_on_a_square_image():
    rng = np.random.default_rng(0)
    pad, crop = _tower("pad"), _tower("crop")
    for side in (64, 90, 31):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        assert torch.equal(pad.transform(img), crop.transform(img))


def test_pad_is_llavas_expand2square_then_the_clip_resize():
    """LLaVA's own code, written out: paste centred on a square of the mean colour (odd sizes too)."""
    def expand2square(img, background):
        w, h = img.size
        if w == h:
            return img
        out = Image.new(img.mode, (max(w, h),) * 2, background)
        out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        return out

    rng = np.random.default_rng(1)
    mean = (0.48145466, 0.4578275, 0.40821073)
    geometry = image_geometry("pad", 64, mean)
    assert isinstance(geometry, PadSquareResizeCenterCrop) and geometry.rule == PAD_RULE
    for h, w in [(61, 83), (83, 61), (97, 50), (7, 300), (64, 65)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = pil_to_uint8(geometry(img))
        theirs = pil_to_uint8(ResizeCenterCrop(64)(expand2square(img, pad_color(mean))))
        assert np.array_equal(ours, theirs), (h, w)
    gray = Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8))  # mode L: RGB before padding
    assert pil_to_uint8(geometry(gray)).shape == (64, 64, 3)


def test_the_tower_records_its_rule_and_refuses_unknown_aspects():
    assert _tower("crop").transform_spec()["resize"] == RESIZE_RULE
    assert _tower("pad").transform_spec()["resize"] == PAD_RULE == "pad-mean-square+" + RESIZE_RULE
    pil_part, _ = split_transform(_tower("pad").transform)
    assert isinstance(pil_part, PadSquareResizeCenterCrop)  # the decode tasks get the pure-PIL part
    with pytest.raises(ValueError, match="unknown image_aspect"):
        _tower("letterbox")
    with pytest.raises(ValueError, match="mean colour"):
        image_geometry("pad", 64)


def test_an_extreme_strip_is_refused_before_its_square_is_made():
    pad = image_geometry("pad", 64, (0.5, 0.5, 0.5))
    assert pad.refusal(80, 64, 1_000_000) is None
    reason = pad.refusal(2000, 1, 1_000_000)  # a 2000 x 2000 canvas
    assert reason.startswith("extreme aspect ratio") and "2000x2000" in reason
    assert ResizeCenterCrop(64).refusal(2000, 1, 1_000_000).startswith("extreme aspect ratio")


# --------------------------------------------------------------------------- labels and training alike


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_labels_decode_and_training_preprocess_give_the_towers_tensor():
    import pyarrow as pa

    from sea_ray.labels.pipeline import decode_batch
    from sea_ray.train.data import Preprocess, preprocess_kwargs

    cfg = _align(**{"image_aspect": "pad", "labels": "unused"})
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect)
    photo = _striped()
    expected = tower.transform(photo)
    pil_part, tensor_part = split_transform(tower.transform)
    batch = pa.table({"row": [0], "shard": [0], "image_id": ["a"], "uri": [None],
                      "image_bytes": pa.array([_png(photo)], pa.binary())})
    labels_side = decode_batch(batch, pil_part, tensor_part, 64, max_pixels=1_000_000)
    assert torch.equal(to_model_input(labels_side["image"], tensor_part)[0], expected)
    kwargs = preprocess_kwargs(cfg, tower.image_size)
    assert kwargs["image_aspect"] == "pad" and kwargs["image_mean"] == tuple(tower.mean)
    sample = Preprocess(**kwargs).sample("a", None, _png(photo), [{"from": "human", "value": "<image>"},
                                                                  {"from": "gpt", "value": "stripes"}], None)
    assert torch.equal(to_model_input(sample["image"][None], tensor_part)[0], expected)
    assert preprocess_kwargs(_align(labels="unused"), 64)["image_mean"] is None  # crop needs no mean


def test_the_labels_plan_records_the_rule(tmp_path, world_dir):
    from sea_ray.labels.job import _meta, plan

    def labels(aspect):
        return validate({"job": "labels", "output": str(tmp_path / aspect), "model": {"preset": "tiny-openclip-llama"},
                         "data": {"manifest": str(world_dir / "train" / "pretrain.json"),
                                  "image_root": str(world_dir / "images"), "image_aspect": aspect},
                         "vocab": {"min_count": 1}})

    made = {aspect: plan(labels(aspect)) for aspect in ("crop", "pad")}
    assert made["pad"].fingerprint()["transform"]["resize"] == PAD_RULE
    assert made["crop"].fingerprint()["transform"]["resize"] == RESIZE_RULE
    assert made["pad"].fingerprint() != made["crop"].fingerprint()  # a re-run into the same output is refused
    assert _meta(made["pad"], {})["transform"]["resize"] == PAD_RULE
    assert isinstance(split_transform(made["pad"].transform)[0], PadSquareResizeCenterCrop)


# --------------------------------------------------------------------------- the checks


def _labels_dir(tmp_path, meta: dict) -> str:
    out = tmp_path / "labels"
    out.mkdir(exist_ok=True)
    (out / "_meta.json").write_text(json.dumps(meta))
    return str(out)


def test_labels_made_with_crop_are_refused_by_a_pad_align_config(tmp_path):
    crop_meta = {"grid": [8, 8], "top_n": 10, "transform": {"resize": RESIZE_RULE}}
    labels = _labels_dir(tmp_path, crop_meta)
    assert job_problems(_align(labels=labels)) == []
    problems = job_problems(_align(labels=labels, image_aspect="pad"))
    assert len(problems) == 1, problems
    text = problems[0]
    assert text.startswith("data.image_aspect:") and labels in text
    assert "image_aspect=crop" in text and "image_aspect=pad" in text  # both settings
    assert "re-run the labels job with data.image_aspect=pad" in text and "or set data.image_aspect=crop" in text
    # and the other way round
    labels = _labels_dir(tmp_path, dict(crop_meta, transform={"resize": PAD_RULE}))
    assert job_problems(_align(labels=labels, image_aspect="pad")) == []
    assert "or set data.image_aspect=pad" in " ".join(job_problems(_align(labels=labels)))


def test_labels_from_before_image_aspect_count_as_crop(tmp_path):
    labels = _labels_dir(tmp_path, {"grid": [8, 8], "top_n": 10})  # no transform recorded at all
    assert job_problems(_align(labels=labels)) == []
    assert any("image_aspect=crop" in p for p in job_problems(_align(labels=labels, image_aspect="pad")))
    labels = _labels_dir(tmp_path, {"grid": [8, 8], "top_n": 10, "transform": {"resize": "some-old-rule"}})
    assert any("does not know" in p for p in job_problems(_align(labels=labels)))


def test_training_refuses_labels_of_the_other_aspect_too(tmp_path):
    """The worker's own check (sea_setup), for labels that appear after the pre-flight checks."""
    from sea_ray.train.loop import sea_setup

    labels = _labels_dir(tmp_path, {"grid": [8, 8], "top_n": 10, "transform": _tower("crop").transform_spec(),
                                    "vocab": {"words": ["red"]}})
    model = SimpleNamespace(vision=_tower("pad"))
    with pytest.raises(ValueError, match="image_aspect=crop .* image_aspect=pad"):
        sea_setup(model, _align(labels=labels, image_aspect="pad"), "cpu")


def test_a_pipeline_refuses_labels_and_align_that_disagree(tmp_path, world_dir):
    import yaml

    from sea_ray import pipeline
    from sea_ray.config.loading import load_config
    from sea_ray.errors import ConfigError

    raw = {"job": "pipeline", "output": str(tmp_path / "out"), "steps": ["labels", "align"],
           "data": {"world": str(world_dir)}, "labels": {"recipe": str(CONFIGS / "tiny_labels.yaml")},
           "align": {"recipe": str(CONFIGS / "tiny_align.yaml"), "set": {"data.image_aspect": "pad"}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"align: data\.image_aspect: the labels at .* image_aspect=crop"):
        pipeline.plan(load_config(path), path)
    raw["labels"]["set"] = {"data.image_aspect": "pad"}
    path.write_text(yaml.safe_dump(raw))
    plan = pipeline.plan(load_config(path), path)
    assert plan.step("align").cfg.data.image_aspect == plan.step("labels").cfg.data.image_aspect == "pad"


# --------------------------------------------------------------------------- evaluation and export


def test_a_checkpoint_is_loaded_with_the_aspect_it_was_trained_with(tmp_path):
    from sea_ray.eval.loading import image_aspect_of, load_model
    from sea_ray.train import checkpoint as ckpt

    cfg = validate({"job": "instruct", "model": {"preset": "tiny-openclip-llama"},
                    "data": {"manifest": "m.json", "image_aspect": "pad"},
                    "batch": {"global_size": 8, "per_worker": 8}})
    uri = str(tmp_path / "run" / ckpt.step_dir_name(1))
    ckpt.write_checkpoint(uri, {}, None, {"step": 1}, to_dict(cfg), "instruct")
    model, info = load_model(uri)
    assert model.vision.image_aspect == "pad" and model.vision.transform_spec()["resize"] == PAD_RULE
    older = to_dict(cfg)
    del older["data"]["image_aspect"]  # written before the setting existed
    assert image_aspect_of(older) == "crop" and image_aspect_of({}) == "crop"
