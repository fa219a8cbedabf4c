"""Benchmark of the labels job: the whole Ray Data job vs the labeler alone, side by side.

Run (CPU, a few minutes; starts its own local Ray unless one is running in this process)::

    .venv/bin/python bench/labels.py                      # ViT-B-32-sized open_clip, random weights
    .venv/bin/python bench/labels.py --images 256 --ship float32
    .venv/bin/python bench/labels.py --dry-run            # tiny tower, 64 px, seconds
    .venv/bin/python bench/labels.py --dry-run --sizes 1000 4000   # + the driver's peak RSS, minutes

Both measurements use the same tower (seeded random weights), the same vocabulary, the same
batch size and the same torch thread count, on synthetic-world images:

- ``labeler_alone_img_s``: :meth:`PatchLabeler.label` over pre-made, already transformed tensors
  (after one warm-up batch), in this process;
- ``end_to_end_img_s``: ``sea_ray.labels.job.run`` from start to ``_SUCCESS`` (manifest read,
  vocabulary, tower probe, actor start-up, read -> decode -> label -> Parquet write), Ray already up.

The last four lines are ``labeler_alone_img_s``, ``end_to_end_img_s``, ``ratio`` (end-to-end /
alone) and ``bytes_per_image`` (bytes shipped from the decode tasks to the labeler per image).

``--sizes N [N ...]`` (default with ``--dry-run``: 32 64) adds, before them, the driver's memory:
the whole job on the first N train images of one world, each size in a fresh driver process
connected to the same Ray, with the tiny tower at 96 px in 4 px patches: a 24 x 24 grid, so every
image carries LCS-558K's 576 patches x top-10 labels (34.6 KB of ids and scores). A thread samples
the driver's resident memory every 10 ms during ``run()``; the lines are
``driver_peak_rss_mb_<N>`` per size and ``driver_peak_rss_ratio`` (largest size / smallest).
No wall-clock value is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

VIT_B_32 = {"backend": "open_clip", "name": "ViT-B-32", "weights": None, "custom": None}
# the tiny tower's widths with LCS-558K's grid: 96 px in 4 px patches = 24 x 24 (the driver-memory runs)
RSS_IMAGE_SIZE = 96
TINY_24x24 = {"backend": "open_clip", "name": "custom", "weights": None, "custom": {
    "embed_dim": 64, "vision_cfg": {"image_size": RSS_IMAGE_SIZE, "patch_size": 4, "width": 64, "layers": 3,
                                    "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}}
REPO = Path(__file__).resolve().parents[1]


def _cores() -> int:
    """Cores this process may run on (taskset / cgroup affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _config(args, world: Path, output: Path):
    from sea_ray.config.loading import validate

    model = {"preset": "tiny-openclip-llama"}
    if not args.dry_run:
        model["vision"] = dict(VIT_B_32)
    threads = args.threads or _cores()
    return validate({
        "job": "labels", "output": str(output), "seed": 0, "model": model,
        "ray": {"num_cpus": args.num_cpus or _cores()},
        "data": {"manifest": str(world / "train" / "pretrain.json"), "image_root": str(world / "images")},
        "vocab": {"min_count": 1},
        "labeler": {"top_n": 10, "batch_size": args.batch_size},
        "compute": {"num_actors": 1, "cpus_per_actor": args.cpus_per_actor, "torch_threads": threads,
                    "cpus_per_decode_task": args.cpus_per_decode_task, "rows_per_shard": args.rows_per_shard,
                    "decode_batch_size": args.decode_batch_size, "ship": args.ship},
    })


def labeler_alone(cfg, world: Path, threads: int, limit: int) -> tuple[float, int]:
    """(images/s, images) of the labeler on pre-made tensors, same tower/vocab/batch size as the job."""
    import torch

    from sea_ray.data.images import decode_image
    from sea_ray.data.manifest import read_manifest
    from sea_ray.labels.labeler import PatchLabeler
    from sea_ray.labels.vocab import build_vocab, captions_of
    from sea_ray.model.vision import build_vision_tower

    torch.set_num_threads(threads)
    rows = read_manifest(cfg.data.manifest, require_image=True).rows
    vocab = build_vocab(captions_of(rows), cfg.vocab)  # the job's vocabulary: all rows' captions
    rows = rows[:limit]
    torch.manual_seed(cfg.seed)
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect).eval()
    labeler = PatchLabeler.from_config(tower, vocab.words, cfg.labeler)
    tensors = []
    for r in rows:
        img, _ = decode_image((world / "images" / r["image"]).read_bytes())
        tensors.append(tower.transform(img))
    x = torch.stack(tensors)
    bs = cfg.labeler.batch_size
    labeler.label(x[:bs])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), bs):
        labeler.label(x[i:i + bs])
    return len(x) / (time.perf_counter() - start), len(x)


