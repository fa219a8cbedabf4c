"""The paper's backbones at their real size, from their published architectures alone: no weights,
no hub, and (on the meta device) no memory.

``sea_ray/assets/configs/`` holds the ``config.json`` architecture hyperparameters of every
backbone the paper's presets name (written from the published values: widths, depths, heads,
key/value heads, vocabulary, rope, tied embeddings). :data:`PUBLISHED` maps the hub id a preset
names to its file and to the parameter count its publisher states, and what that count covers.

- :func:`offline_model` turns a ``model:`` section (a preset's) into one that builds offline: the
  LLM from its shipped config (random init; ``num_hidden_layers`` cuts it to that many decoder
  layers) with a stand-in tokenizer, the tower from its architecture (open_clip's own registry
  for a named open_clip architecture, the shipped config for a Hugging Face one), no weights;
- :func:`build_offline` builds the composed VLM from it, on the meta device by default (the
  shapes and parameter counts of an 8B model in a second);
- :func:`parameter_counts` counts what the published figures count.

The stand-in tokenizer (the synthetic world's, default) only has to give ids below the LLM's
vocabulary size: the shapes, dtypes and memory of a real-size step do not depend on its words.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from sea_ray.config.schema import ModelConfig
from sea_ray.presets import get_preset
from sea_ray.model.vlm import VLM, build_vlm

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "configs")
_UNITS = {"M": 1e6, "B": 1e9}
_NOT_ARCHITECTURE = ("architectures", "torch_dtype", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class Published:
    """A backbone's shipped config and the parameter count its publisher states."""

    file: str    # in CONFIG_DIR
    params: str  # as stated, e.g. "6.74B": its precision is the tolerance (half a unit of the last digit)
    covers: str  # what the figure counts: "llm" (the causal LM, tied weights once) or "image" (the image encoder)
    source: str

    @property
    def value(self) -> float:
        return float(self.params[:-1]) * _UNITS[self.params[-1]]

    @property
    def tolerance(self) -> float:
        """Half a unit of the stated figure's last digit, in parameters."""
        digits = self.params[:-1].partition(".")[2]
        return 0.5 * 10.0 ** -len(digits) * _UNITS[self.params[-1]]

    def config(self) -> dict:
        with open(os.path.join(CONFIG_DIR, self.file)) as f:
            return json.load(f)


PUBLISHED: dict[str, Published] = {
    "lmsys/vicuna-7b-v1.5": Published(
        "vicuna-7b-v1.5.json", "6.74B", "llm", "Llama-2-7B architecture; the Hugging Face model size of "
        "lmsys/vicuna-7b-v1.5 and meta-llama/Llama-2-7b-hf (6.74B params)"),
    "google/gemma-2b-it": Published(
        "gemma-2b-it.json", "2.51B", "llm", "google/gemma-2b-it model size (2.51B params; the Gemma report's "
        "2B: 0.52B embedding + 1.98B non-embedding parameters, with a 256,128-row table)"),
    "microsoft/Phi-3-mini-4k-instruct": Published(
        "Phi-3-mini-4k-instruct.json", "3.82B", "llm", "microsoft/Phi-3-mini-4k-instruct model size (3.82B "
        "params; the Phi-3 report: 3.8B)"),
    "meta-llama/Meta-Llama-3-8B-Instruct": Published(
        "Meta-Llama-3-8B-Instruct.json", "8.03B", "llm", "meta-llama/Meta-Llama-3-8B-Instruct model size (8.03B "
        "params)"),
    "openai/clip-vit-large-patch14-336": Published(
        "clip-vit-large-patch14-336.json", "304.29M", "image", "open_clip's model profile, ViT-L-14-336: image "
        "304.29M (with the 1024 -> 768 projection), text 123.65M"),
    "google/siglip-so400m-patch14-384": Published(
        "siglip-so400m-patch14-384.json", "428M", "image", "SigLIP so400m/14 at 384 px: the ~400M "
        "shape-optimised ViT, 428M with its attention-pooling head"),
}

# The hub id of the architecture an open_clip registry name builds (the presets name open_clip archs).
OPEN_CLIP_ARCHS = {"ViT-L-14-336": "openai/clip-vit-large-patch14-336"}


def published(hub_id: str) -> Published:
    """The entry of ``hub_id``; the error names every shipped architecture."""
    if hub_id not in PUBLISHED:
        raise KeyError(f"no published architecture shipped for {hub_id!r}; shipped: {', '.join(sorted(PUBLISHED))}")
    return PUBLISHED[hub_id]


def llm_config(hub_id: str, num_hidden_layers: Optional[int] = None) -> dict:
    """The shipped LLM config of ``hub_id`` as an ``llm.config`` dict (``model_type`` and the
    architecture, not the file's bookkeeping), cut to ``num_hidden_layers`` when given."""
    config = {k: v for k, v in published(hub_id).config().items() if k not in _NOT_ARCHITECTURE}
    if num_hidden_layers is not None:
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        config["num_hidden_layers"] = int(num_hidden_layers)
    return config


def vision_section(vision: dict) -> dict:
    """A ``model.vision`` section that builds offline: no weights; a Hugging Face hub id becomes
    ``name: custom`` with the shipped config (its ``model_type`` first)."""
    out = dict(vision, weights=None)
    if out.get("backend", "open_clip") == "hf" and out.get("name") != "custom":
        config = {k: v for k, v in published(out["name"]).config().items() if k not in _NOT_ARCHITECTURE}
        out.update(name="custom", custom=config)
    return out


def offline_model(model: "dict | str", num_hidden_layers: Optional[int] = None, tokenizer: str = "world",
                  dtype: Optional[str] = None) -> dict:
    """A complete ``model:`` section (a preset name or a section) that builds without the network:
    see the module docstring. ``dtype``: the LLM's weights dtype (default: the section's)."""
    section = get_preset(model) if isinstance(model, str) else copy.deepcopy(model)
    section.pop("preset", None)
    llm = dict(section.get("llm") or {})
    if llm.get("config") is None:
        llm["config"] = llm_config(llm.pop("name_or_path", None), num_hidden_layers)
    elif num_hidden_layers is not None:
        llm["config"] = dict(llm["config"], num_hidden_layers=int(num_hidden_layers))
    llm.update(name_or_path=None, tokenizer=tokenizer)
    if dtype is not None:
        llm["dtype"] = dtype
    section.update(llm=llm, vision=vision_section(section.get("vision") or {}))
    return section


def build_offline(model: "dict | str", device: "str | torch.device" = "meta", num_hidden_layers: Optional[int] = None,
                  image_aspect: str = "crop", tokenizer: str = "world", dtype: Optional[str] = None) -> VLM:
    """The composed VLM of ``model`` (a preset name or section) from its architecture alone, its
    tensors on ``device`` (``meta``: shapes only). Random init elsewhere."""
    cfg = ModelConfig.model_validate(offline_model(model, num_hidden_layers, tokenizer, dtype))
    with torch.device(device):
        return build_vlm(cfg, image_aspect)


def _count(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def parameter_counts(vlm: VLM) -> dict[str, int]:
    """Parameters by part: ``image`` (the tower's image encoder, its joint-space projection
    included), ``text`` (the paired text tower the labeler uses), ``adapter``, ``llm`` (tied
    weights once) and ``llm_embeddings`` (its input table, part of ``llm``)."""
    image = vlm.vision.image_modules()
    tower = _count([vlm.vision])
    return {"image": _count(image), "text": tower - _count(image), "adapter": _count([vlm.adapter]),
            "llm": _count([vlm.llm]), "llm_embeddings": vlm.llm.get_input_embeddings().weight.numel()}
