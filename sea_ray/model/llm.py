"""The language model: any Hugging Face causal LM through the Auto classes, and its tokenizer.

Weights come from a local dir, an ``s3://`` URI (downloaded once into the cache) or a hub id
(online only). ``config:`` builds a random-init model of a real architecture (tests, the
synthetic world); the folder of the preset ``world-clip-smollm2`` is converted on first use
(:mod:`sea_ray.model.smollm2`). The tokenizer spec ``world`` is the synthetic world's byte-level BPE, shipped
with the world LLM (``sea_ray/assets/world/llm``, made by :func:`sea_ray.world.backbones.world_tokenizer`),
so tiny models run offline with a real tokenizer that keeps every world word whole.

``model.llm.lora`` wraps the LLM in PEFT's LoRA model (``get_peft_model``: the base frozen, LoRA
weights on the target modules); QLoRA loads the base in 4 bits first (bitsandbytes, GPUs only).
The VLM merges the LoRA weights back into a plain LLM for export (:meth:`sea_ray.model.vlm.VLM.merge_lora`).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from typing import Optional

import torch

from sea_ray import storage
from sea_ray.model.smollm2 import prepared
from sea_ray.presets import world_llm_dir

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
        spec = world_llm_dir()

    local = storage.local_copy(spec) if storage.is_remote(spec) else prepared(spec)
    tok = AutoTokenizer.from_pretrained(local)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _random_init_config(cfg, tokenizer=None):
    """The transformers config of an LLM built from ``cfg.config`` (its token ids from ``tokenizer``)."""
    from transformers import AutoConfig

    kwargs = dict(cfg.config)
    model_type = kwargs.pop("model_type")
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = cfg.attn_implementation
    return config


def _quantization():
    """QLoRA's 4-bit base: NF4 weights, double quantization, bf16 compute (bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def build_llm(cfg, quantized_on: Optional[torch.device] = None):
    """(model, tokenizer) from a :class:`sea_ray.config.schema.LLMConfig`; with ``cfg.lora.enabled``
    the model is PEFT's LoRA model around the base LLM (:func:`apply_lora`).

    ``quantized_on``: the device a QLoRA config (``cfg.lora.qlora``) loads its 4-bit base onto (the
    training stage's); without it the base loads in ``cfg.dtype``, unquantized: how validation,
    eval and export load a QLoRA checkpoint."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path)
    quantize = cfg.lora.enabled and cfg.lora.qlora and quantized_on is not None
    if cfg.config is not None:
        model = AutoModelForCausalLM.from_config(_random_init_config(cfg, tokenizer), dtype=DTYPES[cfg.dtype])
    else:
        path = cfg.name_or_path
        local = storage.local_copy(path) if storage.is_remote(path) else prepared(path)
        extra = {"quantization_config": _quantization(), "device_map": {"": quantized_on}} if quantize else {}
        model = AutoModelForCausalLM.from_pretrained(local, dtype=DTYPES[cfg.dtype],
                                                     attn_implementation=cfg.attn_implementation, **extra)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM's embedding table has "
                         f"{model.get_input_embeddings().num_embeddings} rows")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=quantize)
    return model, tokenizer


# --------------------------------------------------------------------------- LoRA (PEFT)


def peft_lora_config(lora):
    """PEFT's ``LoraConfig`` of a :class:`sea_ray.config.schema.LoraConfig`."""
    import peft

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM")


def check_lora_targets(model, lora) -> None:
    """Raise ValueError when a name of ``lora.target_modules`` matches no module of the LLM
    ``model`` (PEFT's matching rule; PEFT itself refuses only a list of which no name matches)."""
    if lora.target_modules == "all-linear":
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in lora.target_modules
               if not any(check_target_module_exists(peft_lora_config(lora.model_copy(update={"target_modules": [t]})),
                                                     name) for name in names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        hints = {t: difflib.get_close_matches(t, leaves, n=1) for t in missing}
        said = ", ".join(f"{t!r}" + (f" (did you mean {hints[t][0]!r}?)" if hints[t] else "") for t in missing)
        raise ValueError(f"{said} {'names' if len(missing) == 1 else 'name'} no module of the LLM "
                         f"({type(model).__name__}); its linear layers: {', '.join(leaves)}, or all-linear")


def apply_lora(model, lora, quantized: bool = False):
    """PEFT's LoRA model around ``model`` (``get_peft_model``): every weight of the base frozen,
    LoRA weights on the target modules; a 4-bit base (``quantized``) is first prepared for
    training as PEFT prescribes (``prepare_model_for_kbit_training``)."""
    import peft

    check_lora_targets(model, lora)
    if quantized:
        # gradient checkpointing is the stage's choice (cfg.grad_checkpointing), not PEFT's default
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, peft_lora_config(lora))


def is_lora(llm) -> bool:
    """Whether ``llm`` is PEFT's model around a base LLM (peft is not imported to answer no)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(llm, peft.PeftModel)


def llm_skeleton(cfg):
    """The LLM's architecture on the meta device (no weights, no memory), or None when only a
    download could tell (a hub id or an ``s3://`` URI): what the pre-flight checks inspect."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.config is not None:
        config = _random_init_config(cfg)
    else:
        path = cfg.name_or_path
        if storage.is_remote(path) or not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            return None
        config = AutoConfig.from_pretrained(os.path.expanduser(path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
