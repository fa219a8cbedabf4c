"""Benchmark: the paper's recipes at real width on the CPU (shape, dtype and memory bugs of the real
sizes show up here, not on a rented cluster).

Run (CPU; one combination at a time, each stage in its own process)::

    .venv/bin/python bench/real_size.py                              # every combination (hours on 2 cores)
    .venv/bin/python bench/real_size.py --only clip-l336-gemma2b     # one of them
    .venv/bin/python bench/real_size.py --dry-run                    # the tiny preset through the same steps, seconds

For each combination (a preset of ``sea_ray/presets.py``; its stages take every hyperparameter of
the ``workflows/configs/llava15_<family>_<stage>.yaml`` recipe that does not depend on the cluster),
built from its published architecture alone (:mod:`sea_ray.model.published`: the real tower with
random weights, the LLM at its real width but cut to ``--layers`` decoder layers, the synthetic
world's tokenizer standing in for the LLM's), three stages run, each in a fresh process:

- ``labels``: the labels job's :class:`~sea_ray.labels.labeler.PatchLabeler` (the recipe's
  labeler settings) on 16 synthetic-world images at the tower's resolution, one batch; its labels
  are written as a labels dataset for align;
- ``align``: 2 optimizer steps of :func:`sea_ray.train.loop.run_stage` (LocalIO: the recipe
  that Ray Train workers run, fed in process by the same feed) with SEA;
- ``instruct``: 2 optimizer steps from the align checkpoint's adapter, the LLM trained.

Batches: ``--per-worker`` samples per micro-batch, ``--global`` per step (accumulation between).
Weights: the LLM in bfloat16 where this CPU computes bf16 natively (``avx512_bf16`` / AMX, or a
bf16 matmul at least as fast as float32), else float32 (``--dtype`` forces one); a stage whose
predicted memory does not fit beside what is free is first tried with bfloat16 LLM weights, and is
skipped (with what it would need) when that does not fit either. A running stage whose resident
memory passes the limit, or that leaves less than 1 GB free, is killed and reported as such,
never the machine.

Printed per stage: the time of each step (labels: the batch of 16 images), the peak RSS of the
stage's process, the parameter count of the full-depth model and the FLOPs one step takes at full
depth, on the same batch:

- a matmul over ``N`` weights costs ``2 N`` FLOPs per token forward; attention ``4 L d S`` per token
  of a sequence of ``S`` (``L`` layers, ``d`` = heads x head dim; causal masking not subtracted);
- a trained part costs 3x its forward (forward + gradients of its inputs and weights); the frozen
  LLM of align, which gradients flow through to the adapter, costs its forward plus the input
  gradients (``2 N`` per token and twice its attention); the frozen tower runs forward only;
- the LLM's ``N`` is every parameter but the input embedding table (the output head is a matmul;
  a tied head counts once); the tower's ``N`` is its image encoder's; gradient checkpointing's
  recomputation is not counted (model FLOPs, as MFU counts them), nor norms, softmax or the SEA loss;
- labels: the tower forward plus the patch x vocabulary scoring, per image.

Time and memory are machine-dependent; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "TOKENIZERS_PARALLELISM": "false", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(REPO))

# preset -> the LLaVA-1.5 recipe family whose stage hyperparameters it runs with
COMBINATIONS = {
    "clip-l336-vicuna7b": "vicuna7b",
    "clip-l336-gemma2b": "gemma2b",
    "clip-l336-phi3mini": "vicuna7b",
    "clip-l336-llama3-8b": "vicuna7b",
    "siglip-so400m384-vicuna7b": "vicuna7b",
}
DRY_RUN = {"tiny-openclip-llama": "vicuna7b"}
STAGES = ("labels", "align", "instruct")
NUM_IMAGES = 16
RESERVE_GB = 2.0  # left free for the rest of the machine when a stage starts
MIN_FREE_GB = 1.0  # a running stage is killed when less than this is left free
GB = 1024 ** 3


# --------------------------------------------------------------------------- configs


def recipe(family: str, stage: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "workflows" / "configs" / f"llava15_{family}_{stage}.yaml").read_text())


def stage_config(stage: str, preset: str, family: str, work: Path, layers: int, dtype: str, per_worker: int,
                 global_size: int):
    """The recipe of ``stage`` with the cluster taken out: the model offline at ``layers`` decoder
    layers, the synthetic world's data, one CPU worker, 2 steps, outputs under ``work``."""
    from sea_ray.config.loading import validate
    from sea_ray.model.published import offline_model

    raw = recipe(family, stage)
    world = work / "world"
    raw["model"] = offline_model(preset, num_hidden_layers=layers, dtype=dtype)
    if stage == "labels":
        raw.update(output=str(work / "labels"), seed=0)
        raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("manifest", "image_root")}
        raw["data"].update(manifest=str(world / "train" / "pretrain.json"), image_root=str(world / "images"))
        raw["vocab"] = {"min_count": 1}
        raw["labeler"] = dict(raw.get("labeler") or {}, batch_size=NUM_IMAGES, precision="fp32")
        raw.pop("compute", None)
        # the classes' checks without the rules across fields: these refuse a Hugging Face tower
        # without a tokenizer, which the labeler here gets a stand-in for (_tower_with_text)
        from sea_ray.config.schema import LabelsConfig

        return LabelsConfig.model_validate(raw)
    manifest = "pretrain.json" if stage == "align" else "instruct.json"
    raw["data"] = dict(raw["data"], manifest=str(world / "train" / manifest), image_root=str(world / "images"))
    if stage == "align":
        raw["data"]["labels"] = str(work / "labels")
    else:
        raw["init_adapter"] = str(work / "runs" / "align")
        raw["strategy"] = "ddp"  # one process: nothing to shard
    raw["run"] = {"name": stage, "storage": str(work / "runs"), "seed": 0}
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}
    raw["batch"] = {"global_size": global_size, "per_worker": per_worker}
    raw["optim"] = dict(raw.get("optim") or {}, max_steps=2)
    raw["precision"] = "auto"  # fp32 compute on the CPU (bf16 autocast needs a GPU: config rules)
    raw.update(checkpoint={"every_n_steps": 1000}, log_every_n_steps=1, max_failures=0)
    return validate(raw)


