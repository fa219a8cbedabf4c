"""The synthetic world's backbones: the recipe re-run at reduced size, the shipped weights
(inside the package, small, safetensors only, matching the presets), and their patch labels
well above chance on held-out images."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from sea_ray.presets import PRESETS, WORLD_ASSETS, WORLD_CLIP_ARCH, WORLD_LLM_CONFIG

REPO = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("backbones_recipe", REPO / "workflows" / "backbones.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reruns_at_reduced_size(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sea_ray.config.schema import VisionConfig
    from sea_ray.world.generator import world_words
    from sea_ray.model.vision import build_vision_tower

    out = tmp_path / "bb"
    assert _recipe().main(["--out", str(out), "--clip-num-images", "64", "--clip-epochs", "1", "--clip-batch", "32",
                           "--llm-num-images", "24", "--llm-epochs", "1", "--llm-batch", "16", "--audit-images", "8",
                           "--threads", "1"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["clip"]["train"]["steps"] == 2 and recipe["llm"]["train"]["epochs"] == 1
    assert {r["features"] for r in recipe["audit"]["results"]} == {"joint", "dense"}
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"clip/open_clip_model.safetensors", "clip/config.json", "clip/audit.json", "llm/model.safetensors",
            "llm/config.json", "llm/tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    tower = build_vision_tower(VisionConfig(name="custom", custom=WORLD_CLIP_ARCH,
                                            weights=str(out / "clip" / "open_clip_model.safetensors")), "crop")
    assert tower.grid == (8, 8)
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    tok = AutoTokenizer.from_pretrained(out / "llm")
    assert llm.config.vocab_size == len(tok) and llm.config.hidden_size == WORLD_LLM_CONFIG["hidden_size"]
    for word in world_words():  # every world word is one token as it appears mid-sentence
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    # another depth (the study's 2- and 8-layer Llamas) goes to llm-<L>l/, beside the 4-layer llm/
    assert _recipe().main(["--out", str(out), "--skip", "clip", "--llm-layers", "2", "--llm-num-images", "24",
                           "--llm-epochs", "1", "--llm-batch", "16", "--threads", "1"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out / "llm-2l").config.num_hidden_layers == 2
    assert AutoModelForCausalLM.from_pretrained(out / "llm").config.num_hidden_layers == 4  # left as it was


def test_shipped_weights_are_small_safetensors_inside_the_package():
    import sea_ray

    package = Path(sea_ray.__file__).resolve().parent
    assets = Path(WORLD_ASSETS)
    assert assets.is_dir() and package in assets.parents
    files = [p for p in assets.rglob("*") if p.is_file()]
    # the CLIP (7.3 MB, float16) and the world Llamas of 4, 2 and 8 layers (4.0, 2.4 and 7.3 MB, float32)
    assert sum(p.stat().st_size for p in files) <= 24 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    spec = PRESETS["world-clip-llama"]
    assert os.path.isfile(spec["vision"]["weights"]) and spec["vision"]["weights"].endswith(".safetensors")
    assert os.path.isfile(os.path.join(spec["llm"]["name_or_path"], "model.safetensors"))
    clip_cfg = json.loads((assets / "clip" / "config.json").read_text())
    assert clip_cfg["arch"] == WORLD_CLIP_ARCH == spec["vision"]["custom"]
    llm_cfg = json.loads((assets / "llm" / "config.json").read_text())
    assert all(llm_cfg[k] == v for k, v in WORLD_LLM_CONFIG.items())


def test_shipped_tokenizer_is_the_world_tokenizer():
    from transformers import AutoTokenizer

    from sea_ray.world.backbones import world_tokenizer

    shipped = AutoTokenizer.from_pretrained(os.path.join(WORLD_ASSETS, "llm"))
    assert shipped.get_vocab() == world_tokenizer().get_vocab()
    assert (shipped.pad_token, shipped.eos_token) == ("<|pad|>", "<|eos|>")


def test_shipped_clip_labels_patches_well_above_chance(tmp_path):
    """The audit on held-out images of a world seed neither the CLIP nor the quickstart saw."""
    from sea_ray.world.backbones import audit_world_clip
    from sea_ray.world.generator import generate_world

    world = tmp_path / "heldout"
    generate_world(world, num_images=40, seed=11, image_size=64, splits=(0, 0, 1))
    report = audit_world_clip(os.path.join(WORLD_ASSETS, "clip"), str(world), limit=None)
    best = {(r["features"], r["score_sign"]): r["precision_at_1"] for r in report["results"]}
    chance = report["chance_precision_at_1"]
    assert best[("dense", "raw")] >= 0.4 and best[("dense", "raw")] >= 8 * chance
    assert best[("dense", "raw")] > report["one_word_precision_at_1"]
    assert best[("joint", "raw")] >= 4 * chance


def test_clip_pairs_crops_name_what_they_show():
    from sea_ray.world.backbones import clip_pairs, render_images, world_records

    records = world_records(3, 40)
    images = render_images(records)
    same, captions = clip_pairs(records, images, 0.0, 3, 0)
    assert captions == [r["caption"] for r in records] and np.array_equal(same, images)
    out, captions = clip_pairs(records, images, 1.0, 3, 0, crop_captions="words", background_share=0.5)
    kinds = {"scene": 0, "background": 0, "object": 0}
    for rec, caption, img in zip(records, captions, out):
        assert caption.startswith("a photo of a ") and caption.endswith(".")
        named = caption[len("a photo of a "):-1].split()
        if named == [rec["background"]]:
            kinds["background"] += 1
            # background only: no pixel of any object colour
            from sea_ray.world.generator import COLOR_RGB

            for rgb in COLOR_RGB.values():
                assert not (np.abs(img.astype(int) - rgb).sum(-1) < 30).any()
        else:
            kinds["object"] += 1
            assert any(set(named) <= {o["color"], o["shape"]} for o in rec["objects"]), caption
    assert kinds["background"] > 5 and kinds["object"] > 5


def test_world_texts_use_the_training_formats():
    from sea_ray.world.backbones import world_records, world_texts
    from sea_ray.data.templates import LLAVA_V1_SYSTEM

    records = world_records(2, 10)
    texts = world_texts(records, 2, eos="<|eos|>")
    assert texts[0] == records[0]["caption"] + "<|eos|>"
    assert texts[1].startswith(LLAVA_V1_SYSTEM + " USER: ") and " ASSISTANT: " in texts[1]
    assert texts[1].endswith("<|eos|>") and "<image>" not in "".join(texts)
    assert len(texts) == 2 * len(records) + 1  # + the text-only facts


def test_a_wheel_ships_every_asset():
    """pyproject's package-data globs cover every shipped backbone file (a non-editable install,
    e.g. a cluster image, needs them for the world presets)."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sea_ray.assets"]
    root = REPO / "sea_ray" / "assets"
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in globs)] == []
