"""The paper's combinations at their real size, from configs alone: every paper preset and every
``workflows/configs/llava15_*`` recipe builds on the meta device with its publishers' parameter
counts; ``bench/real_size.py --dry-run`` runs its three stages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from sea_ray.config.loading import load_config
from sea_ray.model.published import (OPEN_CLIP_ARCHS, PUBLISHED, Published, build_offline, llm_config,
                                     parameter_counts, published)
from sea_ray.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
# every preset whose LLM is a hub model: the paper's combinations (CLIP ViT-L/14-336 with Vicuna-7B,
# Gemma-2B, Phi-3-mini, Llama-3-8B; SigLIP-SO400M/14-384 with Vicuna-7B)
PAPER = sorted(name for name, p in PRESETS.items() if p["llm"].get("name_or_path", "").count("/") == 1)
RECIPES = sorted(p for p in (REPO / "workflows" / "configs").glob("llava15_*.yaml")
                 if "model" in (yaml.safe_load(p.read_text()) or {}))  # the jobs that build a model


def _ids(model: dict) -> tuple[str, str]:
    """(the hub id of the tower's architecture, the LLM's hub id) of a model section."""
    vision = model["vision"]
    return OPEN_CLIP_ARCHS.get(vision["name"], vision["name"]), model["llm"]["name_or_path"]


def test_the_paper_combinations_are_presets():
    assert PAPER == ["clip-l336-gemma2b", "clip-l336-llama3-8b", "clip-l336-phi3mini", "clip-l336-vicuna7b",
                     "siglip-so400m384-vicuna7b"]


def test_a_published_figure_is_as_precise_as_it_is_stated():
    figure = Published("x.json", "6.74B", "llm", "")
    assert figure.value == pytest.approx(6.74e9) and figure.tolerance == pytest.approx(0.005e9)
    assert Published("x.json", "428M", "image", "").tolerance == pytest.approx(0.5e6)
    with pytest.raises(KeyError, match="shipped: google/gemma-2b-it"):
        published("lmsys/vicuna-13b-v1.5")


@pytest.mark.parametrize("preset", PAPER)
def test_each_combination_builds_on_meta_with_the_published_sizes(preset):
    vision_id, llm_id = _ids(PRESETS[preset])
    vlm = build_offline(preset)
    assert {p.device.type for p in vlm.parameters()} == {"meta"}
    counts = parameter_counts(vlm)
    for part, hub_id in (("llm", llm_id), ("image", vision_id)):
        figure = published(hub_id)
        assert figure.covers == part
        assert abs(counts[part] - figure.value) <= figure.tolerance, \
            f"{preset}: {part} has {counts[part]:,} parameters, {hub_id} is published at {figure.params}"
    # LLaVA-1.5's projector: Linear(tower width, LLM width), GELU, Linear(LLM width, LLM width)
    v, d = vlm.vision.width, vlm.llm_width
    assert counts["adapter"] == (v * d + d) + (d * d + d)
    assert vlm.llm.config.num_hidden_layers == llm_config(llm_id)["num_hidden_layers"]


def test_the_llm_cut_to_two_layers_keeps_its_width():
    full, cut = build_offline("clip-l336-llama3-8b"), build_offline("clip-l336-llama3-8b", num_hidden_layers=2)
    assert len(cut.llm.model.layers) == 2 and cut.llm_width == full.llm_width == 4096
    per_layer = sum(p.numel() for p in full.llm.model.layers[0].parameters())
    assert parameter_counts(full)["llm"] - parameter_counts(cut)["llm"] == 30 * per_layer
    assert cut.llm.get_input_embeddings().weight.shape == (128256, 4096)
    with pytest.raises(ValueError, match="num_hidden_layers must be >= 1"):
        llm_config("lmsys/vicuna-7b-v1.5", 0)


def test_clip_l336_two_routes_give_the_same_image_encoder():
    """open_clip's registry architecture (what the presets build) and the shipped Hugging Face
    config of openai/clip-vit-large-patch14-336 are the same image encoder."""
    hf = {"backend": "hf", "name": "custom",
          "custom": {k: v for k, v in published("openai/clip-vit-large-patch14-336").config().items()
                     if k != "architectures"}}
    section = dict(PRESETS["clip-l336-vicuna7b"], vision=hf)
    hf_vlm, oc_vlm = build_offline(section), build_offline("clip-l336-vicuna7b")
    assert (hf_vlm.vision.backend, oc_vlm.vision.backend) == ("hf", "open_clip")
    assert parameter_counts(hf_vlm)["image"] == parameter_counts(oc_vlm)["image"]
    assert hf_vlm.vision.grid == oc_vlm.vision.grid == (24, 24)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_llava15_recipe_builds_from_configs_alone(path):
    cfg = load_config(str(path))
    model = cfg.model.model_dump()
    vlm = build_offline(model, image_aspect=cfg.data.image_aspect)
    llm_id = model["llm"]["name_or_path"]
    assert abs(parameter_counts(vlm)["llm"] - published(llm_id).value) <= published(llm_id).tolerance
    assert vlm.llm.dtype == {"bfloat16": torch.bfloat16, "float32": torch.float32}[model["llm"]["dtype"]]
    assert vlm.vision.grid == (24, 24) and vlm.vision.image_aspect == cfg.data.image_aspect


def test_every_shipped_config_is_used_and_every_named_hub_id_has_one():
    named = {i for p in PAPER for i in _ids(PRESETS[p])}
    assert named == set(PUBLISHED)
    files = {p.name for p in (REPO / "sea_ray" / "assets" / "configs").glob("*.json")}
    assert files == {entry.file for entry in PUBLISHED.values()}


@pytest.mark.slow
def test_bench_real_size_dry_run_runs_its_three_stages(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_real_size", REPO / "bench" / "real_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--dry-run", "--workdir", str(tmp_path)])
    assert [(r["stage"], r.get("error"), r.get("skipped")) for r in results] == \
        [("labels", None, None), ("align", None, None), ("instruct", None, None)]
    labels, align, instruct = results
    assert labels["images"] == 16 and labels["grid"] == [8, 8]
    assert len(align["step_s"]) == len(instruct["step_s"]) == 2 and align["loss_sea"]
    assert all(r["flops"] > 0 and r["peak_rss_gb"] > 0 for r in results)
    assert all(len(r["tokens"]) == 2 for r in (align, instruct))
    # FLOPs: instruct trains the LLM (3x its forward), align only backpropagates through it
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-5].startswith("| combination | stage |") and len(table[-3:]) == 3
