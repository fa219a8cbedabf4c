"""A trained checkpoint -> a Hugging Face LLaVA folder (``sea-ray export``).

SEA adds nothing at inference, so a sea_ray model is a plain LLaVA: vision tower -> 2-layer
GELU projector -> causal LM. The folder loads offline with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoModelForImageTextToText`` and
``AutoProcessor.from_pretrained``, and so in vLLM, lmms-eval's ``llava_hf`` and VLMEvalKit.

What maps to what:

- tower: :mod:`sea_ray.export.towers` (HF CLIP / SigLIP as they are; open_clip ViTs converted to
  ``CLIPVisionModel``); ``vision_feature_layer`` = the tower's ``select_layer``;
  ``vision_feature_select_strategy`` ``default`` (class token dropped) or ``full``;
- adapter ``mlp2x_gelu`` (``0.``, ``2.``) -> ``multi_modal_projector.linear_1`` / ``linear_2``
  with ``projector_hidden_act="gelu"``; other adapters have no transformers class and are refused;
- LLM: ``model.*`` -> ``model.language_model.*``, ``lm_head`` as it is (tied when the LLM ties);
  LoRA weights (``model.llm.lora``) merged into the base weights first (PEFT's
  ``merge_and_unload``), so the folder is a plain LLaVA that loads without peft; a QLoRA
  checkpoint's LoRA weights are merged into the base as it loads unquantized (``model.llm.dtype``);
- tokenizer: an added special ``<image>`` token (its embedding rows drawn around the mean of the
  others, as transformers' ``resize_token_embeddings`` and the LLaVA conversion scripts do; the
  row is never read, the processor's image tokens are replaced by visual tokens) and the pad
  token training used;
- chat template: the one the checkpoint was instruction-tuned with (LLaVA v1 as Jinja, or the
  LLM's own), taking ``{"type": "image"}`` content parts as ``<image>\\n`` before the text, as
  sea_ray's prompts put it. An align checkpoint (caption pretraining only) gets none.

Not exported: the SEA loss's learned temperature (a training-only parameter), optimizer state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import torch

from sea_ray import __version__, storage
from sea_ray.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from sea_ray.data.templates import chat_template_with_images, llava_v1_chat_template, resolve_template
from sea_ray.errors import ConfigError
from sea_ray.eval.generate import encode_prompt
from sea_ray.export import towers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVENANCE_FILE = "sea_ray_export.json"
LAST_FILE = "config.json"  # written last: a reader that sees it sees a whole folder


def projector_weights(model, kind: str) -> dict[str, torch.Tensor]:
    """The adapter (of type ``kind``) as LLaVA's ``multi_modal_projector``; refuses adapters
    LLaVA has no class for."""
    if kind != "mlp2x_gelu":
        raise ConfigError([f"model.adapter.type: {kind!r} cannot be exported: transformers' LLaVA projector is "
                           "mlp2x_gelu only (Linear -> GELU -> Linear); train with adapter.type=mlp2x_gelu"])
    first, last = model.adapter[0], model.adapter[2]
    if first.out_features != last.out_features:
        raise ConfigError([f"model.adapter.hidden_size: {first.out_features} cannot be exported: LLaVA's projector "
                           f"is {last.out_features} wide inside (the LLM's width)"])
    return {"linear_1.weight": first.weight, "linear_1.bias": first.bias,
            "linear_2.weight": last.weight, "linear_2.bias": last.bias}


def _tokenizer_with_image_token(tokenizer):
    """A copy of the tokenizer with ``<image>`` as an added special token; returns (tokenizer, id)."""
    import copy

    from tokenizers import AddedToken

    tok = copy.deepcopy(tokenizer)
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_PLACEHOLDER, special=True,
                                                                          normalized=False)]})
    tok.image_token = IMAGE_PLACEHOLDER  # LlavaProcessor reads it
    return tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def chat_template_of(info: dict, tokenizer) -> Optional[str]:
    """The chat template the checkpoint was instruction-tuned with (None after align only)."""
    config = info["config"]
    if config.get("job") != "instruct":
        return None
    name = resolve_template(config.get("template", "auto"), tokenizer)
    if name == "chat":
        own = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template
        return chat_template_with_images(own)
    return llava_v1_chat_template()


def build_llava(model, info: dict, dtype: Optional[str] = None):
    """(LlavaForConditionalGeneration, LlavaProcessor) holding ``model``'s weights (a sea_ray
    :class:`~sea_ray.model.vlm.VLM` with its checkpoint loaded; its LoRA weights are merged into
    its LLM and the LLM is resized, in place)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if model.merge_lora():
        log.info("LoRA weights merged into the LLM")

    projector = projector_weights(model, info["config"]["model"]["adapter"]["type"])
    vision_config, vision_state = towers.hf_vision(model.vision)
    strategy, additional = towers.select_strategy(model.vision)
    tokenizer, image_token_id = _tokenizer_with_image_token(model.tokenizer)
    llm = model.llm
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        torch.manual_seed(0)  # the new rows are drawn at random: the same export every time
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = llm.config
    target = DTYPES[dtype] if dtype else next(llm.parameters()).dtype
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=image_token_id, image_seq_length=model.vision.num_patches,
                         projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
                         vision_feature_layer=model.vision.select_layer, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    config.dtype = target
    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.items()})
    for key, value in llm.state_dict().items():
        state[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key] = value
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    expected = set(hf.state_dict())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unknown:
        raise ValueError(f"export mapping is incomplete: missing {missing[:5]}, not in LLaVA {unknown[:5]}")
    hf.load_state_dict({k: v.detach().to(target).clone() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.eval()
    hf.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    processor = LlavaProcessor(image_processor=towers.image_processor(model.vision), tokenizer=tokenizer,
                               patch_size=model.vision.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=additional, image_token=IMAGE_PLACEHOLDER,
                               chat_template=chat_template_of(info, model.tokenizer))
    return hf, processor


def check_prompt(model, info: dict, processor) -> None:
    """Refuse an export whose processor would tokenize a prompt other than sea_ray does (a
    tokenizer that treats text after a special token differently, for one): the same question,
    rendered and tokenized both ways, must give the same ids, the image token standing for the
    sentinel."""
    if processor.chat_template is None:
        return
    question = "What is in the picture?"
    ours = encode_prompt(question, model.tokenizer, info["config"].get("template", "auto"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor.tokenizer(text)["input_ids"]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if theirs != [image_id if t == IMAGE_TOKEN_INDEX else t for t in ours]:
        raise ValueError(f"the exported processor tokenizes the prompt {text!r} as {theirs}, but sea_ray trained on "
                         f"{ours}; this tokenizer cannot be exported faithfully")


def _lora_provenance(info: dict) -> Optional[dict]:
    """What the checkpoint's LoRA was (merged into the exported weights), or None without LoRA."""
    lora = ((info["config"].get("model") or {}).get("llm") or {}).get("lora") or {}
    if not lora.get("enabled"):
        return None
    return {"merged": True, **{k: lora.get(k) for k in ("rank", "alpha", "target_modules", "qlora")}}


def _write_folder(hf, processor, provenance: dict, folder: str) -> None:
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, PROVENANCE_FILE), "w") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)


def _publish(local: str, out: str) -> None:
    """Move (local) or upload (remote) the finished folder to ``out``, ``config.json`` last."""
    if not storage.is_remote(out):
        target = storage.local_copy(out)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        os.replace(local, target)
        return
    storage.put_folder(local, out, last=LAST_FILE)


def export(checkpoint: str, out: str, dtype: Optional[str] = None, overwrite: bool = False) -> dict:
    """``sea-ray export``: the checkpoint (or run folder; local or ``s3://``) as a LLaVA folder at
    ``out`` (local or ``s3://``). Returns what was written (also in ``sea_ray_export.json``)."""
    from sea_ray.eval.loading import load_model

    if storage.exists(storage.join(out, LAST_FILE)) and not overwrite:
        raise ConfigError([f"--out: {out} already holds an exported model (config.json); choose another folder "
                           "or pass --overwrite"])
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError([f"--dtype: {dtype!r}; valid: {', '.join(DTYPES)}"])
    model, info = load_model(checkpoint)
    hf, processor = build_llava(model, info, dtype)
    check_prompt(model, info, processor)
    provenance = {"sea_ray_version": __version__, "checkpoint": info["checkpoint"], "stage": info["stage"],
                  "step": info["step"], "dtype": str(hf.config.dtype).replace("torch.", ""),
                  "image_token_index": hf.config.image_token_index, "image_seq_length": hf.config.image_seq_length,
                  "image_aspect": model.vision.image_aspect, "lora": _lora_provenance(info),
                  "chat_template": "none" if processor.chat_template is None else
                  resolve_template(info["config"].get("template", "auto"), model.tokenizer),
                  "not_exported": ["sea_head (the SEA loss's temperature)", "optimizer state"]}
    local_parent = None if storage.is_remote(out) else os.path.dirname(storage.local_copy(out)) or "."
    if local_parent:
        os.makedirs(local_parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=storage.TMP_PREFIX + "export-", dir=local_parent)
    try:
        _write_folder(hf, processor, provenance, staging)
        if overwrite and not storage.is_remote(out) and os.path.isdir(storage.local_copy(out)):
            shutil.rmtree(storage.local_copy(out))
        _publish(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    log.info("exported %s (%s, step %s) to %s", info["checkpoint"], info["stage"], info["step"], out)
    return {**provenance, "out": out}