def end_to_end(cfg) -> dict:
    from sea_ray.labels.job import run

    start = time.perf_counter()
    summary = run(cfg)
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def rss_child(args) -> None:
    """One driver: the labels job on ``--rss-child`` images; prints its memory as one JSON line."""
    from sea_ray.config.loading import validate
    from sea_ray.labels.job import run
    from sea_ray.runtime import init_ray

    work = Path(args.workdir)
    n = args.rss_child
    cfg = validate({
        "job": "labels", "output": str(work / f"rss_labels_{n}"), "seed": 0,
        "model": {"preset": "tiny-openclip-llama", "vision": TINY_24x24},
        "ray": {"address": args.ray_address},
        "data": {"manifest": str(work / f"rss_manifest_{n}.json"), "image_root": args.rss_images},
        "vocab": {"min_count": 1}, "labeler": {"top_n": 10, "batch_size": args.batch_size},
        "compute": {"num_actors": 1, "cpus_per_actor": args.cpus_per_actor, "rows_per_shard": args.rows_per_shard,
                    "cpus_per_decode_task": args.cpus_per_decode_task},
    })
    init_ray(cfg.ray, quiet=True)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            done.wait(0.01)

    before = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    top = max(peak[0], _rss_mb())
    stored = sum(p.stat().st_size for p in (Path(cfg.output) / "shards").rglob("*.parquet"))
    print(json.dumps({"images": summary["images_processed"], "rss_before_run_mb": round(before, 1),
                      "peak_rss_mb": round(top, 1), "growth_mb": round(top - before, 1),
                      "driver_received_bytes": summary.get("driver_received_bytes"),
                      "labels_parquet_bytes_per_image": round(stored / max(1, summary["images_processed"]), 1),
                      "job_wall_s": round(seconds, 2)}), flush=True)