# --------------------------------------------------------------------------- FLOPs


def llm_flops_parts(llm) -> dict:
    """(matmul weights, layers, attention width) of a (meta) LLM."""
    cfg = llm.config
    embed = llm.get_input_embeddings().weight
    total = sum(p.numel() for p in llm.parameters())
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is embed
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"N": total - (0 if tied else embed.numel()), "L": cfg.num_hidden_layers, "d": heads * head_dim}


def tower_flops(vlm, images: int) -> float:
    """Forward FLOPs of the image encoder over ``images`` images (class token included)."""
    from sea_ray.model.published import parameter_counts

    tower = vlm.vision
    n = parameter_counts(vlm)["image"]
    tokens = tower.num_patches + (1 if tower.has_cls else 0)
    return images * (2.0 * n * tokens + 4.0 * tower.num_layers * tower.width * tokens ** 2)


def step_flops(stage: str, full, lengths: list[int], images: int, vocab: int = 0) -> float:
    """FLOPs of one step of the full-depth model ``full`` (on the meta device) over sequences of
    ``lengths`` tokens (visual tokens included) and ``images`` images: see the module docstring."""
    from sea_ray.model.published import parameter_counts

    vision = tower_flops(full, images)
    if stage == "labels":
        return vision + images * 2.0 * full.vision.num_patches * vocab * full.vision.embed_dim
    parts = llm_flops_parts(full.llm)
    matmul = sum(2.0 * parts["N"] * s for s in lengths)
    attention = sum(4.0 * parts["L"] * parts["d"] * s * s for s in lengths)
    adapter = 6.0 * parameter_counts(full)["adapter"] * full.vision.num_patches * images
    if stage == "align":  # forward, then input gradients through the frozen LLM
        llm = (matmul + attention) + matmul + 2 * attention
    else:
        llm = 3 * (matmul + attention)
    return vision + adapter + llm


