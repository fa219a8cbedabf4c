"""Benchmark of the search: ASHA + TPE against random search without early stopping, at an
equal compute budget, on the synthetic world (tiny models, oracle labels).

Run (CPU; starts its own local Ray; about two minutes per seed on an idle 2-core machine)::

    .venv/bin/python bench/tune.py                       # 8 seeds, budget 32 full trials of 24 steps
    .venv/bin/python bench/tune.py --trials 16           # half that budget (both goals missed: docs/tune.md)
    .venv/bin/python bench/tune.py --startup 8 --random-from OUT --out OUT2   # another setting, same random runs
    .venv/bin/python bench/tune.py --dry-run             # 2 seeds, a budget of 3 trials of 6 steps

The budget is compute, counted in trial-steps (optimizer steps summed over trials):
``--trials`` full trials of ``--steps`` steps. Both searches run ``sea_ray.tune.search.run`` in
the same Ray session on the same data, space and held-out metric (``val_sea_loss``, see
``docs/tune.md``), one trial at a time so that trial-steps are counted exactly (and TPE sees
every finished trial):

- ``random``: ``searcher=random``, ASHA off: ``--trials`` trials, each trains all its steps;
- ``asha_tpe``: ``searcher=optuna`` (TPE, seeded) with ASHA on the metric reported every
  ``--every`` steps, free to start as many trials as the budget allows: a Tune stopper ends the
  search at the report where its trial-steps reach the budget.

A search's best is the best ``val_sea_loss`` any of its trials reported within the budget.
Printed: per seed and search its best, trials and trial-steps; the fraction of seeds where ASHA +
TPE's best is at least as good as random search's; the target, the median over the seeds of
random search's best, and the trial-steps ASHA + TPE spent on each seed until it first reported
a value at least that good (in time order). The last line is ``ratio: r`` = the median over the
seeds of those trial-steps / the budget (``inf`` where ASHA + TPE missed the target on half the
seeds or more; goal: at most 1/3, and ASHA + TPE better on at least 75% of the seeds). Before
them, one line per smaller budget of ``--also-trials`` (default 16 and 24 full trials) gives the
fraction and ratio judged on a cut of the same runs (``compare``). Trial-steps, not seconds: no
wall-clock value is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
                     "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AIR_NEW_OUTPUT": "0"}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACE = {
    "sea.init_temperature": {"type": "loguniform", "low": 0.02, "high": 0.5},
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


def _config(args, world: Path, labels: Path, runs: Path, name: str, smart: bool, trials: int):
    from sea_ray.config.loading import validate

    return validate({
        "job": "tune", "num_samples": trials, "max_concurrent": 1, "trial_cpus": 2,
        "report_every_n_steps": args.every, "seed": args.seed, "metric": "val_sea_loss", "mode": "min",
        "searcher": "optuna" if smart else "random",
        "optuna": {"n_startup_trials": args.startup, "gamma": args.gamma},
        "asha": {"enabled": smart, "grace_period": args.grace, "reduction_factor": args.reduction}, "plots": False,
        "validation": {"num_images": 24, "lm_loss": False},
        "base": {"model": {"preset": "tiny-openclip-llama"}, "run": {"name": name, "storage": str(runs), "seed": 0},
                 "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images",
                          "labels": str(labels), "max_length": 48},
                 "batch": {"global_size": 8, "per_worker": 8}, "optim": {"max_steps": args.steps},
                 "checkpoint": {"every_n_steps": args.steps}, "sea": {"top_n": 3}},
        "space": SPACE,
    })


def spend(history, budget: Optional[int] = None):
    """The reports of ``history`` in time order with the trial-steps spent when each was made (the
    sum over trials of the last step each had reported by then), cut at the report where the
    spending reaches ``budget``. Returns ``[(trial_steps, trial_id, value), ...]``."""
    latest: dict[str, int] = {}
    out = []
    for row in history.sort_values("timestamp").itertuples():
        latest[row.trial_id] = max(latest.get(row.trial_id, 0), int(row.step))
        out.append((sum(latest.values()), row.trial_id, float(row.val_sea_loss)))
        if budget is not None and out[-1][0] >= budget:
            break
    return out


def steps_to_reach(reports, target: float) -> Optional[int]:
    """Trial-steps spent at the first report at least as good as ``target`` (None: never)."""
    return next((spent for spent, _, value in reports if value <= target + 1e-12), None)


def expected_random_steps(history, target: float, steps: int) -> float:
    """Trial-steps random search needs to reach ``target``, averaged over every order of its
    trials (they are exchangeable: which one comes first is luck). With ``k`` of ``N`` trials
    reaching it, ``(N - k) / (k + 1)`` full trials come first on average, then the mean step at
    which those ``k`` reach it (inf when none does)."""
    reach = []
    for _, trial in history.sort_values("step").groupby("trial_id"):
        hit = trial[trial["val_sea_loss"] <= target + 1e-12]
        if len(hit):
            reach.append(int(hit["step"].iloc[0]))
    n, k = history["trial_id"].nunique(), len(reach)
    return math.inf if k == 0 else (n - k) / (k + 1) * steps + sum(reach) / k


def compare(histories, budget: int):
    """Both searches judged within ``budget`` trial-steps, from their histories
    (``{seed: {"random": history, "asha_tpe": history}}``). A search's path does not depend on its
    budget (random search runs its seeded trials in one order, one at a time; ASHA + TPE's stopper
    only ends its search), so a smaller budget is a cut of the same runs (checked in session 19: the
    16-trial cut of 32-trial runs gives the 16-trial runs' numbers exactly). Returns ``(best, wins,
    target, reach, median)``: each seed's and search's best, the seeds where ASHA + TPE's best is at
    least random search's, the median of random search's best, the trial-steps ASHA + TPE spent on
    each seed to reach it (None: never within the budget) and the median of those (inf when half or
    more are None)."""
    reports = {seed: {name: spend(h, budget) for name, h in pair.items()} for seed, pair in histories.items()}
    best = {seed: {name: min(value for _, _, value in r) for name, r in pair.items()} for seed, pair in reports.items()}
    wins = [seed for seed in best if best[seed]["asha_tpe"] <= best[seed]["random"] + 1e-12]
    target = statistics.median(b["random"] for b in best.values())
    reach = {seed: steps_to_reach(pair["asha_tpe"], target) for seed, pair in reports.items()}
    return best, wins, target, reach, statistics.median(math.inf if r is None else r for r in reach.values())


def budget_stopper(budget: int):
    """A Tune stopper that ends the search at the report where its trials' steps sum to ``budget``."""
    from ray import tune

    class Budget(tune.Stopper):
        def __init__(self):
            self.latest: dict[str, int] = {}

        def __call__(self, trial_id, result):
            if "step" in result:
                self.latest[trial_id] = max(self.latest.get(trial_id, 0), int(result["step"]))
            return self.stop_all()

        def stop_all(self):
            return sum(self.latest.values()) >= budget

    return Budget()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32, help="the budget, in full trials (random search's trials; "
                        "16 until session 19: docs/tune.md#benchmark)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of a full trial")
    parser.add_argument("--every", type=int, default=3, help="report (and ASHA time unit) cadence in steps")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period, in reports")
    parser.add_argument("--reduction", type=float, default=3, help="ASHA reduction factor")
    parser.add_argument("--startup", type=int, default=16, help="random TPE start-up trials (8 until session 11: "
                        "docs/tune.md#benchmark)")
    parser.add_argument("--gamma", type=float, default=0.25, help="TPE's good fraction (optuna.gamma)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="one pair of searches per seed")
    parser.add_argument("--images", type=int, default=120, help="synthetic-world images (80%% train)")
    parser.add_argument("--out", help="keep the experiments here (default: a temporary folder)")
    parser.add_argument("--random-from", help="take random search's runs from this earlier --out (same seeds, "
                        "budget, images and space) instead of running them again: they do not depend on the "
                        "ASHA or TPE settings")
    parser.add_argument("--also-trials", type=int, nargs="*", default=[16, 24], help="also judge both searches at "
                        "these smaller budgets (in full trials), cut from the same runs")
    parser.add_argument("--dry-run", action="store_true", help="2 seeds, a budget of 3 trials of 6 steps")
    args = parser.parse_args()
    if args.dry_run:
        args.trials, args.steps, args.every, args.startup, args.grace, args.seeds = 3, 6, 2, 1, 1, [0, 1]
    logging.basicConfig(level=logging.WARNING)
    budget = args.trials * args.steps
    # enough trials for ASHA + TPE to spend the budget even if every one stops at its first rung
    asha_trials = budget // min(args.steps, args.grace * args.every) + 1

    import pandas as pd
    import ray

    from sea_ray.tune.search import run

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sea-bench-tune-"))
    root.mkdir(parents=True, exist_ok=True)
    world, labels = _world(root, args.images)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    print(f"budget per search: {budget} trial-steps ({args.trials} full trials of {args.steps} steps); reports every "
          f"{args.every} steps; ASHA grace {args.grace} report(s), reduction factor {args.reduction}; TPE "
          f"{args.startup} start-up trials, gamma {args.gamma}; seeds {args.seeds}", flush=True)
    found = {}  # seed -> search -> its history (every report of every trial)
    for seed in args.seeds:
        args.seed = seed
        found[seed] = {}
        for name, smart in (("random", False), ("asha_tpe", True)):
            start = time.perf_counter()
            if args.random_from and not smart:  # an earlier run of the very same random search
                folder = Path(args.random_from) / "runs" / f"{name}-seed{seed}"
                summary = json.loads((folder / "summary.json").read_text())
                if summary["trial_steps"] != budget or summary["trials"] != args.trials:
                    raise SystemExit(f"{folder}: another budget ({summary['trials']} trials, "
                                     f"{summary['trial_steps']} trial-steps)")
                history = pd.read_parquet(folder / "history.parquet")
            else:
                cfg = _config(args, world, labels, root / "runs", f"{name}-seed{seed}", smart,
                              asha_trials if smart else args.trials)
                summary = run(cfg, stop=budget_stopper(budget) if smart else None)
                history = pd.read_parquet(root / "runs" / f"{name}-seed{seed}" / "history.parquet")
            reports = spend(history, budget)
            found[seed][name] = history
            print(json.dumps({"seed": seed, "search": name,
                              "best_val_sea_loss": round(min(value for _, _, value in reports), 4),
                              "trials": len({trial for _, trial, _ in reports}), "trial_steps": reports[-1][0],
                              "status": summary["status"], "wall_s": round(time.perf_counter() - start, 1)}),
                  flush=True)
    ray.shutdown()

    for trials in sorted(t for t in args.also_trials if t < args.trials):
        _, cut_wins, cut_target, _, cut_median = compare(found, trials * args.steps)
        print(f"at a budget of {trials} full trials ({trials * args.steps} trial-steps, cut from the same runs): "
              f"ASHA+TPE's best >= random search's on {len(cut_wins)}/{len(args.seeds)} seeds, target "
              f"{cut_target:.4f}, ratio {cut_median / (trials * args.steps):.3f}")
    _, wins, target, reach, median_steps = compare(found, budget)
    print(f"ASHA+TPE's best >= random search's best (val_sea_loss as low or lower) on {len(wins)}/{len(args.seeds)} "
          f"seeds: fraction {len(wins) / len(args.seeds):.3f} (seeds {wins})")
    expected = {seed: expected_random_steps(found[seed]["random"], target, args.steps) for seed in args.seeds}
    print(f"target: the median over the seeds of random search's best, val_sea_loss {target:.4f}")
    print("ASHA+TPE's trial-steps to reach it per seed: "
          + ", ".join(f"{seed}: {'never' if r is None else r}" for seed, r in reach.items())
          + f"; median {median_steps}")
    print("for reference, random search's trial-steps to reach it, averaged over the orders of its trials: "
          + ", ".join(f"{seed}: {v:.0f}" for seed, v in expected.items())
          + f"; median {statistics.median(expected.values()):.0f}")
    print(f"ratio: {median_steps / budget:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
