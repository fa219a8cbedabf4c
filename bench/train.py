"""Training benchmarks on the CPU: three ratios, each measured side by side in one run.

    python bench/train.py            # ~5-8 minutes on 2 cores
    python bench/train.py --quick    # a smoke run with tiny sizes (numbers meaningless)

- sea_overhead: steady-state align step time with SEA / without (same model, batch, data), for
  the tiny preset and for a ViT-B/32 + ~100M-parameter Llama preset. The last line reports the
  ~100M one (the paper: +10-20 min on a 6-10 h run, i.e. <= 1.03).
- ray_train_overhead: steady-state step time under TorchTrainer (1 worker, Ray Data ingest) /
  the same recipe in a plain loop over pre-made batches. Both run with one torch thread (a
  1-CPU Ray Train worker gets OMP_NUM_THREADS=1).
- ingest_headroom: batches/s of the training preprocessing alone (Ray Data) / batches/s the
  training step consumes.

Steady state: every recipe logs samples/s over windows of ``steps // 2`` optimizer steps; the
last window (after warm-up) is the one compared. Never run by the tests; tests assert no time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import offline_env  # noqa: E402,F401 - the benchmarks' environment, before Ray or transformers


def align_config(world: str, labels: str, runs: str, preset: str, steps: int, per_worker: int, sea: bool, name: str,
                 num_workers: int = 1, cpus_per_worker: float = 1.0):
    from sea_ray.config.loading import validate

    return validate({
        "job": "align", "model": {"preset": preset}, "run": {"name": name, "storage": runs, "seed": 0},
        "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images", "labels": labels,
                 "max_length": 64},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": cpus_per_worker},
        "batch": {"global_size": per_worker * num_workers, "per_worker": per_worker},
        "optim": {"max_steps": steps, "warmup_ratio": 0.0}, "checkpoint": {"every_n_steps": 10 * steps},
        "sea": {"enabled": sea, "top_n": 3}, "log_every_n_steps": max(1, steps // 2)})


def make_world(root: str, image_size: int, grid: int, num_images: int, preset: str):
    from sea_ray.config.loading import validate
    from sea_ray.world.generator import generate_world
    from sea_ray.world.oracle import write_oracle_labels
    from sea_ray.model.vision import build_vision_tower

    world, labels = f"{root}/world{image_size}", f"{root}/labels{image_size}"
    generate_world(world, num_images=num_images, seed=0, image_size=image_size)
    align = validate({"job": "align", "model": {"preset": preset}, "data": {"manifest": "x", "labels": "y"},
                      "batch": {"global_size": 1, "per_worker": 1}})
    tower = build_vision_tower(align.model.vision, align.data.image_aspect)
    # shards of 32 rows, as a labels job writes them (in fewer, bigger ones): the ingest streams
    write_oracle_labels(world, labels, grid, tower.transform_spec(), rows_per_shard=32)
    return world, labels


def cached_rows(cfg, image_size: int):
    """The training rows preprocessed once by the jobs' Preprocess on Ray Data (the feed's
    in-memory source): (rows, batches/s of that pipeline alone, source rows). The rate is taken
    from a second pass, after actor start-up."""
    from sea_ray.train.data import preprocess_kwargs, source_of
    from sea_ray.train.feed import materialize

    source = source_of(cfg)
    preprocess = preprocess_kwargs(cfg, image_size)
    materialize(source, preprocess, cfg.data.preprocess_actors, cfg.data.preprocess_cpus)  # warm-up
    start = time.perf_counter()
    rows = materialize(source, preprocess, cfg.data.preprocess_actors, cfg.data.preprocess_cpus)
    elapsed = time.perf_counter() - start
    return rows, len(rows["position"]) / cfg.batch.per_worker / elapsed, source.num_rows


def plain_rate(cfg, rows: dict, num_rows: int) -> float:
    """Steady-state samples/s of the recipe in a plain loop (LocalIO) over the pre-made rows."""
    from sea_ray.train.loop import LocalIO, run_stage

    reports = []
    run_stage(cfg, LocalIO(tempfile.mkdtemp(prefix="bench-run-"), rows, num_rows, on_report=reports.append))
    return reports[-1]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--repeats", type=int, default=2, help="alternating SEA / no-SEA runs per preset")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    big = "tiny-openclip-llama" if args.quick else "bench-vitb32-llama100m"
    steps = 4 if args.quick else 12
    per_worker = 4 if args.quick else 8
    root = tempfile.mkdtemp(prefix="sea-bench-")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    sizes = {"tiny-openclip-llama": (64, 8), big: (64, 8) if args.quick else (224, 7)}
    worlds = {p: make_world(root, size, grid, 64 if args.quick else 160, p) for p, (size, grid) in sizes.items()}

    # 1) SEA overhead, alternating runs to spread drift over both arms
    overhead = {}
    cache = {}
    for preset, (world, labels) in worlds.items():
        image_size = sizes[preset][0]
        cfg = align_config(world, labels, f"{root}/runs", preset, steps, per_worker, True, "sea")
        cache[preset] = cached_rows(cfg, image_size)
        made, _, rows = cache[preset]  # pre-made rows, source rows
        rates = {True: [], False: []}
        for _ in range(args.repeats):
            for sea in (True, False):
                run_cfg = align_config(world, labels, f"{root}/runs", preset, steps, per_worker, sea,
                                       f"sea-{sea}-{time.time_ns()}")
                rates[sea].append(plain_rate(run_cfg, made, rows))
        overhead[preset] = statistics.median(rates[False]) / statistics.median(rates[True])
        print(f"{preset}: samples/s with SEA {statistics.median(rates[True]):.2f}, "
              f"without {statistics.median(rates[False]):.2f} -> step time ratio {overhead[preset]:.3f}", flush=True)

    # 2) Ray Train overhead and 3) ingest headroom, on the big preset
    from sea_ray.train.driver import run

    world, labels = worlds[big]
    made, iter_rate, rows = cache[big]
    cfg = align_config(world, labels, f"{root}/runs", big, steps, per_worker, True, "ray-train")
    trained = run(cfg)["metrics"]["samples_per_s"]
    plain = plain_rate(align_config(world, labels, f"{root}/runs", big, steps, per_worker, True, "plain"),
                       made, rows)
    consumed = trained / per_worker
    print(f"{big}: samples/s under TorchTrainer {trained:.2f}, plain loop {plain:.2f}; "
          f"iterator alone {iter_rate:.2f} batches/s, training consumes {consumed:.2f} batches/s", flush=True)
    ray.shutdown()
    print(f"sea_overhead_tiny: {overhead['tiny-openclip-llama']:.3f}")
    print(f"sea_overhead: {overhead[big]:.3f}")
    print(f"ray_train_overhead: {plain / trained:.3f}")
    print(f"ingest_headroom: {iter_rate / consumed:.2f}")


if __name__ == "__main__":
    main()
