"""The eval job: a trained checkpoint on held-out data, a split of the synthetic world or your own
manifests.

Run it::

    sea-ray eval --config workflows/configs/tiny_eval.yaml [checkpoint=URI output=DIR ...]
    sea-ray eval --config workflows/configs/tiny_eval_own.yaml      # your own data (data: ...)

or from Python: ``sea_ray.eval.job.run(load_config(path, job="eval"))``.

Recipe (top to bottom in :func:`evaluate`):

1. **load** the checkpoint (a step folder, or a run folder's newest complete one), its resolved
   config, and build the model it was trained with (or ``model:``); the trainable tensors it holds
   (adapter, and the LLM after instruct) replace the built ones;
2. **data**: a world split (its images with their ground-truth patch words, ``qa.jsonl``, its
   manifests) or your own (``data.manifest`` captions, ``data.conversations`` with reference
   answers, their images, ``data.labels``);
3. **lm_loss**: the training objective (:func:`sea_ray.train.heldout.heldout_lm`: masked LM loss
   with the images, token-weighted) on the captions as align preprocesses them and on the
   conversations as instruct does, for the checkpoint and the model its training started from;
4. **alignment**: adapter outputs of every patch -> nearest vocabulary word (argmax cosine to the
   words' LLM targets, paper Eq. 10) vs the patch's words (the world's ground truth, or the
   labels' top-1 and top-n); TACS and the modality gap against the captions' LLM token embeddings;
5. **qa**: greedy answers to every question (world ``qa.jsonl``; every human turn of the
   conversations), exact match after normalisation (own data: also VQA accuracy);
6. **perplexity**: the LLM alone on the held-out text (captions and conversations in the
   training formats, without images), before (the model's base LLM) and after (the checkpoint's);
7. **report** (:func:`run`): ``report.json``, ``report.md``, ``plots/*.png``, ``predictions.jsonl``
   in ``output``.

Which metrics run: ``metrics``, by default :func:`sea_ray.config.rules.eval_metrics`'s. Everything
runs in this process (pure PyTorch, CPU or one GPU): a tiny model evaluates in seconds, a 7B one
wants ``device: cuda``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from sea_ray import storage
from sea_ray.config.loading import to_dict
from sea_ray.config.rules import eval_metrics
from sea_ray.config.schema import AlignConfig, EvalConfig, InstructConfig, TrainDataConfig, VocabConfig
from sea_ray.constants import IMAGE_PLACEHOLDER
from sea_ray.data.images import decode_image
from sea_ray.data.manifest import caption_of, image_root_for, read_manifest
from sea_ray.data.templates import render_llava_v1
from sea_ray.errors import DataError
from sea_ray.eval.generate import answer, read_image
from sea_ray.eval.loading import device_of, load_model
from sea_ray.eval.metrics import (ModalityGap, lm_nll, normalize_answer, perplexity, qa_accuracy, vqa_accuracy,
                                  word_accuracy)
from sea_ray.eval.report import write_report
from sea_ray.labels.dataset import META_FILE
from sea_ray.labels.regrid import resample
from sea_ray.labels.schema import to_arrays
from sea_ray.labels.vocab import build_vocab
from sea_ray.sea import nearest_word, tacs, word_targets
from sea_ray.train.data import label_shards, read_label_ids, read_stored_rows
from sea_ray.world.generator import load_ground_truth, patch_ground_truth

log = logging.getLogger(__name__)

def load_vocab_words(vocab: Optional[str], world: str, split_for_default: str = "train") -> tuple[list[str], str]:
    """(words, source): from a labels dataset's ``_meta.json``, a vocab JSON, or by default the
    world's training captions under the labels job's vocabulary rules."""
    if vocab:
        meta_uri = storage.join(vocab, "_meta.json")
        if not vocab.endswith(".json") and storage.exists(meta_uri):
            return list(json.loads(storage.read_text(meta_uri))["vocab"]["words"]), meta_uri
        data = json.loads(storage.read_text(vocab))
        return list(data["words"] if "words" in data else data["vocab"]["words"]), vocab
    rows = json.loads(storage.read_text(storage.join(world, split_for_default, "pretrain.json")))
    captions = [t["value"] for r in rows for t in r["conversations"] if t.get("from") == "gpt"]
    return build_vocab(captions, VocabConfig()).words, f"{world}/{split_for_default}/pretrain.json captions"


# --------------------------------------------------------------------------- data


def world_split(world: str, split: str, max_samples: Optional[int] = None) -> tuple[list[dict], list[dict]]:
    """(ground-truth records, QA items) of a world split, the first ``max_samples`` images."""
    records = [r for r in load_ground_truth(world) if r["split"] == split]
    if max_samples:
        records = records[:max_samples]
    if not records:
        raise DataError(f"the world at {world} has no {split!r} images")
    keep = {r["id"] for r in records}
    lines = storage.read_text(storage.join(world, split, "qa.jsonl")).splitlines()
    qa = [q for q in (json.loads(line) for line in lines if line.strip()) if q["id"] in keep]
    return records, qa


def image_tensors(model, world: str, records: list[dict]) -> torch.Tensor:
    """The records' images through the tower's own transform (the geometry of the checkpoint's
    ``data.image_aspect``, :func:`sea_ray.eval.loading.load_model`), ``[N, 3, H, W]``."""
    return torch.stack([model.vision.transform(read_image(storage.join(world, "images", rec["image"])))
                        for rec in records])


# --------------------------------------------------------------------------- metrics on a model


@torch.no_grad()
def visual_alignment(model, batches: Iterable[tuple[torch.Tensor, list[str], dict[str, list[list[str]]],
                                                    Optional[list[str]]]], words: list[str], top_k: int = 10) -> dict:
    """The section-7 diagnostics of the adapter outputs, batch by batch (nothing larger than a
    batch of visual tokens is kept).

    ``batches`` yields ``(images [B, 3, H, W], their captions, truths, groups)``: ``truths`` maps a
    label source's name to the words of every patch of the batch (row-major per image, images in
    order; a patch without words is not scored), ``groups`` names each patch's kind (or None).
    Returns ``{"nearest": {source: nearest-word accuracy result}, "most_predicted", "tacs",
    "modality_gap", "vocab_size", "unmapped_words", "truth_words_not_in_vocab", "images"}``:
    every visual token's nearest vocabulary word (argmax cosine to the words' LLM targets, paper
    Eq. 10) against each source's words, TACS per image against its caption's LLM token
    embeddings (averaged over images) and the modality gap between all visual tokens and all
    caption tokens."""
    device = next(model.llm.parameters()).device
    table = model.input_embedding_table()
    targets, mapped, unmapped = word_targets(words, model.tokenizer, table)
    targets = targets.cpu()
    mapped_words = [words[i] for i in mapped]
    index = {w: i for i, w in enumerate(mapped_words)}
    predicted: list[int] = []
    truth: dict[str, list[list[int]]] = {}
    groups: list[str] = []
    missing: set[str] = set()
    tacs_values: list[float] = []
    gap = ModalityGap()
    for images, captions, truths, kinds in batches:
        visual = model.encode_images(images.to(device)).float().cpu()  # [B, P, D]
        flat = visual.reshape(-1, visual.shape[-1])
        predicted += nearest_word(flat, targets).tolist()
        for source, per_patch in truths.items():
            truth.setdefault(source, []).extend([index[w] for w in patch if w in index] for patch in per_patch)
            missing.update(w for patch in per_patch for w in patch if w not in index)
        groups += kinds or []
        encoded = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
        text = [table[torch.as_tensor(c, device=table.device)].float().cpu() for c in encoded]
        tacs_values += [tacs(v, t, top_k) for v, t in zip(visual, text)]
        gap.add(flat, torch.cat(text))
    if not tacs_values:
        raise DataError("no image to evaluate the alignment on")
    nearest = {source: word_accuracy(predicted, len(mapped_words), rows, groups or None)
               for source, rows in truth.items()}
    counts: dict[str, int] = {}
    for p in predicted:
        counts[mapped_words[p]] = counts.get(mapped_words[p], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return {"nearest": nearest, "most_predicted": [[w, round(c / len(predicted), 4)] for w, c in top],
            "tacs": sum(tacs_values) / len(tacs_values), "modality_gap": gap.value(), "vocab_size": len(mapped_words),
            "unmapped_words": unmapped, "truth_words_not_in_vocab": sorted(missing), "images": len(tacs_values)}


def alignment_metrics(model, images: torch.Tensor, records: list[dict], words: list[str], top_k: int = 10,
                      batch_size: int = 32) -> dict:
    """Nearest-word accuracy against the world's ground-truth patch words, TACS and modality gap of
    the adapter outputs (paper section 7; :func:`visual_alignment`)."""
    grid = model.vision.grid

    def batches():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            truth = [patch for rec in chunk for patch in patch_ground_truth(rec, grid[0], grid[1])]
            yield (images[i:i + batch_size], [r["caption"] for r in chunk], {"truth": truth},
                   ["background" if len(patch) == 1 else "object" for patch in truth])

    a = visual_alignment(model, batches(), words, top_k)
    nw = a["nearest"]["truth"]
    return {"nearest_word_accuracy": nw["accuracy"], "nearest_word_chance": nw["chance"],
            "nearest_word_by_group": nw["by_group"], "patches": nw["patches"],
            "most_predicted": a["most_predicted"], "tacs": a["tacs"], "top_k": top_k,
            "modality_gap": a["modality_gap"], "vocab_size": a["vocab_size"], "unmapped_words": a["unmapped_words"],
            "truth_words_not_in_vocab": a["truth_words_not_in_vocab"]}


def labels_alignment(model, rows: list[dict], labels_uri: str, image_root: Optional[str], errors: list[dict],
                     top_k: int = 10, batch_size: int = 32, label_grid: str = "exact") -> dict:
    """The diagnostics of :func:`alignment_metrics` on your own images against a labels dataset:
    each visual token's nearest word vs its patch's top-1 CLIP label and vs its stored top-n
    labels, over the labels' vocabulary; TACS and the modality gap against the rows' captions.
    ``rows``: captions-manifest rows; those without a labels row are left out."""
    meta_uri = storage.join(labels_uri, META_FILE)
    shards = label_shards(labels_uri)  # a DataError unless complete
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except (OSError, ValueError) as exc:
        raise DataError(f"data.labels: cannot read {meta_uri}: {exc}") from None
    spec = model.vision.transform_spec()
    moved = list(meta.get("grid", ())) != list(spec["grid"])
    if moved and label_grid == "exact":
        raise DataError(f"data.labels: labels were computed on a {meta.get('grid')} grid but the vision tower "
                        f"gives {spec['grid']}: label the images with this model's tower, or set "
                        "data.label_grid: resample to move them onto its grid")
    if not moved and meta.get("transform", spec) != spec:
        raise DataError(f"data.labels: labels were computed on another image transform ({meta['transform']}) "
                        f"than this tower's ({spec})")
    words = list(meta["vocab"]["words"])
    at = {sid: i for i, sid in enumerate(read_label_ids(shards).tolist())}  # stored row of each image id
    labelled = [r for r in rows if r["id"] in at]
    if not labelled:
        raise DataError(f"data.labels: none of the {len(rows)} manifest rows has labels in {labels_uri} "
                        "(are they the labels of data.manifest?)")

    def batches():
        for i in range(0, len(labelled), batch_size):
            images = load_images(model, labelled[i:i + batch_size], image_root, errors)
            chunk = [r for r in labelled[i:i + batch_size] if r["id"] in images]
            if not chunk:
                continue
            top1, top_n = [], []
            stored = read_stored_rows(shards, np.asarray([at[r["id"]] for r in chunk]))  # only these rows
            for k in range(len(chunk)):
                row = stored.slice(k, 1).to_pylist()[0]
                ids, scores = to_arrays(row)
                if moved:
                    n = int(row["top_n"])
                    ids = resample(ids, scores, meta["grid"], spec["grid"], n)[0].reshape(-1, n)
                for patch in ids:
                    named = [words[j] for j in patch if j >= 0]
                    top1.append(named[:1])
                    top_n.append(named)
            yield (torch.stack([images[r["id"]] for r in chunk]), [caption_of(r) for r in chunk],
                   {"top1": top1, "top_n": top_n}, None)

    a = visual_alignment(model, batches(), words, top_k)
    one, many = a["nearest"]["top1"], a["nearest"]["top_n"]
    return {"truth": "labels", "nearest_word_accuracy": one["accuracy"], "nearest_word_chance": one["chance"],
            "nearest_word_in_top_n": many["accuracy"], "nearest_word_in_top_n_chance": many["chance"],
            "top_n": int(meta.get("top_n", 0)), "nearest_word_by_group": {}, "patches": one["patches"],
            "images": a["images"], "most_predicted": a["most_predicted"], "tacs": a["tacs"], "top_k": top_k,
            "modality_gap": a["modality_gap"], "vocab_size": a["vocab_size"], "unmapped_words": a["unmapped_words"],
            "truth_words_not_in_vocab": a["truth_words_not_in_vocab"], "vocab_source": meta_uri}


@torch.no_grad()
def qa_metrics(model, images_by_id: dict[str, torch.Tensor], qa: list[dict], template: str = "auto",
               max_new_tokens: int = 8, batch_size: int = 32) -> tuple[dict, list[dict]]:
    """QA accuracy by greedy generation: (metrics, predictions)."""
    predictions = []
    for i in range(0, len(qa), batch_size):
        chunk = qa[i:i + batch_size]
        imgs = torch.stack([images_by_id[q["id"]] for q in chunk])
        outs = answer(model, imgs, [q["question"] for q in chunk], template, max_new_tokens)
        for q, out in zip(chunk, outs):
            predictions.append({"question_id": q.get("question_id"), "type": q.get("type"), "question": q["question"],
                                "answer": q["answer"], "prediction": out,
                                "correct": normalize_answer(out) == normalize_answer(q["answer"])})
    result = qa_accuracy([p["prediction"] for p in predictions], [p["answer"] for p in predictions],
                         [p["type"] for p in predictions])
    return result, predictions


def conversation_questions(rows: list[dict]) -> list[dict]:
    """Every human turn of every conversation row, with what precedes it: ``{"row", "turn",
    "history" (the earlier (question, answer) pairs), "question", "reference" (its gpt turn)}``."""
    out = []
    for row in rows:
        turns = row["conversations"]
        pairs = [(turns[j]["value"], turns[j + 1]["value"]) for j in range(0, len(turns) - 1, 2)]
        out += [{"row": row, "turn": k, "history": pairs[:k], "question": q, "reference": a}
                for k, (q, a) in enumerate(pairs)]
    return out


def _shown(question: str) -> str:
    return question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


@torch.no_grad()
def conversation_qa(model, rows: list[dict], image_root: Optional[str], errors: list[dict], template: str = "auto",
                    max_new_tokens: int = 8, batch_size: int = 32) -> tuple[dict, list[dict]]:
    """QA by greedy generation on a conversations manifest: every human turn is asked with the
    row's image (after the conversation's earlier turns, as the instruct stage renders them) and
    the answer scored against the gpt turn: exact match after :func:`normalize_answer` and VQA
    accuracy (:func:`~sea_ray.eval.metrics.vqa_accuracy`). A row whose image cannot be read is
    skipped (``errors``). Returns (metrics, predictions)."""
    predictions = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = load_images(model, chunk, image_root, errors)
        usable = [r for r in chunk if r["id"] in images or not (r["image"] or r["image_bytes"])]
        items = conversation_questions(usable)
        for j in range(0, len(items), batch_size):
            part = items[j:j + batch_size]
            has = [it["row"]["id"] in images for it in part]
            tensors = torch.stack([images[it["row"]["id"]] for it, h in zip(part, has) if h]) if any(has) else None
            outs = answer(model, tensors, [it["question"] for it in part], template, max_new_tokens,
                          [it["history"] for it in part], has)
            for it, out in zip(part, outs):
                predictions.append({"id": it["row"]["id"], "image": it["row"]["image"], "turn": it["turn"],
                                    "question": _shown(it["question"]), "reference": it["reference"],
                                    "prediction": out,
                                    "em": float(normalize_answer(out) == normalize_answer(it["reference"])),
                                    "vqa": vqa_accuracy(out, [it["reference"]])})
    result = qa_accuracy([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
    result["vqa_accuracy"] = (sum(p["vqa"] for p in predictions) / len(predictions)) if predictions else None
    result["conversations"] = len({p["id"] for p in predictions})
    return result, predictions


def training_texts(captions: list[str], conversations: list[list[dict]], eos: str) -> list[str]:
    """Captions as the ``plain`` template writes them and conversations as ``llava_v1`` does,
    without images: the text of the training formats, for the LLM alone."""
    texts = [c + eos for c in captions]
    for turns in conversations:
        pairs = [(turns[j]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, ""),
                  turns[j + 1]["value"]) for j in range(0, len(turns) - 1, 2)]
        texts.append(render_llava_v1(pairs, eos)[0])
    return texts


def split_texts(world: str, split: str, records: list[dict], eos: str) -> list[str]:
    """The split's text in the training formats (captions as in ``plain``, conversations as in
    ``llava_v1``, without images), from its manifests."""
    keep = {r["id"] for r in records}
    rows = json.loads(storage.read_text(storage.join(world, split, "instruct.json")))
    rows = [row for row in rows if not (row.get("image") and row["id"] not in keep)]
    return training_texts([r["caption"] for r in records], [row["conversations"] for row in rows], eos)


def text_perplexities(model, files: list[str], base_llm_state: Optional[dict], batch_size: int = 32) -> dict:
    """``{name: perplexity_metrics}`` of each text file (one passage per non-empty line; named by
    its file name without the extension): the LLM alone before vs after, on text that is not the
    training data's (``perplexity_texts``)."""
    out = {}
    for uri in files:
        texts = [line.strip() for line in storage.read_text(uri).splitlines() if line.strip()]
        if not texts:
            raise DataError(f"perplexity_texts: {uri} holds no text")
        name = os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]
        out[name] = dict(perplexity_metrics(model, texts, base_llm_state, batch_size), file=uri)
    return out


