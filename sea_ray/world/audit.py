"""The label audit: how often a patch's top-1 label is one of its true words (synthetic world).

For each feature variant (``joint``, ``dense``) x score sign (``raw``, ``negate``) the labeler of
a labels config is run on world images (in-process, pure PyTorch, no Ray) and compared with
:func:`sea_ray.world.generator.patch_ground_truth` on the tower's patch grid:

- ``precision@1``: among patches that got a label (top-1 score > 0), the fraction whose top-1
  word is one of the patch's true words (``[colour, shape]`` of an object, or the background
  colour);
- ``coverage``: the fraction of patches that got a label at all;
- ``hit_rate``: correct top-1 over all patches (= precision@1 x coverage);
- ``top_word`` / ``top_word_share``: the most frequent top-1 word and its share of the labelled
  patches (a degenerate labeler that says one word everywhere shows up here);
- baselines: ``chance`` (a uniformly random vocabulary word) and ``one_word`` (the best single
  word said everywhere, e.g. the most common background colour).

The vocabulary is the config's (built from its manifest's captions), so words that are never a
patch's truth (``left``, ``large``, ``background`` ...) count as wrong, as they would in training.
The audit decides the default ``labeler.score_sign`` and ``labeler.features``, but only with a
trained CLIP: on random weights every variant is near chance, which is what it should report.

Run it: ``sea-ray audit-labels --config workflows/configs/tiny_labels.yaml --world out/world``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from sea_ray import storage
from sea_ray.errors import DataError
from sea_ray.labels.regrid import resample
from sea_ray.labels.vocab import build_vocab, captions_of
from sea_ray.world.generator import load_ground_truth, patch_ground_truth

log = logging.getLogger(__name__)

VARIANTS = (("joint", "raw"), ("joint", "negate"), ("dense", "raw"), ("dense", "negate"))


def _world_samples(world_dir: str, manifest_ids: Optional[set[str]], limit: Optional[int]):
    records = load_ground_truth(world_dir)
    if manifest_ids:
        chosen = [r for r in records if r["id"] in manifest_ids]
        records = chosen or records
    return records[:limit] if limit else records


def _truth(records, grid, index, size) -> np.ndarray:
    """``truth[b, p, v]``: word ``v`` is a true word of patch ``p`` (on ``grid``) of image ``b``."""
    truth = np.zeros((len(records), grid[0] * grid[1], size), dtype=bool)
    for b, rec in enumerate(records):
        for p, words in enumerate(patch_ground_truth(rec, grid[0], grid[1])):
            for w in words:
                if w in index:
                    truth[b, p, index[w]] = True
    return truth


def _scores(top1: np.ndarray, truth: np.ndarray) -> tuple[Optional[float], float, float, np.ndarray]:
    """(precision@1, coverage, hit rate, labelled mask) of top-1 words ``top1 [B, P]`` (-1: none)."""
    labelled = top1 >= 0
    correct = np.zeros_like(labelled)
    b_idx, p_idx = np.nonzero(labelled)
    correct[b_idx, p_idx] = truth[b_idx, p_idx, top1[b_idx, p_idx]]
    n_lab = int(labelled.sum())
    precision = round(float(correct.sum() / n_lab), 4) if n_lab else None
    return precision, round(float(labelled.mean()), 4), round(float(correct.mean()), 4), labelled


def audit(cfg, world_dir: str, limit: Optional[int] = 200, batch_size: Optional[int] = None,
          variants=VARIANTS, transfer_grid: Optional[tuple[int, int]] = None) -> dict:
    """Run the audit for a :class:`sea_ray.config.schema.LabelsConfig` on the world at ``world_dir``.

    ``transfer_grid``: also score the labels resampled onto that grid (a tower with another grid,
    ``data.label_grid: resample``; :mod:`sea_ray.labels.regrid`) against the ground truth on it."""
    import torch

    from sea_ray.data.images import decode_image
    from sea_ray.data.manifest import read_manifest
    from sea_ray.labels.labeler import PatchLabeler, select_top_n
    from sea_ray.model.vision import build_vision_tower

    world_dir = str(world_dir)
    manifest = read_manifest(cfg.data.manifest, require_image=True)
    vocab = build_vocab(captions_of(manifest.rows), cfg.vocab)
    if not vocab.words:
        raise DataError(f"the vocabulary of {cfg.data.manifest} is empty")
    records = _world_samples(world_dir, {r["id"] for r in manifest.rows}, limit)
    if not records:
        raise DataError(f"no ground truth in {world_dir}")
    torch.manual_seed(cfg.seed)
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect).eval()
    grid = tower.grid
    images = []
    for rec in records:
        path = os.path.join(world_dir, "images", rec["image"])
        with open(path, "rb") as f:
            img, reason = decode_image(f.read())
        if img is None:
            raise DataError(f"{path}: {reason}")
        images.append(tower.transform(img))
    index = vocab.index()
    truth = _truth(records, grid, index, len(vocab))
    transfer_grid = tuple(int(x) for x in transfer_grid) if transfer_grid else None
    transfer_truth = _truth(records, transfer_grid, index, len(vocab)) if transfer_grid else None
    top_n = cfg.labeler.top_n if transfer_grid else 1  # the transfer resamples every stored label
    chance = float(truth.sum(-1).mean() / len(vocab))
    share = truth.reshape(-1, len(vocab)).mean(0)
    one_word = (vocab.words[int(share.argmax())], float(share.max()))
    x = torch.stack(images)
    bs = batch_size or cfg.labeler.batch_size
    rows = []
    features_cache: dict[str, torch.Tensor] = {}
    labeler = None
    for features, sign in variants:
        if labeler is None:
            labeler = PatchLabeler(tower, vocab.words, cfg.labeler.templates, top_n=1, score_sign="raw",
                                   features=features, precision="fp32",
                                   text_batch_size=cfg.labeler.text_batch_size)
        if features not in features_cache:
            labeler.features = features
            features_cache[features] = torch.cat([labeler.patch_features(x[i:i + bs]) for i in range(0, len(x), bs)])
        sim = features_cache[features] @ labeler.text.T
        ids, scores = select_top_n(-sim if sign == "negate" else sim, top_n)
        top1 = ids[..., 0].numpy()
        precision, coverage, hit_rate, labelled = _scores(top1, truth)
        n_lab = int(labelled.sum())
        counts = np.bincount(top1[labelled], minlength=len(vocab)) if n_lab else np.zeros(len(vocab), int)
        row = {"features": features, "score_sign": sign, "precision_at_1": precision, "coverage": coverage,
               "hit_rate": hit_rate, "labelled_patches": n_lab, "patches": int(labelled.size),
               "top_word": vocab.words[int(counts.argmax())] if n_lab else None,
               "top_word_share": round(float(counts.max() / n_lab), 4) if n_lab else None}
        if transfer_grid:
            moved = np.stack([resample(i, v.float().numpy(), grid, transfer_grid, top_n)[0].reshape(-1, top_n)[:, 0]
                              for i, v in zip(ids.numpy(), scores)])
            row["transferred_precision_at_1"], row["transferred_coverage"], _, _ = _scores(moved, transfer_truth)
        rows.append(row)
    return {"world": world_dir, "images": len(records), "grid": list(grid),
            "transfer_grid": list(transfer_grid) if transfer_grid else None, "vocab_size": len(vocab),
            "vocab_hash": vocab.hash, "chance_precision_at_1": round(chance, 4),
            "one_word_precision_at_1": round(one_word[1], 4), "one_word": one_word[0],
            "model": cfg.model.vision.model_dump(mode="json"), "weights": cfg.model.vision.weights or "random init",
            "seed": cfg.seed, "templates": list(cfg.labeler.templates), "results": rows}


def to_markdown(report: dict) -> str:
    moved = report.get("transfer_grid")
    extra = f" precision@1 on {moved[0]}x{moved[1]} (resampled) |" if moved else ""
    lines = [f"Label audit: {report['images']} world images, {report['grid'][0]}x{report['grid'][1]} patches, "
             f"{report['vocab_size']} words, vision weights: {report['weights']}", "",
             "| features | sign | precision@1 | coverage | hit rate | labelled patches | most said (share) |" + extra,
             "|---|---|---|---|---|---|---|" + ("---|" if moved else "")]
    for r in report["results"]:
        p1 = "-" if r["precision_at_1"] is None else f"{r['precision_at_1']:.4f}"
        cell = ""
        if moved:
            t = r.get("transferred_precision_at_1")
            cell = f" {'-' if t is None else f'{t:.4f}'} |"
        lines.append(f"| {r['features']} | {r['score_sign']} | {p1} | {r['coverage']:.4f} | {r['hit_rate']:.4f} "
                     f"| {r['labelled_patches']}/{r['patches']} | {r['top_word'] or '-'} "
                     f"({(r['top_word_share'] or 0):.2f}) |" + cell)
    lines += ["", f"baselines: a random vocabulary word {report['chance_precision_at_1']:.4f}; "
              f"'{report['one_word']}' said everywhere {report['one_word_precision_at_1']:.4f}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> tuple[str, str]:
    """Write ``out`` (JSON) and the Markdown table beside it (``.md``); returns both URIs."""
    md = (out[:-5] if out.endswith(".json") else out) + ".md"
    storage.write_text(out, json.dumps(report, indent=1) + "\n")
    storage.write_text(md, to_markdown(report))
    return out, md
