"""Vision towers: open_clip and Hugging Face (CLIP / SigLIP) behind one interface.

A tower gives
- ``patch_tokens(images)``: the visual tokens the adapter sees, [B, P, width], from hidden
  state ``select_layer`` (LLaVA: -2), class token dropped;
- ``joint_patch_features(images, dense=False)``: per-patch features in CLIP's joint
  image-text space, [B, P, embed_dim] (final layer -> ln_post -> projection). ``dense=True`` is
  the MaskCLIP-style variant: the last block's attention is replaced by its value path
  (value -> out_proj, no residual, no MLP), which keeps patch features local;
- ``encode_text(texts)``: the paired text tower, [N, embed_dim] (labeling only);
- ``transform``: the tower's own PIL -> tensor transform under its ``image_aspect`` (``crop`` |
  ``pad``, the config's ``data.image_aspect``: :func:`sea_ray.data.images.image_geometry`), and
  ``grid`` = (rows, cols).

Hidden-state indexing follows Hugging Face: index 0 is the embedding output, index i the
output of block i, so -1 is the last block and -2 the penultimate one.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from sea_ray import storage
from sea_ray.data.images import ASPECT_RULES, eval_transform

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def layer_index(layer: int, num_layers: int) -> int:
    """The hidden state ``select_layer = layer`` names in a tower of ``num_layers`` blocks, as an
    index in 0 (the embeddings) .. ``num_layers`` (the last block); negative counts from the end
    (-1 = the last block, ``-(num_layers + 1)`` = the embeddings). Anything else raises
    ``ValueError``. The one rule for both backends and for the pre-flight check."""
    idx = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= idx <= num_layers:
        raise ValueError(f"select_layer {layer} is out of range for a {num_layers}-block tower (valid: "
                         f"{-(num_layers + 1)} .. {num_layers}; -1 = the last block, -2 = the penultimate)")
    return idx


class VisionTower(nn.Module):
    """Common interface; subclasses fill in the backend."""

    backend: str
    image_size: int
    patch_size: int
    width: int
    embed_dim: int
    has_cls: bool = True

    def __init__(self, select_layer: int = -2, *, image_aspect: str):
        super().__init__()
        if image_aspect not in ASPECT_RULES:
            raise ValueError(f"unknown image_aspect {image_aspect!r}; valid: {', '.join(ASPECT_RULES)}")
        self.select_layer = select_layer
        self.image_aspect = image_aspect

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def transform_spec(self) -> dict:
        """What labels record and training checks: the exact tensor both stages see."""
        return {"image_size": self.image_size, "patch_size": self.patch_size, "grid": list(self.grid),
                "mean": [round(m, 6) for m in self.mean], "std": [round(s, 6) for s in self.std],
                "resize": ASPECT_RULES[self.image_aspect]}

    @property
    def transform(self):
        if getattr(self, "_transform", None) is None:
            self._transform = eval_transform(self.image_size, self.mean, self.std, self.image_aspect)
        return self._transform

    def _strip_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:] if self.has_cls else x

    def image_modules(self) -> list[nn.Module]:
        """The modules of the image encoder (its joint-space projection included), not the
        paired text tower: what a published vision-tower size counts."""
        raise NotImplementedError


# --------------------------------------------------------------------------- open_clip


class OpenClipTower(VisionTower):
    backend = "open_clip"

    def __init__(self, clip_model, select_layer: int = -2, name: str = "custom", *, image_aspect: str):
        super().__init__(select_layer, image_aspect=image_aspect)
        self.clip = clip_model
        visual = clip_model.visual
        if not hasattr(visual, "transformer"):
            raise ValueError(f"open_clip model {name!r} has no ViT visual transformer (timm/ResNet towers are not "
                             "supported: SEA needs patch tokens)")
        self.name = name
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        ps = visual.patch_size
        self.patch_size = ps[0] if isinstance(ps, (tuple, list)) else int(ps)
        self.width = visual.transformer.width
        self.embed_dim = visual.output_dim
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))
        self.num_layers = len(visual.transformer.resblocks)
        self._tokenizer = None

    def image_modules(self) -> list[nn.Module]:
        return [self.clip.visual]

    def _hidden_states(self, images: torch.Tensor, upto: int) -> list[torch.Tensor]:
        visual = self.clip.visual
        x = visual._embeds(images)
        states = [x]
        for block in visual.transformer.resblocks[:upto]:
            x = block(x)
            states.append(x)
        return states

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        idx = layer_index(self.select_layer, self.num_layers)
        return self._strip_prefix(self._hidden_states(images, idx)[idx])

    def joint_patch_features(self, images: torch.Tensor, dense: bool = False) -> torch.Tensor:
        visual = self.clip.visual
        if not dense:
            x = self._hidden_states(images, self.num_layers)[-1]
        else:
            x = self._hidden_states(images, self.num_layers - 1)[-1]
            last = visual.transformer.resblocks[-1]
            attn = last.attn
            h = last.ln_1(x)
            width = h.shape[-1]
            v = nn.functional.linear(h, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:]
                                     if attn.in_proj_bias is not None else None)
            x = attn.out_proj(v)
        x = visual.ln_post(self._strip_prefix(x))
        return x @ visual.proj if visual.proj is not None else x

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        import open_clip

        if self._tokenizer is None:
            context = self.clip.context_length if hasattr(self.clip, "context_length") else 77
            self._tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context) \
                if self.name == "custom" else open_clip.get_tokenizer(self.name)
        device = next(self.parameters()).device
        return self.clip.encode_text(self._tokenizer(texts).to(device))


def _open_clip_weights_path(weights: str) -> str:
    """A local file for open_clip's ``pretrained=`` from a file, a dir or an s3:// URI."""
    local = storage.local_copy(weights)
    if os.path.isdir(local):
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                     "pytorch_model.bin"):
            if os.path.exists(os.path.join(local, name)):
                return os.path.join(local, name)
        raise FileNotFoundError(f"no open_clip weights file in {weights}")
    return local