def perplexity_metrics(model, texts: list[str], base_llm_state: Optional[dict], batch_size: int = 32) -> dict:
    """Perplexity of the checkpoint's LLM on ``texts``, and of the base LLM (its state before the
    checkpoint was loaded) when the checkpoint changed the LLM."""
    nll, n = lm_nll(model.llm, model.tokenizer, texts, batch_size)
    after = perplexity(nll, n)
    before = after
    if base_llm_state is not None:
        trained = {k: v.detach().clone() for k, v in model.llm.state_dict().items()}
        model.llm.load_state_dict(base_llm_state)
        try:
            nll_b, _ = lm_nll(model.llm, model.tokenizer, texts, batch_size)
        finally:
            model.llm.load_state_dict(trained)
        before = perplexity(nll_b, n)
    return {"perplexity_before": before, "perplexity_after": after, "tokens": n, "texts": len(texts),
            "llm_changed": base_llm_state is not None}


# --------------------------------------------------------------------------- held-out LM loss


def stage_config(info: dict, cfg: EvalConfig, stage: str, manifest: str, image_root: Optional[str],
                 template: str):
    """The stage-style config that preprocesses a held-out manifest as training did: the model
    (``cfg.model`` or the checkpoint's), the checkpoint's data settings (``max_length`` and the
    rest of its ``data`` section) with this manifest and image root, and for conversations
    (``stage`` instruct) the template."""
    config = info["config"]
    known = set(TrainDataConfig.model_fields) - {"manifest", "image_root", "labels", "val_manifest"}
    data = {k: v for k, v in config.get("data", {}).items() if k in known}
    data.update(manifest=manifest, image_root=image_root)
    raw = {"job": stage, "model": to_dict(cfg.model) if cfg.model is not None else config["model"], "data": data}
    if stage == "align":
        return AlignConfig.model_validate(dict(raw, sea={"enabled": False}))
    return InstructConfig.model_validate(dict(raw, template=template))


