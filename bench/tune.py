"""Benchmark of the search: ASHA + TPE against random search without early stopping, at an
equal trial budget, on the synthetic world (tiny models, oracle labels).

Run (CPU, a few minutes; starts its own local Ray)::

    .venv/bin/python bench/tune.py                    # 16 trials each, 24 steps per trial, seeds 0 and 1
    .venv/bin/python bench/tune.py --trials 24 --seeds 0 1 2 3
    .venv/bin/python bench/tune.py --dry-run          # 3 trials of 6 steps, to check it runs

Both searches run ``sea_ray.tune.search.run`` in the same Ray session on the same data, space,
held-out metric (``val_sea_loss``, see ``docs/tune.md``) and trial budget, one trial at a time so
that trial-steps are counted exactly (and TPE sees every finished trial):

- ``random``: ``searcher=random``, ASHA off: every trial trains all its steps;
- ``asha_tpe``: ``searcher=optuna`` (TPE, seeded) with ASHA on the metric reported every
  ``--every`` steps.

Per seed, the yardstick is the best metric random search found. For each search the script
prints the trial-steps it spent (all its trials' optimizer steps, in the order they happened)
until it first reported a metric at least that good; the last line is ``ratio: r`` = ASHA+TPE /
random, trial-steps summed over the seeds (``inf`` if ASHA+TPE missed the target of any seed).
Where random search finds its best is luck (its trials are exchangeable), so one seed says
little: use several. Trial-steps, not seconds: no wall-clock value is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
                     "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AIR_NEW_OUTPUT": "0"}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACE = {
    "sea.init_temperature": {"type": "loguniform", "low": 0.01, "high": 0.5},
    "sea.weight": {"type": "uniform", "low": 0.1, "high": 2.0},
    "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-2},
    "model.adapter.type": {"type": "choice", "values": ["linear", "mlp2x_gelu", "mlp3x_gelu"]},
    "sea.window": {"type": "choice", "values": [1, 2, 4]},
}


def _world(root: Path, images: int):
    from sea_ray.config.loading import validate
    from sea_ray.world.generator import generate_world
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.world.oracle import write_oracle_labels

    world, labels = root / "world", root / "labels"
    generate_world(world, num_images=images, seed=0, image_size=64)
    align = validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                      "data": {"manifest": "unused", "labels": str(labels)},
                      "batch": {"global_size": 8, "per_worker": 8}})
    tower = build_vision_tower(align.model.vision, align.data.image_aspect)
    write_oracle_labels(world, str(labels), 8, tower.transform_spec())
    return world, labels


def _config(args, world: Path, labels: Path, runs: Path, name: str, smart: bool):
    from sea_ray.config.loading import validate

    return validate({
        "job": "tune", "num_samples": args.trials, "max_concurrent": 1, "trial_cpus": 2,
        "report_every_n_steps": args.every, "seed": args.seed, "metric": "val_sea_loss", "mode": "min",
        "searcher": "optuna" if smart else "random", "optuna": {"n_startup_trials": args.startup},
        "asha": {"enabled": smart, "grace_period": args.grace, "reduction_factor": args.reduction}, "plots": False,
        "validation": {"num_images": 24, "lm_loss": False},
        "base": {"model": {"preset": "tiny-openclip-llama"}, "run": {"name": name, "storage": str(runs), "seed": 0},
                 "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images",
                          "labels": str(labels), "max_length": 48},
                 "batch": {"global_size": 8, "per_worker": 8}, "optim": {"max_steps": args.steps},
                 "checkpoint": {"every_n_steps": args.steps}, "sea": {"top_n": 3}},
        "space": SPACE,
    })


def trial_steps_to_reach(history, target: float):
    """(trial-steps spent until the first report with metric <= target, or None; total trial-steps).

    Reports are replayed in time order; the steps spent at a report are the sum over trials of the
    last step each had reported by then."""
    latest: dict[str, int] = {}
    reached = None
    for row in history.sort_values("timestamp").itertuples():
        latest[row.trial_id] = max(latest.get(row.trial_id, 0), int(row.step))
        if reached is None and row.val_sea_loss <= target + 1e-12:
            reached = sum(latest.values())
    return reached, sum(latest.values())


def expected_random_steps(history, target: float, steps: int) -> float:
    """Trial-steps random search needs to reach ``target``, averaged over every order of its
    trials (they are exchangeable: which one comes first is luck). With ``k`` of ``N`` trials
    reaching it, ``(N - k) / (k + 1)`` full trials come first on average, then the mean step at
    which those ``k`` reach it."""
    reach = []
    for _, trial in history.sort_values("step").groupby("trial_id"):
        hit = trial[trial["val_sea_loss"] <= target + 1e-12]
        if len(hit):
            reach.append(int(hit["step"].iloc[0]))
    n, k = history["trial_id"].nunique(), len(reach)
    return (n - k) / (k + 1) * steps + sum(reach) / k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trial budget of each search")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of a full trial")
    parser.add_argument("--every", type=int, default=3, help="report (and ASHA time unit) cadence in steps")
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period, in reports")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    parser.add_argument("--startup", type=int, default=4, help="random TPE start-up trials")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one pair of searches per seed")
    parser.add_argument("--images", type=int, default=120, help="synthetic-world images (80%% train)")
    parser.add_argument("--out", help="keep the experiments here (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="3 trials of 6 steps, one seed")
    args = parser.parse_args()
    if args.dry_run:
        args.trials, args.steps, args.every, args.startup, args.grace, args.seeds = 3, 6, 2, 1, 1, [0]
    logging.basicConfig(level=logging.WARNING)

    import pandas as pd
    import ray

    from sea_ray.tune.search import run

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sea-bench-tune-"))
    root.mkdir(parents=True, exist_ok=True)
    world, labels = _world(root, args.images)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    lines, spent, expected = [], {"random": [], "asha_tpe": []}, {}
    for seed in args.seeds:
        out = {}
        for name, smart in (("random", False), ("asha_tpe", True)):
            args.seed = seed
            start = time.perf_counter()
            summary = run(_config(args, world, labels, root / "runs", f"{name}-seed{seed}", smart))
            history = pd.read_parquet(root / "runs" / f"{name}-seed{seed}" / "history.parquet")
            out[name] = (summary, history, time.perf_counter() - start)
        target = float(out["random"][1]["val_sea_loss"].min())
        expected[seed] = expected_random_steps(out["random"][1], target, args.steps)
        for name, (summary, history, seconds) in out.items():
            reached, total = trial_steps_to_reach(history, target)
            spent[name].append(reached)
            lines.append(json.dumps({"seed": seed, "search": name, "target": round(target, 4),
                                     "trial_steps_to_reach": reached, "trial_steps_total": total,
                                     "best_val_sea_loss": round(float(history["val_sea_loss"].min()), 4),
                                     "status": summary["status"], "wall_s": round(seconds, 1)}))
    ray.shutdown()

    print(f"trial budget per search: {args.trials} trials of {args.steps} steps, reports every {args.every} steps; "
          f"seeds {args.seeds}")
    print("target per seed: the best val_sea_loss random search found with that seed")
    for line in lines:
        print(line)
    random_total = sum(spent["random"])
    if any(s is None for s in spent["asha_tpe"]):
        print("ASHA+TPE did not reach random search's best with seed(s) "
              f"{[s for s, r in zip(args.seeds, spent['asha_tpe']) if r is None]}")
        ratio = math.inf
    else:
        ratio = sum(spent["asha_tpe"]) / random_total
    print(f"trial-steps to reach (summed over seeds): random {random_total}, "
          f"asha_tpe {sum(s for s in spent['asha_tpe'] if s is not None)}")
    print(f"for reference, random search averaged over the orders of its trials: {sum(expected.values()):.0f} "
          f"trial-steps ({', '.join(f'seed {k}: {v:.0f}' for k, v in expected.items())})")
    print(f"ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