# --------------------------------------------------------------------------- the stages (child processes)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _tower_with_text(cfg):
    """The stage's tower; a Hugging Face tower built from its architecture has no tokenizer, so the
    world's stands in (its ids fit any text vocabulary here; the shapes are what is measured)."""
    import torch

    from sea_ray.model.llm import load_tokenizer
    from sea_ray.model.vision import build_vision_tower

    torch.manual_seed(0)
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect)
    if tower.backend == "hf" and tower._tokenizer is None:
        text = tower.model.config.text_config
        tower._tokenizer = load_tokenizer("world")
        tower._tokenizer.model_max_length = text.max_position_embeddings
    return tower


def run_labels(cfg, work: Path, full) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from sea_ray.data.manifest import read_manifest
    from sea_ray.labels.dataset import labels_table, write_labels
    from sea_ray.labels.labeler import PatchLabeler
    from sea_ray.labels.schema import SCHEMA_VERSION
    from sea_ray.labels.vocab import build_vocab, captions_of

    tower = _tower_with_text(cfg).eval()
    rows = read_manifest(cfg.data.manifest, require_image=True).rows[:NUM_IMAGES]
    vocab = build_vocab(captions_of(rows), cfg.vocab)
    start = time.perf_counter()
    labeler = PatchLabeler.from_config(tower, vocab.words, cfg.labeler)
    text_s = time.perf_counter() - start
    images = torch.stack([tower.transform(Image.open(Path(cfg.data.image_root) / r["image"]).convert("RGB"))
                          for r in rows])
    start = time.perf_counter()
    ids, scores = labeler.label(images)
    seconds = time.perf_counter() - start
    grid = tuple(tower.grid)
    meta = {"schema_version": SCHEMA_VERSION, "vocab": {"words": vocab.words, "hash": vocab.hash},
            "grid": list(grid), "top_n": labeler.top_n, "transform": tower.transform_spec(),
            "counts": {"images": len(rows)}}
    table = labels_table([r["id"] for r in rows], grid, labeler.top_n, ids.reshape(len(rows), -1).numpy(),
                         scores.reshape(len(rows), -1).numpy())
    write_labels(str(work / "labels"), table, meta)
    kept = float((ids >= 0).float().mean())
    return {"step_s": [seconds], "text_s": text_s, "images": len(rows), "vocab": len(vocab.words),
            "flops": step_flops("labels", full, [], len(rows), len(vocab.words)), "kept": round(kept, 3),
            "grid": list(grid), "dtype": str(next(tower.parameters()).dtype).replace("torch.", "")}


def run_train(cfg, full) -> dict:
    import numpy as np

    from sea_ray import storage
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.driver import run_uri
    from sea_ray.train.feed import materialize, memory_micro_batches, num_rows, order_of
    from sea_ray.train.loop import LocalIO, run_stage, total_steps

    tower = full.vision
    source = source_of(cfg, shared=False)
    rows = materialize(source, preprocess_kwargs(cfg, tower.image_size), in_process=True)
    n = num_rows(rows)
    steps = total_steps(cfg, n)
    lengths, images = [], []
    accum = cfg.batch.global_size // cfg.batch.per_worker
    for i, batch in enumerate(memory_micro_batches(rows, order_of(cfg, n), 1, 0, 0, steps)):
        if i % accum == 0:  # a step's first micro-batch
            lengths.append([])
            images.append(0)
        has = np.asarray(batch["has_image"], dtype=bool)
        lengths[-1] += [len(ids) - int(h) + (tower.num_patches if h else 0) for ids, h in zip(batch["input_ids"], has)]
        images[-1] += int(has.sum())
    reports = []
    times = [time.perf_counter()]

    def on_report(metrics: dict) -> None:
        times.append(time.perf_counter())
        reports.append(metrics)

    uri = run_uri(cfg)
    storage.makedirs(uri)
    run_stage(cfg, LocalIO(uri, rows, n, on_report))
    # each report closes one step's window: its samples/s gives the step's own time
    per_step = [cfg.batch.global_size / r["samples_per_s"] for r in reports]
    flops = [step_flops(cfg.job, full, lens, imgs) for lens, imgs in zip(lengths, images)]
    import torch

    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in full.llm.parameters()})
    return {"step_s": per_step, "flops": sum(flops) / len(flops), "tokens": [sum(x) for x in lengths],
            "loss": [round(float(r["loss_lm"]), 3) for r in reports],
            "loss_sea": [round(float(r["loss_sea"]), 3) for r in reports if "loss_sea" in r],
            "llm_dtype": cfg.model.llm.dtype, "threads": torch.get_num_threads()}