def build_open_clip(name: str, weights: str | None, custom: dict | None, select_layer: int,
                    image_aspect: str) -> OpenClipTower:
    import open_clip

    if name == "custom":
        custom = dict(custom or {})
        model = open_clip.CLIP(embed_dim=custom["embed_dim"],
                               vision_cfg=open_clip.CLIPVisionCfg(**custom["vision_cfg"]),
                               text_cfg=open_clip.CLIPTextCfg(**custom["text_cfg"]))
        if weights:
            open_clip.load_checkpoint(model, _open_clip_weights_path(weights))
    else:  # create_model moves the model to its `device` (cpu unless told): the ambient default, so
        # that a build under `with torch.device("meta")` stays there (sea_ray.model.published)
        device = torch.get_default_device()
        if weights is None:
            model = open_clip.create_model(name, pretrained=None, device=device)
        elif storage.is_remote(weights) or os.path.exists(weights):
            model = open_clip.create_model(name, pretrained=_open_clip_weights_path(weights), device=device)
        else:  # a pretrained tag or hub name: needs the network
            model = open_clip.create_model(name, pretrained=weights, device=device)
    model.eval()
    return OpenClipTower(model, select_layer=select_layer, name=name, image_aspect=image_aspect)


# --------------------------------------------------------------------------- Hugging Face


class HFTower(VisionTower):
    backend = "hf"

    def __init__(self, model, select_layer: int = -2, name: str = "custom", image_processor=None, *,
                 image_aspect: str):
        super().__init__(select_layer, image_aspect=image_aspect)
        self.name = name
        self.model = model  # CLIPModel / SiglipModel (with text tower) or a *VisionModel
        vcfg = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
        self.vision_model = getattr(model, "vision_model", model)  # a *VisionModel is its own (transformers 5)
        self.image_size = vcfg.image_size
        self.patch_size = vcfg.patch_size
        self.width = vcfg.hidden_size
        self.model_type = model.config.model_type
        self.has_cls = not self.model_type.startswith("siglip")
        proj = getattr(model, "visual_projection", None)
        self.embed_dim = proj.out_features if proj is not None else self.width
        mean, std = CLIP_MEAN, CLIP_STD
        if image_processor is not None:
            mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        elif self.model_type.startswith("siglip"):
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.mean, self.std = mean, std
        self.num_layers = vcfg.num_hidden_layers
        self._tokenizer = None

    def image_modules(self) -> list[nn.Module]:
        proj = getattr(self.model, "visual_projection", None)
        return [self.vision_model] + ([proj] if proj is not None else [])

    def _states(self, images: torch.Tensor):
        out = self.vision_model(pixel_values=images, output_hidden_states=True)
        return out

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        states = self._states(images).hidden_states
        return self._strip_prefix(states[layer_index(self.select_layer, self.num_layers)])

    def joint_patch_features(self, images: torch.Tensor, dense: bool = False) -> torch.Tensor:
        vm = self.vision_model
        out = self._states(images)
        if not dense:
            x = out.last_hidden_state
        else:
            layer = vm.encoder.layers[-1]
            h = layer.layer_norm1(out.hidden_states[-2])
            x = layer.self_attn.out_proj(layer.self_attn.v_proj(h))
        x = self._strip_prefix(x)
        post = getattr(vm, "post_layernorm", None)
        if post is not None:
            x = post(x)
        proj = getattr(self.model, "visual_projection", None)
        return proj(x) if proj is not None else x

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if not hasattr(self.model, "get_text_features"):
            raise ValueError(f"{self.name} has no text tower: load a CLIPModel/SiglipModel dir for labeling")
        if self._tokenizer is None:
            raise ValueError("this tower was built without a tokenizer (a random-init tower); load one from a dir")
        device = next(self.parameters()).device
        batch = self._tokenizer(texts, padding="max_length" if self.model_type.startswith("siglip") else True,
                                truncation=True, return_tensors="pt").to(device)
        feats = self.model.get_text_features(**batch)
        return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