def starting_state(info: dict) -> tuple[Optional[dict], str]:
    """(the tensors of the model the checkpoint's training started from, what it is), or
    (None, why not): the base LLM, and the adapter as training initialised it (align, or instruct
    without init_adapter) or as init_adapter gave it (instruct)."""
    from sea_ray.train import checkpoint as ckpt

    base = info.get("base_state")
    if not base:
        return None, "the checkpoint holds no trained tensors"
    config = info["config"]
    if config.get("job") == "align":
        return base, "the untrained adapter (the align run's step 0)"
    init = config.get("init_adapter")
    if not init:
        return base, "the base LLM with the untrained adapter (the instruct run's step 0)"
    try:
        uri = ckpt.resolve(init)
        adapter = {k: v for k, v in ckpt.load_model_state(uri).items() if k.startswith("adapter.") and k in base}
    except Exception as exc:  # a moved or unreachable align run loses the comparison only
        return None, f"its init_adapter {init} cannot be read ({type(exc).__name__}: {exc})"
    return dict(base, **adapter), f"the base LLM with the align adapter of {uri} (the instruct run's step 0)"


@contextlib.contextmanager
def swapped_state(model, state: dict):
    """``model`` with ``state``'s tensors loaded for the duration, its own restored after."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}
    model.load_state_dict(state, strict=False)
    try:
        yield model
    finally:
        model.load_state_dict(own, strict=False)


def lm_loss_metrics(model, info: dict, cfg: EvalConfig, sets: dict[str, tuple[str, list[dict], Optional[str]]],
                    template: str, say: Callable[[str], None]) -> dict:
    """The held-out LM loss (:func:`sea_ray.train.heldout.heldout_lm`) of the checkpoint and of
    the model its training started from on each set: ``sets[name] = (manifest URI, its rows,
    image root)``, ``captions`` preprocessed as align does, ``conversations`` as instruct does."""
    from sea_ray.train.heldout import heldout_lm, heldout_rows, tower_normalize

    device = next(model.llm.parameters()).device
    normalize, pad_id = tower_normalize(model), model.tokenizer.pad_token_id
    start, start_is = starting_state(info)
    out: dict = {"sets": {}, "before_is": start_is}
    for name, (uri, rows, image_root) in sets.items():
        stage = "align" if name == "captions" else "instruct"
        prepared = heldout_rows(stage_config(info, cfg, stage, uri, image_root, template), model.vision.image_size,
                                rows)
        after = heldout_lm(model, prepared, pad_id, normalize, device, cfg.batch_size)
        before = None
        if start is not None:
            with swapped_state(model, start):
                before = heldout_lm(model, prepared, pad_id, normalize, device, cfg.batch_size)
        out["sets"][name] = {"manifest": uri, "preprocessed_as": stage, "rows": after["rows"],
                             "rows_dropped": len(rows) - after["rows"], "tokens": after["tokens"],
                             "after": {k: after[k] for k in ("loss_lm", "ppl")},
                             "before": None if before is None else {k: before[k] for k in ("loss_lm", "ppl")}}
        say(f"eval: held-out LM loss on {name} {after['loss_lm']:.4f} (perplexity {after['ppl']:.3f}) over "
            f"{after['tokens']} tokens of {after['rows']} rows"
            + ("" if before is None else f"; at the start of training {before['loss_lm']:.4f} "
               f"(perplexity {before['ppl']:.3f})"))
    return out


# --------------------------------------------------------------------------- own data


def read_rows(uri: str, require_image: bool, max_rows: Optional[int], errors: list[dict]) -> list[dict]:
    """The first ``max_rows`` valid rows of a manifest (all without it); bad rows are recorded in
    ``errors`` and skipped."""
    try:
        result = read_manifest(uri, require_image=require_image, limit=max_rows)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: {exc}") from None
    errors.extend(dict(e, manifest=uri) for e in result.errors)
    if not result.rows:
        raise DataError(f"{uri}: no usable rows ({len(result.errors)} bad)")
    return result.rows


def load_images(model, rows: list[dict], image_root: Optional[str], errors: list[dict]) -> dict[str, torch.Tensor]:
    """The images of the rows that have one through the tower's transform, by row id (image
    references resolved by :func:`sea_ray.storage.resolve_image`); an image that cannot be read or
    decoded is left out and recorded in ``errors``."""
    wanted = [r for r in rows if r["image"] or r["image_bytes"]]
    fetched = storage.read_many([None if r["image_bytes"] else storage.resolve_image(r["image"], image_root)
                                 for r in wanted], threads=8)
    out = {}
    for row, (data, reason) in zip(wanted, fetched):
        data = row["image_bytes"] or data
        img, why = decode_image(data) if data is not None else (None, reason)
        if img is None:
            errors.append({"row": row["row"], "image_id": row["id"], "image": row["image"], "stage": "image",
                           "reason": why})
            continue
        out[row["id"]] = model.vision.transform(img)
    return out


def _evaluate_data(cfg: EvalConfig, model, info: dict, metrics: list[str], template: str, report: dict,
                   say: Callable[[str], None]) -> None:
    data = cfg.data
    errors: list[dict] = []
    # the config's image roots, else the ones `sea-ray import-manifest` recorded (as the stages read them)
    captions_root = image_root_for(data.manifest, data.image_root) if data.manifest else data.image_root
    qa_root = data.conversations_image_root or data.image_root
    qa_root = image_root_for(data.conversations, qa_root) if data.conversations else qa_root
    captions = read_rows(data.manifest, True, cfg.max_samples, errors) if data.manifest else None
    conversations = read_rows(data.conversations, False, cfg.max_samples, errors) if data.conversations else None
    report["data"] = {k: v for k, v in data.model_dump().items() if v is not None}
    report["rows"] = {k: len(v) for k, v in (("captions", captions), ("conversations", conversations)) if v}
    if "lm_loss" in metrics:
        sets = {}
        if captions:
            sets["captions"] = (data.manifest, captions, captions_root)
        if conversations:
            sets["conversations"] = (data.conversations, conversations, qa_root)
        report["lm_loss"] = lm_loss_metrics(model, info, cfg, sets, template, say)
    if "alignment" in metrics:
        report["alignment"] = labels_alignment(model, captions, data.labels, captions_root, errors, cfg.top_k,
                                               cfg.batch_size, data.label_grid)
        a = report["alignment"]
        say(f"eval: nearest word = the labels' top-1 {_pct(a['nearest_word_accuracy'])}, in their top-{a['top_n']} "
            f"{_pct(a['nearest_word_in_top_n'])} (chance {_pct(a['nearest_word_chance'])}), TACS {a['tacs']:.4f}, "
            f"modality gap {a['modality_gap']:.4f} ({a['images']} images)")
    if "qa" in metrics:
        result, predictions = conversation_qa(model, conversations, qa_root, errors, template, cfg.max_new_tokens,
                                              cfg.batch_size)
        report["qa"], report["predictions"] = result, predictions
        say(f"eval: QA exact match {_pct(result['accuracy'])}, VQA accuracy {_pct(result['vqa_accuracy'])} on "
            f"{result['count']} questions of {result['conversations']} conversations")
    if "perplexity" in metrics:
        texts = training_texts([caption_of(r) for r in captions or []],
                               [r["conversations"] for r in conversations or []], model.tokenizer.eos_token or "")
        report["perplexity"] = perplexity_metrics(model, texts, info["base_llm_state"], cfg.batch_size)
        p = report["perplexity"]
        say(f"eval: perplexity {p['perplexity_before']:.3f} (base LLM) -> {p['perplexity_after']:.3f} (checkpoint)")
    report["errors"] = errors
    if errors:
        say(f"eval: {len(errors)} rows or images skipped (first: {errors[0]['reason']}); see report.json errors")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- the world


def _evaluate_world(cfg: EvalConfig, model, info: dict, metrics: list[str], template: str, report: dict,
                    say: Callable[[str], None]) -> None:
    records, qa = world_split(cfg.world, cfg.split, cfg.max_samples)
    images = image_tensors(model, cfg.world, records)
    report.update(world=cfg.world, split=cfg.split, images=len(records))
    if "alignment" in metrics:
        words, source = load_vocab_words(cfg.vocab, cfg.world)
        report["alignment"] = dict(alignment_metrics(model, images, records, words, cfg.top_k, cfg.batch_size),
                                   vocab_source=source)
        a = report["alignment"]
        say(f"eval: nearest-word accuracy {a['nearest_word_accuracy']:.4f} (chance {a['nearest_word_chance']:.4f}), "
            f"TACS {a['tacs']:.4f}, modality gap {a['modality_gap']:.4f}")
    if "qa" in metrics:
        by_id = {r["id"]: images[i] for i, r in enumerate(records)}
        result, predictions = qa_metrics(model, by_id, qa, template, cfg.max_new_tokens, cfg.batch_size)
        report["qa"] = result
        report["predictions"] = predictions
        say(f"eval: QA accuracy {result['accuracy']:.4f} on {result['count']} questions "
            + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in result["by_type"].items()))
    if "perplexity" in metrics:
        texts = split_texts(cfg.world, cfg.split, records, model.tokenizer.eos_token or "")
        report["perplexity"] = perplexity_metrics(model, texts, info["base_llm_state"], cfg.batch_size)
        p = report["perplexity"]
        say(f"eval: perplexity {p['perplexity_before']:.3f} (base LLM) -> {p['perplexity_after']:.3f} (checkpoint)")
    if "lm_loss" in metrics:  # the world's manifests are own data like any other
        keep = {r["id"] for r in records}
        sets = {}
        for name, file in (("captions", "pretrain.json"), ("conversations", "instruct.json")):
            uri = storage.join(cfg.world, cfg.split, file)
            rows = [r for r in read_rows(uri, name == "captions", None, [])
                    if r["id"] in keep or not (r["image"] or r["image_bytes"])]
            sets[name] = (uri, rows, storage.join(cfg.world, "images"))
        report["lm_loss"] = lm_loss_metrics(model, info, cfg, sets, template, say)


# --------------------------------------------------------------------------- the job


def evaluate(cfg: EvalConfig, log_fn: Optional[Callable[[str], None]] = None) -> dict:
    """Compute every metric of ``cfg`` (no files written); returns the report dict (with
    ``predictions``)."""
    say = log_fn or (lambda msg: log.info("%s", msg))
    started = time.time()
    device = device_of(cfg.device)
    metrics = eval_metrics(cfg)
    model, info = load_model(cfg.checkpoint, cfg.model, device, keep_base_llm="perplexity" in metrics,
                             keep_base="lm_loss" in metrics)
    say(f"eval: {info['stage']} checkpoint {info['checkpoint']} (step {info['step']}) on "
        + (f"{cfg.world} [{cfg.split}]" if cfg.world else ", ".join(v for v in (cfg.data.manifest,
                                                                               cfg.data.conversations) if v))
        + f": {', '.join(metrics)}")
    template = cfg.template
    if template == "auto" and info["config"].get("job") == "instruct":
        template = info["config"].get("template", "auto")
    report: dict = {"checkpoint": info["checkpoint"], "stage": info["stage"], "step": info["step"],
                    "run": info["config"].get("run", {}).get("name")}
    if cfg.world:
        _evaluate_world(cfg, model, info, metrics, template, report, say)
    else:
        _evaluate_data(cfg, model, info, metrics, template, report, say)
    if "perplexity" in metrics and cfg.perplexity_texts:
        report["perplexity_texts"] = text_perplexities(model, cfg.perplexity_texts, info["base_llm_state"],
                                                       cfg.batch_size)
        for name, p in report["perplexity_texts"].items():
            say(f"eval: perplexity on {name} {p['perplexity_before']:.3f} (base LLM) -> {p['perplexity_after']:.3f} "
                f"(checkpoint)")
    report["seconds"] = round(time.time() - started, 2)
    return report


def run(cfg: EvalConfig) -> dict:
    """Evaluate and write the report (``report.json``, ``report.md``, ``plots/``, ``predictions.jsonl``)."""
    report = evaluate(cfg)
    paths = write_report(report, cfg)
    summary = {k: report[k] for k in ("checkpoint", "stage", "split", "images", "rows", "seconds") if k in report}
    if "alignment" in report:
        summary["nearest_word_accuracy"] = report["alignment"]["nearest_word_accuracy"]
        if "nearest_word_in_top_n" in report["alignment"]:
            summary["nearest_word_in_top_n"] = report["alignment"]["nearest_word_in_top_n"]
        summary["tacs"] = report["alignment"]["tacs"]
        summary["modality_gap"] = report["alignment"]["modality_gap"]
    if "qa" in report:
        summary["qa_accuracy"] = report["qa"]["accuracy"]
        if "vqa_accuracy" in report["qa"]:
            summary["vqa_accuracy"] = report["qa"]["vqa_accuracy"]
    if "perplexity" in report:
        summary["perplexity_before"] = report["perplexity"]["perplexity_before"]
        summary["perplexity_after"] = report["perplexity"]["perplexity_after"]
    for name, p in report.get("perplexity_texts", {}).items():
        summary[f"perplexity_{name}_before"], summary[f"perplexity_{name}_after"] = (p["perplexity_before"],
                                                                                     p["perplexity_after"])
    if "lm_loss" in report:
        summary["lm_loss"] = {name: dict(s["after"], before=s["before"])
                              for name, s in report["lm_loss"]["sets"].items()}
    if report.get("errors"):
        summary["errors"] = len(report["errors"])
    summary["report"] = paths
    return summary
