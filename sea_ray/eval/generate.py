"""Greedy generation with the composed model: prompt (with an image) -> answer text.

The prompt is rendered exactly as the instruct stage renders a conversation up to the answer:
``llava_v1`` -> ``"{system} USER: <image>\\n{question} ASSISTANT:"`` (the answer's leading space
belongs to its first token, as in training), ``chat`` -> the tokenizer's chat template with the
generation prompt. The ``<image>`` placeholder becomes the sentinel the model replaces by the
visual tokens. Batches are left-padded; decoding is transformers' greedy ``generate``, stopping at eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sea_ray import storage
from sea_ray.constants import IMAGE_PLACEHOLDER
from sea_ray.data.images import decode_image
from sea_ray.data.templates import _encode_text, _eos, adds_bos, render_llava_v1, resolve_template
from sea_ray.errors import DataError


def render_prompt(question: str, tokenizer, template: str = "auto", with_image: bool = True,
                  history: Sequence[tuple[str, str]] = ()) -> str:
    """The text the model sees before its answer (``template``: auto | llava_v1 | chat).

    ``history``: the conversation's earlier ``(question, answer)`` turns, rendered before the
    question as the instruct stage renders them (an eos after each answer). Without an
    ``<image>`` placeholder in any turn, one goes in front of the first question (``with_image``)."""
    turns: list[tuple[str, Optional[str]]] = [*((q, a) for q, a in history), (question, None)]
    if with_image and not any(IMAGE_PLACEHOLDER in q for q, _ in turns):
        turns[0] = (f"{IMAGE_PLACEHOLDER}\n{turns[0][0]}", turns[0][1])
    if resolve_template(template, tokenizer) == "chat":
        messages = []
        for q, a in turns:
            messages.append({"role": "user", "content": q})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render_llava_v1(turns, _eos(tokenizer)[1] if history else "")[0]


def encode_prompt(question: str, tokenizer, template: str = "auto", with_image: bool = True,
                  history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids of :func:`render_prompt` with the image sentinel in place of the placeholder."""
    text = render_prompt(question, tokenizer, template, with_image, history)
    bos = adds_bos(tokenizer) and resolve_template(template, tokenizer) != "chat"
    ids, _ = _encode_text(text, [], tokenizer, bos)
    return ids


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy decoding: ``temperature`` > 0, nucleus ``top_p``, a ``seed``."""

    temperature: float
    top_p: float = 1.0
    seed: int = 0


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], images: Optional[torch.Tensor],
                    max_new_tokens: int = 8, eos_id: Optional[int] = None,
                    sampling: Optional[Sampling] = None) -> list[list[int]]:
    """Greedy (or, with ``sampling``, sampled) continuations of ``prompts`` (token ids with at most
    one image sentinel each; ``images`` holds the images of the prompts that have one, in order).
    Returns the new token ids per prompt, without the eos. The prompts are embedded as in training
    (``model.splice``), left-padded, and decoded by transformers' ``generate``; a row stops at its
    first eos."""
    if not prompts:
        return []
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    tokenizer = model.tokenizer
    eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.llm.parameters()).device
    n = len(prompts)
    length = max(len(p) for p in prompts)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, :len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    visual = model.encode_images(images.to(device)) if images is not None and images.shape[0] else None
    embeds, emb_mask, _, _ = model.splice(ids, mask, None, visual)
    # splice right-pads; a decoder-only generate needs every prompt to end at the last position
    lengths = emb_mask.sum(dim=1)
    total = int(lengths.max())
    left = embeds.new_zeros((n, total, embeds.shape[-1]))
    left_mask = emb_mask.new_zeros((n, total))
    for i in range(n):
        k = int(lengths[i])
        left[i, total - k:] = embeds[i, :k]
        left_mask[i, total - k:] = 1
    # With only inputs_embeds, generate returns just the new tokens (positions come from the mask).
    # eos_id None or < 0 (no token) never stops: an empty eos list, not the model's default eos.
    stop = [eos_id] if eos_id is not None and eos_id >= 0 else []
    # Pure greedy (or the sampling asked for) whatever the checkpoint's generation_config.json says.
    decoding = {"do_sample": False}
    if sampling is not None:
        torch.manual_seed(sampling.seed)
        decoding = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    out = model.llm.generate(inputs_embeds=left, attention_mask=left_mask, max_new_tokens=max_new_tokens,
                             num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
                             eos_token_id=stop, pad_token_id=pad_id, **decoding)
    generated = []
    for row in out.tolist():  # a finished row is padded after its eos
        generated.append(row[:row.index(eos_id)] if eos_id in row else row)
    return generated


def answer(model, image_tensors: Optional[torch.Tensor], questions: Sequence[str], template: str = "auto",
           max_new_tokens: int = 8, histories: Optional[Sequence[Sequence[tuple[str, str]]]] = None,
           has_image: Optional[Sequence[bool]] = None, sampling: Optional[Sampling] = None) -> list[str]:
    """Decoded answers to ``questions``, one image per question (``image_tensors [N, 3, H, W]``,
    the tower's transform) or none; greedy unless ``sampling``. ``has_image``: which questions have
    one (``image_tensors`` then holds only theirs, in order; default: all or, without tensors,
    none); ``histories``: each question's earlier turns (:func:`render_prompt`)."""
    if has_image is None:
        has_image = [image_tensors is not None] * len(questions)
    histories = histories if histories is not None else [()] * len(questions)
    prompts = [encode_prompt(q, model.tokenizer, template, w, h) for q, w, h in zip(questions, has_image, histories)]
    new = greedy_generate(model, prompts, image_tensors, max_new_tokens, sampling=sampling)
    return [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


# --------------------------------------------------------------------------- sea-ray generate


def read_image(ref: str):
    """A decoded RGB image from a local path or URI, or a DataError saying why not."""
    try:
        data = storage.read_bytes(ref)
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"cannot read {ref}: {exc}") from None
    img, reason = decode_image(data)
    if img is None:
        raise DataError(f"{ref}: {reason}")
    return img


def read_prompts(path: str, image_root: Optional[str] = None) -> list[dict]:
    """``--prompts FILE.jsonl``: one ``{"prompt": ..., "image": ...}`` per line (``image`` optional,
    resolved against ``image_root`` by the one rule of :func:`sea_ray.storage.resolve_image`; an
    ``id`` is kept). Every image is read and decoded here, before any model loads; every bad line
    is reported at once."""
    try:
        text = storage.read_text(path)
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"cannot read the prompts file {path}: {exc}") from None
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {number}: not JSON ({exc})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f"line {number}: needs a non-empty \"prompt\" string")
            continue
        image = storage.resolve_image(row.get("image"), image_root) if row.get("image") else None
        try:
            pixels = read_image(image) if image else None
        except DataError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        rows.append({"id": row.get("id", number), "prompt": row["prompt"], "image": image, "pixels": pixels})
    if problems:
        raise DataError(f"{path}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems[:20]))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


class Generator:
    """A checkpoint loaded once, answering prompt after prompt (``sea-ray generate``)."""

    def __init__(self, checkpoint: str, template: str = "auto", device: str = "auto", max_new_tokens: int = 32,
                 sampling: Optional[Sampling] = None):
        from sea_ray.eval.loading import device_of, load_model

        self.model, info = load_model(checkpoint, device=device_of(device))
        if template == "auto" and info["config"].get("job") == "instruct":
            template = info["config"].get("template", "auto")
        self.template, self.max_new_tokens, self.sampling = template, max_new_tokens, sampling

    def __call__(self, prompt: str, image=None) -> str:
        """The answer to ``prompt`` about ``image`` (a decoded PIL image, or None: text only)."""
        tensors = self.model.vision.transform(image).unsqueeze(0) if image is not None else None
        return answer(self.model, tensors, [prompt], self.template, self.max_new_tokens, sampling=self.sampling)[0]


def generate(checkpoint: str, image: Optional[str], prompt: str, max_new_tokens: int = 32, template: str = "auto",
             device: str = "auto", sampling: Optional[Sampling] = None) -> str:
    """One answer: load a checkpoint (its ``config.json`` gives the model), answer ``prompt`` about
    ``image`` (a local path or an s3:// URI, read before the model loads; None: a text-only prompt)."""
    pixels = read_image(image) if image else None
    return Generator(checkpoint, template, device, max_new_tokens, sampling)(prompt, pixels)