def build_hf(name: str, custom: dict | None, select_layer: int, image_aspect: str, *,
             weights: bool = True) -> HFTower:
    """``weights=False``: the folder's architecture on the ambient device, its weights not read
    (:func:`probe_vision_tower`)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    if name == "custom":
        custom = dict(custom or {})
        model_type = custom.pop("model_type", "clip")
        config = AutoConfig.for_model(model_type, **custom)
        model = AutoModel.from_config(config)
        tower = HFTower(model.eval(), select_layer=select_layer, name=name, image_aspect=image_aspect)
        return tower
    local = storage.local_copy(name) if storage.is_remote(name) else name
    model = AutoModel.from_pretrained(local) if weights else AutoModel.from_config(AutoConfig.from_pretrained(local))
    processor = None
    try:
        loaded = AutoProcessor.from_pretrained(local)
        # a CLIPProcessor holds the image processor; a dir with no tokenizer gives the image processor itself
        processor = getattr(loaded, "image_processor", loaded)
        if not hasattr(processor, "image_mean"):
            raise ValueError(f"{type(loaded).__name__} has no image mean")
    except Exception as exc:  # a dir may ship no processor: CLIP defaults then (SigLIP's for a SigLIP)
        processor = None
        log.info("no image processor in %s (%s); using the default mean and std", name, type(exc).__name__)
    tower = HFTower(model.eval(), select_layer=select_layer, name=name, image_processor=processor,
                    image_aspect=image_aspect)
    tower._tokenizer = text_tokenizer(local)
    if tower._tokenizer is None:
        log.info("no tokenizer in %s: labeling with this tower is unavailable", name)
    return tower


def text_tokenizer(folder: str):
    """The tokenizer of the text tower saved in the Hugging Face folder ``folder``, or None when the
    folder holds none. A tokenizer that knows only its special tokens counts as none: transformers 5
    builds such an empty one from a CLIP folder without tokenizer files, and with it every word
    would embed as the same unknown token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        log.debug("no tokenizer loads from %s (%s: %s)", folder, type(exc).__name__, exc)
        return None
    if set(tokenizer.get_vocab().values()) <= set(tokenizer.all_special_ids):
        return None
    return tokenizer


def build_vision_tower(cfg, image_aspect: str) -> VisionTower:
    """``cfg``: a :class:`sea_ray.config.schema.VisionConfig`; ``image_aspect``: the job's
    ``data.image_aspect`` (how the tower's ``transform`` fits an image to its square)."""
    if cfg.backend == "open_clip":
        return build_open_clip(cfg.name, cfg.weights, cfg.custom, cfg.select_layer, image_aspect)
    return build_hf(cfg.name, cfg.custom, cfg.select_layer, image_aspect)


def probe_vision_tower(cfg, image_aspect: str) -> VisionTower:
    """The tower of :func:`build_vision_tower` on the meta device, its weights never read: its
    ``grid``, ``transform``, ``embed_dim`` and (Hugging Face) tokenizer are those of the real build,
    at no memory and in milliseconds rather than seconds (a driver planning labels for CLIP-L would
    otherwise read 1.7 GB). A weights file is not checked here: the first process that loads the
    tower fails on a bad one. An open_clip pretrained tag is built whole, since its transform comes
    with the tag."""
    weights = cfg.weights if cfg.backend == "open_clip" else None
    if weights is not None and not (storage.is_remote(weights) or os.path.exists(weights)):
        return build_vision_tower(cfg, image_aspect)
    with torch.device("meta"):
        if cfg.backend == "open_clip":  # a local or s3:// weights file holds weights only
            return build_open_clip(cfg.name, None, cfg.custom, cfg.select_layer, image_aspect)
        return build_hf(cfg.name, cfg.custom, cfg.select_layer, image_aspect, weights=False)
