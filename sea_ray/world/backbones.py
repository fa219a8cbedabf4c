"""Backbones for the synthetic world: a tiny CLIP and a tiny causal LM, trained from scratch.

No pretrained CLIP or LLM can be downloaded here, and random towers give meaningless patch labels
and a language model that knows nothing. This module trains both on the synthetic world, on the
CPU, in minutes; ``workflows/backbones.py`` is the recipe that made the weights shipped in
``sea_ray/assets/world`` (the presets ``world-clip-llama`` and ``world-clip-random-llm`` point at
them).

- **CLIP** (:func:`train_world_clip`): an open_clip ``CLIP`` with a custom architecture
  (:data:`sea_ray.presets.WORLD_CLIP_ARCH`: 64 px images, 8 px patches -> an 8 x 8 grid) trained
  with open_clip's ``ClipLoss`` on world image-caption pairs. Trained on whole-scene captions only,
  its patch labels are at chance (the labeler asks about single words, "a photo of a red.", which
  such a CLIP never saw); so ``crop_fraction`` of the pairs are crops (:func:`clip_pairs`): one
  object captioned with its colour, its shape or both, or a background-only window captioned with
  the background colour, in the labeler's prompt template. See docs/eval.md for the measured
  label precision of each variant.
- **LLM** (:func:`train_world_llm`): a Hugging Face ``LlamaForCausalLM`` with the world
  tokenizer (every world word is one token), trained on world text in the formats the training
  stages use: captions as in the ``plain`` template and question/answer conversations as in
  ``llava_v1`` (without the image), plus the text-only facts. Saved with ``save_pretrained``
  (safetensors) and the tokenizer next to it.

Everything is seeded; the same arguments give the same weights on the same machine (CPU
floating-point results may differ in the last bits across machines).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from sea_ray.constants import IMAGE_PLACEHOLDER
from sea_ray.data.templates import LLAVA_V1_ROLES, LLAVA_V1_SYSTEM, render_llava_v1
from sea_ray.presets import WORLD_CLIP_ARCH, WORLD_LLM_CONFIG
from sea_ray.world import generator as W
from sea_ray.world.audit import audit
from sea_ray.world.generator import render_image, render_owner_map, sample_record, world_words

log = logging.getLogger(__name__)

CLIP_WEIGHTS = "open_clip_model.safetensors"
CONFIG_FILE = "config.json"


def _progress(log_fn: Optional[Callable[[str], None]]):
    return log_fn or (lambda msg: log.info("%s", msg))


# --------------------------------------------------------------------------- world data


def world_records(seed: int, num_images: int, image_size: int = 64) -> list[dict]:
    """Scene records of world ``seed`` (the images are rendered from them on demand)."""
    return [sample_record(seed, i, image_size) for i in range(num_images)]


def render_images(records: Sequence[dict]) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` images of the records."""
    return np.stack([render_image(r) for r in records])


