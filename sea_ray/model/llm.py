"""The language model: any Hugging Face causal LM through the Auto classes, and its tokenizer.

Weights come from a local dir, an ``s3://`` URI (downloaded once into the cache) or a hub id
(online only). ``config:`` builds a random-init model of a real architecture (tests, the
synthetic world). The tokenizer spec ``world`` is the synthetic world's byte-level BPE, shipped
with the world LLM (``sea_ray/assets/world/llm``, made by :func:`sea_ray.world.backbones.world_tokenizer`),
so tiny models run offline with a real tokenizer that keeps every world word whole.
"""

from __future__ import annotations

import logging
import os

import torch

from sea_ray import storage
from sea_ray.presets import WORLD_ASSETS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE (GPT-2 style, leading-space marker) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|unk|>")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    if spec == "world":
        spec = os.path.join(WORLD_ASSETS, "llm")

    local = storage.local_copy(spec) if storage.is_remote(spec) else spec
    tok = AutoTokenizer.from_pretrained(local)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def build_llm(cfg):
    """(model, tokenizer) from a :class:`sea_ray.config.schema.LLMConfig`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path)
    if cfg.config is not None:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = AutoConfig.for_model(model_type, **kwargs)
        config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    else:
        local = storage.local_copy(cfg.name_or_path) if storage.is_remote(cfg.name_or_path) else cfg.name_or_path
        model = AutoModelForCausalLM.from_pretrained(local, dtype=DTYPES[cfg.dtype],
                                                     attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM's embedding table has "
                         f"{model.get_input_embeddings().num_embeddings} rows")
    return model, tokenizer