def child(args) -> None:
    """One stage of one combination, in this process; prints its result as the last line (JSON)."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    from sea_ray.model.published import build_offline

    work = Path(args.workdir)
    preset, family = args.combo, args.family
    cfg = stage_config(args.child, preset, family, work, args.layers, args.dtype, args.per_worker, args.global_size)
    full = build_offline(preset, image_aspect=cfg.data.image_aspect)  # the full-depth model, on the meta device
    if args.child == "labels":
        result = run_labels(cfg, work, full)
    else:
        result = run_train(cfg, full)
    result.update(stage=args.child, combo=preset, peak_rss_gb=round(_peak_rss_gb(), 2))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent: plan, guard, table


def bf16_native() -> bool:
    """Whether this CPU computes bf16 natively: its flags, or a bf16 matmul at least as fast as fp32."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        return True
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(8):
            a @ a
        rates[dtype] = time.perf_counter() - start
    return rates[torch.bfloat16] <= rates[torch.float32]


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("inf")


def _attention_scores_bytes(tower, images: int) -> int:
    """One encoder layer's attention scores and their softmax over ``images`` images, float32: the
    CPU attention materialises both (labels run without gradients, so one layer's are live at a time)."""
    if tower.backend == "hf":
        heads = tower.vision_model.config.num_attention_heads
    else:
        heads = tower.clip.visual.transformer.resblocks[0].attn.num_heads
    tokens = tower.num_patches + (1 if tower.has_cls else 0)
    return 2 * images * heads * tokens * tokens * 4


def predicted_gb(stage: str, preset: str, layers: int, dtype: str, per_worker: int) -> float:
    """What the stage needs resident, roughly: weights, gradients and AdamW states of what it
    trains (in the parameters' dtype), one serialised copy of the checkpointed tensors, the
    logits of a micro-batch (float32, three live copies), plus 1.5 GB of runtime. Labels: the
    tower's weights, its activations and one layer's attention scores (:func:`_attention_scores_bytes`)."""
    from sea_ray.model.published import build_offline

    vlm = build_offline(preset, num_hidden_layers=layers, dtype=dtype)
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    tower, adapter, llm = list(vlm.vision.parameters()), list(vlm.adapter.parameters()), list(vlm.llm.parameters())
    if stage == "labels":
        return (size(tower) + NUM_IMAGES * vlm.vision.num_patches * vlm.vision.width * 4 * 8
                + _attention_scores_bytes(vlm.vision, NUM_IMAGES)) / GB + 1.5
    trained = adapter + (llm if stage == "instruct" else [])
    vocab = vlm.llm.get_input_embeddings().num_embeddings
    logits = per_worker * (vlm.vision.num_patches + 64) * vocab * 4 * 3
    total = size(tower) + size(llm) + size(adapter) + 4 * size(trained) + logits
    return total / GB + 1.5


def _tree_rss_gb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
        return sum(p.memory_info().rss for p in procs if p.is_running()) / GB
    except psutil.NoSuchProcess:
        return 0.0