def _object_crop(record: dict, image: np.ndarray, k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A square crop around object ``k`` (1.3-2x its bounding square), resized to ``size``."""
    from PIL import Image

    obj = record["objects"][k]
    s = image.shape[0]
    half = obj["radius"] * rng.uniform(1.3, 2.0)
    cx = obj["cx"] + rng.uniform(-0.2, 0.2) * obj["radius"]
    cy = obj["cy"] + rng.uniform(-0.2, 0.2) * obj["radius"]
    x0, y0 = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
    x1, y1 = min(s, int(round(cx + half))), min(s, int(round(cy + half)))
    crop = Image.fromarray(image[y0:y1, x0:x1]).resize((size, size), Image.BICUBIC)
    return np.asarray(crop)


def _background_crop(record: dict, image: np.ndarray, rng: np.random.Generator, size: int,
                     owner: np.ndarray) -> Optional[np.ndarray]:
    """A square crop (a quarter to a half of the side) that holds background only, resized to
    ``size``; None when no such window was found in a few tries."""
    from PIL import Image

    s = image.shape[0]
    for _ in range(12):
        w = int(rng.integers(s // 4, s // 2 + 1))
        x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - w + 1))
        if (owner[y0:y0 + w, x0:x0 + w] < 0).all():
            return np.asarray(Image.fromarray(image[y0:y0 + w, x0:x0 + w]).resize((size, size), Image.BICUBIC))
    return None


CROP_CAPTIONS = ("object", "words")


def clip_pairs(records: Sequence[dict], images: np.ndarray, crop_fraction: float, seed: int, epoch: int,
               crop_captions: str = "object", background_share: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """One epoch of (image, caption) pairs: every scene with its caption, except a
    ``crop_fraction`` of them, replaced by a crop:

    - of one object (1.3-2x its bounding square), captioned ``"a photo of a {colour} {shape}."``
      (``crop_captions="object"``) or, with ``"words"``, by one of ``"a photo of a {colour}."``,
      ``"a photo of a {shape}."`` or ``"a photo of a {colour} {shape}."`` (single words in the
      labeler's prompt template);
    - or, for a ``background_share`` of the crops, of background only, captioned
      ``"a photo of a {background}."``.
    """
    if crop_captions not in CROP_CAPTIONS:
        raise ValueError(f"crop_captions must be one of {CROP_CAPTIONS}, got {crop_captions!r}")
    rng = np.random.default_rng([seed, epoch, 7])
    out_images = images.copy()
    captions = [r["caption"] for r in records]
    if crop_fraction <= 0:
        return out_images, captions
    size = images.shape[1]
    for i in np.flatnonzero(rng.random(len(records)) < crop_fraction):
        i = int(i)
        rec = records[i]
        if background_share > 0 and rng.random() < background_share:
            crop = _background_crop(rec, images[i], rng, size, render_owner_map(rec))
            if crop is not None:
                out_images[i] = crop
                captions[i] = f"a photo of a {rec['background']}."
                continue
        k = int(rng.integers(len(rec["objects"])))
        obj = rec["objects"][k]
        out_images[i] = _object_crop(rec, images[i], k, rng, size)
        form = 2 if crop_captions == "object" else int(rng.integers(3))
        name = (obj["color"], obj["shape"], f"{obj['color']} {obj['shape']}")[form]
        captions[i] = f"a photo of a {name}."
    return out_images, captions


# --------------------------------------------------------------------------- CLIP


def build_world_clip(arch: Optional[dict] = None):
    """The open_clip ``CLIP`` of ``arch`` (default: :data:`sea_ray.presets.WORLD_CLIP_ARCH`), random init."""
    import open_clip

    arch = arch or WORLD_CLIP_ARCH
    return open_clip.CLIP(embed_dim=arch["embed_dim"], vision_cfg=open_clip.CLIPVisionCfg(**arch["vision_cfg"]),
                          text_cfg=open_clip.CLIPTextCfg(**arch["text_cfg"]))


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_world_clip(out_dir: str, *, num_images: int = 12000, seed: int = 1000, epochs: int = 25,
                     batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.1, warmup_ratio: float = 0.05,
                     crop_fraction: float = 0.5, crop_captions: str = "words", background_share: float = 0.4,
                     arch: Optional[dict] = None, threads: Optional[int] = None,
                     device: str = "cpu", stop_epoch: Optional[int] = 19, max_seconds: Optional[float] = None,
                     log_fn: Optional[Callable[[str], None]] = None) -> dict:
    """Train the world CLIP with open_clip's ``ClipLoss``; save fp16 safetensors + ``config.json``.

    The learning-rate schedule (warm-up, cosine) spans ``epochs``; ``stop_epoch`` stops after that
    many of them, ``max_seconds`` after the first epoch that ends past this wall time (both recorded).
    Returns the summary written into ``config.json`` (architecture, training arguments, losses)."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from sea_ray.model.vision import CLIP_MEAN, CLIP_STD

    say = _progress(log_fn)
    arch = arch or WORLD_CLIP_ARCH
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    image_size = arch["vision_cfg"]["image_size"]
    records = world_records(seed, num_images, image_size)
    images = render_images(records)
    model = build_world_clip(arch).to(device)
    model.train()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=arch["text_cfg"]["context_length"])
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = num_images // batch_size
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, total, max(1, int(warmup_ratio * total))))
    loss_fn = ClipLoss()
    history = []
    step = 0
    scene_tokens = tokenizer([r["caption"] for r in records])
    for epoch in range(epochs):
        ep_images, captions = clip_pairs(records, images, crop_fraction, seed, epoch, crop_captions,
                                         background_share)
        order = np.random.default_rng([seed, epoch, 11]).permutation(num_images)
        tokens = scene_tokens.clone()
        changed = [i for i, (c, r) in enumerate(zip(captions, records)) if c != r["caption"]]
        if changed:
            tokens[changed] = tokenizer([captions[i] for i in changed])
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = torch.from_numpy(ep_images[idx]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - mean) / std
            image_features, text_features, scale = model(x, tokens[idx].to(device))
            loss = loss_fn(image_features, text_features, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            step += 1
        history.append(round(running / max(1, steps_per_epoch), 4))
        say(f"clip epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} ({time.time() - started:.0f}s)")
        if stop_epoch is not None and epoch + 1 >= stop_epoch and epoch + 1 < epochs:
            say(f"clip: stopped after epoch {epoch + 1} of {epochs} (stop_epoch)")
            break
        if max_seconds is not None and time.time() - started > max_seconds and epoch + 1 < epochs:
            say(f"clip: stopped after epoch {epoch + 1} of {epochs} (max_seconds={max_seconds})")
            break
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, CLIP_WEIGHTS))
    summary = {"kind": "open_clip", "arch": arch, "weights": CLIP_WEIGHTS, "dtype": "float16",
               "tokenizer": "open_clip ViT-B-32 (context_length from arch.text_cfg)",
               "train": {"num_images": num_images, "world_seed": seed, "image_size": image_size, "epochs": epochs,
                         "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                         "warmup_ratio": warmup_ratio, "crop_fraction": crop_fraction,
                         "crop_captions": crop_captions, "background_share": background_share,
                         "stop_epoch": stop_epoch, "max_seconds": max_seconds, "steps": step,
                         "epochs_done": len(history),
                         "seconds": round(time.time() - started, 1)},
               "loss_per_epoch": history}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --------------------------------------------------------------------------- LLM


