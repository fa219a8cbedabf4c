"""A trained checkpoint back as a model: the VLM it was trained with, its trained tensors loaded."""

from __future__ import annotations

import json
from typing import Optional

import torch

from sea_ray import storage
from sea_ray.config.schema import ModelConfig, TrainDataConfig
from sea_ray.errors import DataError
from sea_ray.model.vlm import build_vlm


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def image_aspect_of(config: dict) -> str:
    """``data.image_aspect`` of a stage's resolved config (``config.json`` of a checkpoint): the
    geometry the model was trained to see. A checkpoint written before the field existed was
    trained with the schema's default."""
    return (config.get("data") or {}).get("image_aspect", TrainDataConfig.model_fields["image_aspect"].default)


def load_model(checkpoint: str, model_cfg: Optional[ModelConfig] = None, device: str | torch.device = "cpu",
               keep_base_llm: bool = False, keep_base: bool = False):
    """``(model, info)``: the VLM of a checkpoint with its trained tensors loaded.

    ``info``: ``{"checkpoint", "stage", "step", "config", "base_llm_state", "base_state"}`` where
    ``base_llm_state`` (with ``keep_base_llm``) is the LLM's state before the checkpoint replaced
    it (None when the checkpoint holds no LLM tensors), and ``base_state`` (with ``keep_base``)
    the model's value of every tensor the checkpoint replaced, before it did: the weights the
    checkpoint's training started from (built with its seed, as training builds them; None without
    ``keep_base``). The tower sees images as the stage did (:func:`image_aspect_of` the
    checkpoint's config), whatever ``model_cfg`` says. A LoRA checkpoint (``model.llm.lora``) loads
    into the LoRA model it was trained as (a QLoRA one on its base unquantized: :func:`sea_ray.model.llm.build_llm`)."""
    from sea_ray.train import checkpoint as ckpt

    try:
        uri = ckpt.resolve(checkpoint)
    except FileNotFoundError as exc:
        raise DataError(f"no checkpoint to load: {exc}") from None
    config = json.loads(storage.read_text(storage.join(uri, ckpt.CONFIG_FILE)))
    meta = json.loads(storage.read_text(storage.join(uri, ckpt.META_FILE)))
    if model_cfg is None:
        model_cfg = ModelConfig.model_validate(config["model"])
    torch.manual_seed(int(config.get("run", {}).get("seed", 0)))  # random-init parts as in training
    model = build_vlm(model_cfg, image_aspect_of(config))
    # an align checkpoint also holds the SEA loss's temperature (``sea_head.``), which is not the model's
    state = {k: v for k, v in ckpt.load_model_state(uri).items() if not k.startswith("sea_head.")}
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"checkpoint {uri} holds tensors this model does not have: {unknown[:5]} (model config "
                         "differs from the one it was trained with?)")
    base_llm = None
    if keep_base_llm and any(k.startswith("llm.") for k in state):
        base_llm = {k: v.detach().clone() for k, v in model.llm.state_dict().items()}
    base = None
    if keep_base:  # the LLM's tensors shared with base_llm when both are kept
        shared = base_llm or {}
        base = {k: shared[k[len("llm."):]] if k.startswith("llm.") and k[len("llm."):] in shared
                else own[k].detach().clone() for k in state}
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    return model, {"checkpoint": uri, "stage": meta.get("stage", config.get("job")), "step": meta.get("step"),
                   "config": config, "base_llm_state": base_llm, "base_state": base}