def run_child(args, stage: str, preset: str, family: str, dtype: str, limit_gb: float) -> dict:
    """One stage in a fresh process, killed when its resident memory passes ``limit_gb``."""
    cmd = [sys.executable, __file__, "--child", stage, "--combo", preset, "--family", family,
           "--workdir", str(args.work / preset), "--layers", str(args.layers), "--dtype", dtype,
           "--per-worker", str(args.per_worker), "--global", str(args.global_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak, killed = [0.0], [False]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_gb(proc.pid))
            if peak[0] > limit_gb or mem_available_gb() < MIN_FREE_GB:  # the machine's other users grow too
                killed[0] = f"{peak[0]:.1f} GB resident, {mem_available_gb():.1f} GB left free"
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if killed[0]:
        return {"stage": stage, "error": f"killed at {killed[0]} (limit {limit_gb:.1f} GB resident, "
                f"{MIN_FREE_GB:g} GB free)"}
    if proc.returncode:
        tail = "\n".join(err.strip().splitlines()[-25:])
        return {"stage": stage, "error": f"exit {proc.returncode}", "stderr": tail}
    result = json.loads(out.strip().splitlines()[-1])
    result["sampled_peak_gb"] = round(peak[0], 2)
    return result


def full_counts(preset: str, layers: int = 0) -> dict:
    from sea_ray.model.published import OPEN_CLIP_ARCHS, PUBLISHED, build_offline, parameter_counts
    from sea_ray.presets import get_preset

    counts = parameter_counts(build_offline(preset, num_hidden_layers=layers or None))
    section = get_preset(preset)
    llm_id = section["llm"].get("name_or_path")
    vision_id = OPEN_CLIP_ARCHS.get(section["vision"].get("name"), section["vision"].get("name"))
    counts["llm_published"] = PUBLISHED[llm_id].params if llm_id in PUBLISHED else None
    counts["image_published"] = PUBLISHED[vision_id].params if vision_id in PUBLISHED else None
    counts["vlm"] = counts["image"] + counts["adapter"] + counts["llm"]
    return counts


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table(results: list[dict]) -> str:
    head = ("| combination | stage | dtype | step times (s) | peak RSS (GB) | params full depth (image + adapter + "
            "LLM; published) | FLOPs/step full depth | notes |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        c = r["counts"]
        params = (f"{_fmt_params(c['vlm'])} ({_fmt_params(c['image'])} + {_fmt_params(c['adapter'])} + "
                  f"{_fmt_params(c['llm'])}; {c['image_published'] or '-'} / {c['llm_published'] or '-'})")
        if "error" in r or "skipped" in r:
            note = r.get("skipped") or r["error"] + (": " + r["stderr"].splitlines()[-1] if r.get("stderr") else "")
            lines.append(f"| {r['combo']} | {r['stage']} | {r.get('dtype', '-')} | - | - | {params} | - | {note} |")
            continue
        steps = ", ".join(f"{s:.1f}" for s in r["step_s"])
        notes = []
        if r["stage"] == "labels":
            notes.append(f"{r['images']} images, vocab {r['vocab']}, grid {r['grid'][0]}x{r['grid'][1]}, "
                         f"text tower {r['text_s']:.1f} s")
        else:
            notes.append(f"tokens/step {r['tokens']}, loss {r['loss']}" + (f", sea {r['loss_sea']}" if r["loss_sea"]
                                                                           else ""))
        if r.get("fallback"):
            notes.append(r["fallback"])
        if r.get("shared"):
            notes.append(r["shared"])
        lines.append(f"| {r['combo']} | {r['stage']} | {r.get('llm_dtype') or r.get('dtype')} | {steps} | "
                     f"{r['peak_rss_gb']:.2f} (tree {r['sampled_peak_gb']:.2f}) | {params} | {r['flops'] / 1e12:.2f} T | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset through the same steps (seconds)")
    parser.add_argument("--only", action="append", help="a combination (preset) to run; repeatable")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (in order)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the LLM that runs")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the LLM's weights (auto: bfloat16 where the CPU computes it natively)")
    parser.add_argument("--per-worker", type=int, default=1, help="samples per micro-batch")
    parser.add_argument("--global", dest="global_size", type=int, default=2, help="samples per optimizer step")
    parser.add_argument("--max-gb", type=float, default=None, help="memory limit of a stage (default: what is free "
                        f"less {RESERVE_GB:g} GB)")
    parser.add_argument("--workdir", help="where worlds, labels and runs go (default: a temporary folder)")
    # the child side
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--combo", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return []

    combos = dict(DRY_RUN if args.dry_run else COMBINATIONS)
    if args.only:
        unknown = [c for c in args.only if c not in COMBINATIONS and c not in DRY_RUN]
        if unknown:
            raise SystemExit(f"unknown combination(s) {unknown}; valid: {', '.join(COMBINATIONS)}")
        combos = {c: {**COMBINATIONS, **DRY_RUN}[c] for c in args.only}
    stages = [s for s in args.stages.split(",") if s]
    native = bf16_native()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if native else "float32")
    args.work = Path(args.workdir or tempfile.mkdtemp(prefix="sea-real-size-"))
    print(f"bf16 native on this CPU: {native}; LLM weights: {dtype}; LLM cut to {args.layers} decoder layers; "
          f"{args.per_worker} sample(s) per micro-batch, {args.global_size} per step; work dir {args.work}", flush=True)
    from sea_ray.world.generator import generate_world

    from sea_ray.model.published import build_offline, offline_model

    results, labelled = [], {}  # tower architecture -> (work dir, labels result): one label run serves every LLM
    for preset, family in combos.items():
        counts = full_counts(preset)
        size = build_offline(preset).vision.image_size
        generate_world(args.work / preset / "world", num_images=20, seed=0, image_size=size)  # 16 train images
        tower = json.dumps(offline_model(preset)["vision"], sort_keys=True)
        for stage in stages:
            if stage == "labels" and tower in labelled:  # the same world (seed, size): the same image ids
                source, earlier = labelled[tower]
                shutil.rmtree(args.work / preset / "labels", ignore_errors=True)
                shutil.copytree(args.work / source / "labels", args.work / preset / "labels")
                result = dict(earlier, combo=preset, counts=counts, shared=f"the labels of {source} (same tower)")
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "counts"}), flush=True)
                continue
            free = mem_available_gb()
            limit = min(args.max_gb or float("inf"), free - RESERVE_GB)
            want, use, fallback = predicted_gb(stage, preset, args.layers, dtype, args.per_worker), dtype, None
            if want > limit and dtype == "float32" and stage != "labels":
                bf = predicted_gb(stage, preset, args.layers, "bfloat16", args.per_worker)
                fallback = f"float32 needs ~{want:.1f} GB > limit {limit:.1f} GB: LLM in bfloat16 (~{bf:.1f} GB)"
                want, use = bf, "bfloat16"
            shutil.rmtree(args.work / preset / "runs" / stage, ignore_errors=True)  # a run folder resumes: start anew
            if want > limit:
                result = {"stage": stage, "dtype": use, "skipped": f"not run: needs ~{want:.1f} GB, the limit is "
                          f"{limit:.1f} GB ({free:.1f} GB free)"}
            else:
                result = run_child(args, stage, preset, family, use, limit)
                result["predicted_gb"] = round(want, 1)
                if fallback:
                    result["fallback"] = fallback
            result.update(combo=preset, counts=counts)
            results.append(result)
            if stage == "labels" and "error" not in result and "skipped" not in result:
                labelled[tower] = (preset, result)
            print(json.dumps({k: v for k, v in result.items() if k != "counts"}), flush=True)
            if "error" in result or "skipped" in result:
                break  # the later stages need this one's output
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