def world_texts(records: Sequence[dict], seed: int, split_index: int = 0, eos: str = "") -> list[str]:
    """World text in the training stages' formats, without images: per record its caption as in
    the ``plain`` template (``caption<eos>``) and its question/answer conversation as in
    ``llava_v1``; plus the world's text-only facts (one conversation per 20 records)."""
    def conversation(turns):
        return render_llava_v1(turns, eos)[0]

    texts = []
    for i, rec in enumerate(records):
        index = int(rec["id"].rsplit("_", 1)[-1]) if rec.get("id") else i
        _, qas = W._texts(seed, index, rec)
        texts.append(rec["caption"] + eos)
        texts.append(conversation([(q["question"], q["answer"]) for q in qas]))
    for sample in W._text_only(seed, split_index, "text", max(1, len(records) // 20)):
        turns = sample["conversations"]
        texts.append(conversation([(turns[j]["value"], turns[j + 1]["value"]) for j in range(0, len(turns), 2)]))
    return texts


def world_tokenizer():
    """The synthetic world's tokenizer: a byte-level BPE in which every world word is a whole token
    in mid-sentence form (shipped with the world LLM; ``tokenizer: world`` loads that copy)."""
    from sea_ray.model.llm import train_bpe_tokenizer

    words = world_words()
    # Each word mid-sentence and at the start, plus the prompt scaffolding the templates use.
    corpus = [" ".join(words)] * 4 + [f" {w}" for w in words] + words
    user, assistant = LLAVA_V1_ROLES
    corpus += [f"{user}: {assistant}: {LLAVA_V1_SYSTEM}\n{IMAGE_PLACEHOLDER}"]
    return train_bpe_tokenizer(corpus, vocab_size=1024)


def train_world_llm(out_dir: str, *, num_images: int = 16000, seed: int = 1000, epochs: int = 4,
                    batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05,
                    config: Optional[dict] = None, threads: Optional[int] = None, device: str = "cpu",
                    log_fn: Optional[Callable[[str], None]] = None) -> dict:
    """Train the world LLM (``config``, default :data:`sea_ray.presets.WORLD_LLM_CONFIG`) on world text;
    ``save_pretrained`` the model (safetensors) and the world tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    say = _progress(log_fn)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    tokenizer = world_tokenizer()
    kwargs = dict(config or WORLD_LLM_CONFIG)
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    model.train()
    texts = world_texts(world_records(seed, num_images), seed, eos=tokenizer.eos_token)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    max_len = max(len(e) for e in encoded)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = len(encoded) // batch_size
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, total, max(1, int(warmup_ratio * total))))
    history = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch, 13]).permutation(len(encoded))
        running = 0.0
        for b in range(steps_per_epoch):
            batch = [encoded[i] for i in order[b * batch_size:(b + 1) * batch_size]]
            length = max(len(e) for e in batch)
            ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for j, e in enumerate(batch):
                ids[j, :len(e)] = torch.tensor(e)
                mask[j, :len(e)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
        history.append(round(running / max(1, steps_per_epoch), 4))
        say(f"llm epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} ({time.time() - started:.0f}s)")
    model.eval().cpu()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    summary = {"kind": "hf_causal_lm", "config": dict(config or WORLD_LLM_CONFIG), "vocab_size": len(tokenizer),
               "train": {"num_images": num_images, "world_seed": seed, "texts": len(texts), "max_tokens": max_len,
                         "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                         "warmup_ratio": warmup_ratio, "steps": total, "seconds": round(time.time() - started, 1)},
               "loss_per_epoch": history}
    with open(os.path.join(out_dir, "sea_ray_recipe.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --------------------------------------------------------------------------- the label audit


def audit_world_clip(clip_dir: str, world_dir: str, *, limit: Optional[int] = 300, templates=None,
                     arch: Optional[dict] = None) -> dict:
    """Patch-label precision@1 of a trained world CLIP on the world at ``world_dir`` (its test
    split's pretraining manifest), with the labels job's own audit (:mod:`sea_ray.world.audit`)."""
    from sea_ray.config.loading import validate

    raw = {"job": "labels", "output": os.path.join(world_dir, "_audit_labels"),
           "model": {"vision": {"backend": "open_clip", "name": "custom", "custom": arch or WORLD_CLIP_ARCH,
                                "weights": os.path.join(clip_dir, CLIP_WEIGHTS)},
                     "llm": {"config": {"model_type": "llama"}, "tokenizer": "world"}},
           "data": {"manifest": os.path.join(world_dir, "test", "pretrain.json"),
                    "image_root": os.path.join(world_dir, "images")},
           "vocab": {"min_count": 1}}
    if templates:
        raw["labeler"] = {"templates": list(templates)}
    return audit(validate(raw), world_dir, limit=limit)
