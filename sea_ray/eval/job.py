"""The eval job: a trained checkpoint on a held-out split of the synthetic world.

Run it::

    sea-ray eval --config workflows/configs/tiny_eval.yaml [checkpoint=URI output=DIR ...]

or from Python: ``sea_ray.eval.job.run(load_config(path, job="eval"))``.

Recipe (top to bottom in :func:`run`):

1. **load** the checkpoint (a step folder, or a run folder's newest complete one), its resolved
   config, and build the model it was trained with (or ``model:``); the trainable tensors it holds
   (adapter, and the LLM after instruct) replace the built ones;
2. **data**: the split's images with their ground-truth patch words, its ``qa.jsonl``, its text;
3. **alignment**: adapter outputs of every patch -> nearest vocabulary word (argmax cosine to the
   words' LLM targets, paper Eq. 10) vs the patch's true words; TACS and the modality gap against
   the captions' LLM token embeddings;
4. **qa**: greedy answers to every question, exact match after normalisation, per type;
5. **perplexity**: the LLM alone on the split's text (captions and conversations in the training
   formats), before (the model's base LLM) and after (the checkpoint's LLM);
6. **report**: ``report.json``, ``report.md``, ``plots/*.png``, ``predictions.jsonl`` in ``output``.

Everything runs in this process (pure PyTorch, CPU or one GPU): a tiny model evaluates in
seconds, a 7B one wants ``device: cuda``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

import torch

from sea_ray import storage
from sea_ray.config.schema import EvalConfig, VocabConfig
from sea_ray.constants import IMAGE_PLACEHOLDER
from sea_ray.data.images import decode_image
from sea_ray.data.templates import render_llava_v1
from sea_ray.errors import DataError
from sea_ray.eval.generate import answer
from sea_ray.eval.loading import device_of, load_model
from sea_ray.eval.metrics import (lm_nll, modality_gap, nearest_word_accuracy, normalize_answer, perplexity,
                                  qa_accuracy, tacs_mean)
from sea_ray.eval.report import write_report
from sea_ray.labels.vocab import build_vocab
from sea_ray.sea import word_targets
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
    out = []
    for rec in records:
        img, reason = decode_image(storage.read_bytes(storage.join(world, "images", rec["image"])))
        if img is None:
            raise DataError(f"{rec['image']}: {reason}")
        out.append(model.vision.transform(img))
    return torch.stack(out)


# --------------------------------------------------------------------------- metrics on a model


@torch.no_grad()
def alignment_metrics(model, images: torch.Tensor, records: list[dict], words: list[str], top_k: int = 10,
                      batch_size: int = 32) -> dict:
    """Nearest-word accuracy, TACS and modality gap of the adapter outputs (paper section 7)."""
    device = next(model.llm.parameters()).device
    table = model.input_embedding_table()
    targets, mapped, unmapped = word_targets(words, model.tokenizer, table)
    mapped_words = [words[i] for i in mapped]
    index = {w: i for i, w in enumerate(mapped_words)}
    grid = model.vision.grid
    visual = torch.cat([model.encode_images(images[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(images), batch_size)])  # [N, P, D]
    truth, groups, missing = [], [], set()
    for rec in records:
        for patch in patch_ground_truth(rec, grid[0], grid[1]):
            ids = [index[w] for w in patch if w in index]
            missing.update(w for w in patch if w not in index)
            truth.append(ids)
            groups.append("background" if len(patch) == 1 else "object")
    nw = nearest_word_accuracy(visual.reshape(-1, visual.shape[-1]), targets.cpu(), truth, groups)
    captions = [model.tokenizer(r["caption"], add_special_tokens=False)["input_ids"] for r in records]
    text = [table[torch.as_tensor(c, device=table.device)].float().cpu() for c in captions]
    predicted = nw.pop("predicted")
    counts: dict[str, int] = {}
    for p in predicted:
        counts[mapped_words[p]] = counts.get(mapped_words[p], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return {"nearest_word_accuracy": nw["accuracy"], "nearest_word_chance": nw["chance"],
            "nearest_word_by_group": nw["by_group"], "patches": nw["patches"],
            "most_predicted": [[w, round(c / len(predicted), 4)] for w, c in top],
            "tacs": tacs_mean(list(visual), text, top_k), "top_k": top_k,
            "modality_gap": modality_gap(visual.reshape(-1, visual.shape[-1]), torch.cat(text)),
            "vocab_size": len(mapped_words), "unmapped_words": unmapped, "truth_words_not_in_vocab": sorted(missing)}


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


def split_texts(world: str, split: str, records: list[dict], eos: str) -> list[str]:
    """The split's text in the training formats (captions as in ``plain``, conversations as in
    ``llava_v1``, without images), from its manifests."""
    keep = {r["id"] for r in records}
    texts = [r["caption"] + eos for r in records]
    rows = json.loads(storage.read_text(storage.join(world, split, "instruct.json")))
    for row in rows:
        if row.get("image") and row["id"] not in keep:
            continue
        turns = row["conversations"]
        pairs = [(turns[j]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, ""),
                  turns[j + 1]["value"]) for j in range(0, len(turns) - 1, 2)]
        texts.append(render_llava_v1(pairs, eos)[0])
    return texts


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


# --------------------------------------------------------------------------- the job


def evaluate(cfg: EvalConfig, log_fn: Optional[Callable[[str], None]] = None) -> dict:
    """Compute every metric of ``cfg`` (no files written); returns the report dict (with
    ``predictions``)."""
    say = log_fn or (lambda msg: log.info("%s", msg))
    started = time.time()
    device = device_of(cfg.device)
    model, info = load_model(cfg.checkpoint, cfg.model, device, keep_base_llm="perplexity" in cfg.metrics)
    say(f"eval: {info['stage']} checkpoint {info['checkpoint']} (step {info['step']}) on {cfg.world} "
        f"[{cfg.split}]")
    records, qa = world_split(cfg.world, cfg.split, cfg.max_samples)
    images = image_tensors(model, cfg.world, records)
    report: dict = {"checkpoint": info["checkpoint"], "stage": info["stage"], "step": info["step"],
                    "run": info["config"].get("run", {}).get("name"), "world": cfg.world, "split": cfg.split,
                    "images": len(records)}
    if "alignment" in cfg.metrics:
        words, source = load_vocab_words(cfg.vocab, cfg.world)
        report["alignment"] = dict(alignment_metrics(model, images, records, words, cfg.top_k, cfg.batch_size),
                                   vocab_source=source)
        a = report["alignment"]
        say(f"eval: nearest-word accuracy {a['nearest_word_accuracy']:.4f} (chance {a['nearest_word_chance']:.4f}), "
            f"TACS {a['tacs']:.4f}, modality gap {a['modality_gap']:.4f}")
    if "qa" in cfg.metrics:
        template = cfg.template
        if template == "auto" and info["config"].get("job") == "instruct":
            template = info["config"].get("template", "auto")
        by_id = {r["id"]: images[i] for i, r in enumerate(records)}
        result, predictions = qa_metrics(model, by_id, qa, template, cfg.max_new_tokens, cfg.batch_size)
        report["qa"] = result
        report["predictions"] = predictions
        say(f"eval: QA accuracy {result['accuracy']:.4f} on {result['count']} questions "
            + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in result["by_type"].items()))
    if "perplexity" in cfg.metrics:
        texts = split_texts(cfg.world, cfg.split, records, model.tokenizer.eos_token or "")
        report["perplexity"] = perplexity_metrics(model, texts, info["base_llm_state"], cfg.batch_size)
        p = report["perplexity"]
        say(f"eval: perplexity {p['perplexity_before']:.3f} (base LLM) -> {p['perplexity_after']:.3f} (checkpoint)")
    report["seconds"] = round(time.time() - started, 2)
    return report


def run(cfg: EvalConfig) -> dict:
    """Evaluate and write the report (``report.json``, ``report.md``, ``plots/``, ``predictions.jsonl``)."""
    report = evaluate(cfg)
    paths = write_report(report, cfg)
    summary = {k: report[k] for k in ("checkpoint", "stage", "split", "images", "seconds")}
    if "alignment" in report:
        summary["nearest_word_accuracy"] = report["alignment"]["nearest_word_accuracy"]
        summary["tacs"] = report["alignment"]["tacs"]
        summary["modality_gap"] = report["alignment"]["modality_gap"]
    if "qa" in report:
        summary["qa_accuracy"] = report["qa"]["accuracy"]
    if "perplexity" in report:
        summary["perplexity_before"] = report["perplexity"]["perplexity_before"]
        summary["perplexity_after"] = report["perplexity"]["perplexity_after"]
    summary["report"] = paths
    return summary