def driver_rss(args, work: Path, address: str) -> dict[int, dict]:
    """The driver's memory at each of ``args.sizes`` images, each in a fresh process (see the module doc)."""
    from sea_ray.world.generator import ensure_world

    sizes = sorted(set(args.sizes))
    world = work / f"world_{int(round(max(sizes) / 0.8))}_{RSS_IMAGE_SIZE}"
    ensure_world(world, int(round(max(sizes) / 0.8)), seed=0, image_size=RSS_IMAGE_SIZE)
    rows = json.loads((world / "train" / "pretrain.json").read_text())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    found = {}
    for n in sizes:
        if n > len(rows):
            raise SystemExit(f"--sizes {n}: the world has {len(rows)} train images")
        (work / f"rss_manifest_{n}.json").write_text(json.dumps(rows[:n]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(n), "--workdir", str(work),
               "--ray-address", address, "--rss-images", str(world / "images"),
               "--batch-size", str(args.batch_size), "--rows-per-shard", str(args.rows_per_shard),
               "--cpus-per-actor", str(args.cpus_per_actor), "--cpus-per-decode-task", str(args.cpus_per_decode_task)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the driver-memory run at {n} images failed:\n{done.stdout}\n{done.stderr}")
        found[n] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"driver at {n} images: {json.dumps(found[n])}", flush=True)
    return found


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000, help="train images of the synthetic world (the job's "
                    "fixed start-up weighs less the more it labels; see docs/labels.md)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--alone-images", type=int, default=256, help="images for each labeler-alone measurement")
    ap.add_argument("--decode-batch-size", type=int, default=None)
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--cpus-per-decode-task", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (both measurements); default: the "
                    "cores this process may use")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; default: the cores this "
                    "process may use")
    ap.add_argument("--ship", choices=["uint8", "float32"], default="uint8")
    ap.add_argument("--workdir", default=None, help="keep the world and outputs here (default: a temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="tiny tower, 64 px, 64 images (and the driver's memory "
                    "at 32 and 64): checks the bench runs")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="also measure the driver's peak RSS at these "
                    "image counts (a fresh driver process each; see the module doc)")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-images", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.rss_child is not None:
        return rss_child(args)
    if args.dry_run:
        args.images, args.image_size, args.rows_per_shard, args.alone_images = 64, 64, 32, 64
        args.sizes = args.sizes or [32, 64]

    from sea_ray.world.generator import ensure_world
    from sea_ray.runtime import init_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sea_ray_bench_"))
    n_total = int(round(args.images / 0.8))  # the train split is 80 %
    world = work / f"world_{n_total}_{args.image_size}"
    t = time.perf_counter()
    ensure_world(world, n_total, seed=0, image_size=args.image_size)
    print(f"world: {world} ({time.perf_counter() - t:.1f}s)", flush=True)
    out = work / f"labels_{int(time.time())}"
    cfg = _config(args, world, out)
    threads = cfg.compute.torch_threads

    load_start = os.getloadavg()[0]
    ray = init_ray(cfg.ray, quiet=True)  # the cluster start-up is not part of the job
    rss = driver_rss(args, work, ray.get_runtime_context().gcs_address) if args.sizes else {}
    # the labeler alone before and after the job (this machine may be shared: average the two)
    before, n = labeler_alone(cfg, world, threads, args.alone_images)
    e2e = end_to_end(cfg)
    after, _ = labeler_alone(cfg, world, threads, args.alone_images)
    alone = (before + after) / 2
    e2e_rate = e2e["images_processed"] / e2e["wall_s"]
    meta = json.loads((out / "_meta.json").read_text())
    size = meta["transform"]["image_size"]
    e2e_grid = meta["grid"]
    shipped = size * size * 3 * (1 if cfg.compute.ship == "uint8" else 4)
    label_bytes = sum(p.stat().st_size for p in (out / "shards").rglob("*.parquet")) / max(1, e2e["images_processed"])
    steady = None
    if e2e.get("first_batch_s"):
        steady = e2e["images_processed"] / max(1e-9, e2e["wall_s"] - e2e["first_batch_s"])
    print(json.dumps({"model": "tiny (dry run)" if args.dry_run else "ViT-B-32 (random weights)",
                      "images": e2e["images_processed"], "alone_images": n,
                      "labeler_alone_before_after_img_s": [round(before, 3), round(after, 3)],
                      "image_size": size, "grid": e2e_grid, "batch_size": cfg.labeler.batch_size,
                      "torch_threads": threads, "cores": _cores(),
                      "load_avg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)], "ship": cfg.compute.ship,
                      "job_wall_s": round(e2e["wall_s"], 2), "job_first_batch_s": e2e.get("first_batch_s"),
                      "end_to_end_after_first_batch_img_s": round(steady, 3) if steady else None,
                      "labels_parquet_bytes_per_image": round(label_bytes, 1)}, indent=1), flush=True)
    result = {"labeler_alone_img_s": alone, "end_to_end_img_s": e2e_rate, "ratio": e2e_rate / alone,
              "bytes_per_image": shipped}
    if rss:
        small, large = min(rss), max(rss)
        result["driver_peak_rss_mb"] = {n: r["peak_rss_mb"] for n, r in rss.items()}
        result["driver_peak_rss_ratio"] = rss[large]["peak_rss_mb"] / rss[small]["peak_rss_mb"]
        for n, r in sorted(rss.items()):
            print(f"driver_peak_rss_mb_{n}: {r['peak_rss_mb']:.1f}")
        print(f"driver_peak_rss_ratio: {result['driver_peak_rss_ratio']:.3f}")
    print(f"labeler_alone_img_s: {alone:.3f}")
    print(f"end_to_end_img_s: {e2e_rate:.3f}")
    print(f"ratio: {e2e_rate / alone:.3f}")
    print(f"bytes_per_image: {shipped}")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
