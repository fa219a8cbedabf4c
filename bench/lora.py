"""Instruct with LoRA vs full fine-tuning on the quickstart world, side by side in one run.

    python bench/lora.py --output out/lora-bench                       # ~1 h on 2 busy cores
    python bench/lora.py --output out/lora-bench --seeds 0 --lrs 3e-3  # one seed, one LoRA lr

1. ``full``: ``sea-ray quickstart`` at its defaults with one arm (``--arm``, +SEA) into
   ``OUTPUT/full``: world, labels, align, then instruct as the quickstart trains it (the adapter and
   the whole LLM, lr 1e-3, 450 steps x 8), then eval.
2. ``lora r<RANK> lr<LR>`` for every ``--lrs``: the same quickstart into its own folder, whose
   world, labels and align runs are copied from ``full`` first (every variant's instruct starts from
   the same align checkpoint; the quickstart reuses what is complete), its instruct training LoRA
   (``set.instruct.model.llm.lora``: rank, alpha = 2 x rank, dropout 0.05, all-linear) with the
   adapter, at ``instruct.lr=LR``; every other setting the same (steps, batch, schedule, seeds).

Each eval measures, on the world's test split, QA accuracy (greedy answers, exact match) and the
perplexity of the LLM alone on held-out text before (the shipped world LLM) and after instruct
(``sea-ray eval``'s ``perplexity``). The table: mean ± std over seeds, and the instruct stage's
throughput (samples/s, TensorBoard; the variants run one after another, so a machine whose load
changes makes that column incomparable). Never run by the tests; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import offline_env  # noqa: E402,F401 - the benchmarks' environment, before Ray or transformers


def quickstart(output: Path, seeds: list[int], arm: str, num_cpus: int, instruct: dict, lora: dict = None) -> dict:
    """One quickstart (``lora``: the instruct stage's ``model.llm.lora``); returns its results.json."""
    from sea_ray import quickstart as qs
    from sea_ray.config.loading import validate

    raw = {"job": "quickstart", "output": str(output), "seeds": seeds, "arms": [arm], "ray": {"num_cpus": num_cpus},
           "instruct": instruct}
    if lora:
        raw["set"] = {"instruct": {"model": {"llm": {"lora": lora}}}}
    qs.run(validate(raw, job="quickstart"))
    return json.loads((output / "results.json").read_text())


def seed_from(full: Path, out: Path) -> None:
    """``out`` starts with ``full``'s world, labels and align runs (complete: the quickstart reuses them)."""
    for name in ("world", "labels"):
        if not (out / name).exists():
            shutil.copytree(full / name, out / name, symlinks=True)
    for run in (full / "runs").glob("align-*"):
        if not (out / "runs" / run.name).exists():
            shutil.copytree(run, out / "runs" / run.name)


def throughput(output: Path) -> float:
    """The instruct stages' mean samples/s over their logged windows (TensorBoard)."""
    from sea_ray.eval.report import read_scalars

    rates = [v for run in (output / "runs").glob("instruct-*")
             for _, v in read_scalars(str(run)).get("samples_per_s", [])]
    return sum(rates) / len(rates) if rates else float("nan")


def row(name: str, results: dict, output: Path) -> dict:
    from sea_ray.eval.report import mean_std

    rs = results["results"]

    def ms(key, digits):
        m, s = mean_std([r[key] for r in rs])
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    return {"variant": name, "qa": ms("qa", 3), "ppl_before": ms("ppl_before", 2), "ppl_after": ms("ppl_after", 2),
            "per_seed": {r["seed"]: {"qa": round(r["qa"], 3), "ppl_after": round(r["ppl_after"], 2)} for r in rs},
            "samples_per_s": round(throughput(output), 1), "seconds": results["timings_s"]["total"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arm", default="+SEA", choices=["+SEA", "baseline"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="LoRA learning rates")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="reuse OUTPUT/full as it is (run once before)")
    args = parser.parse_args(argv)
    started = time.time()
    full = args.output / "full"
    rows = []
    results = json.loads((full / "results.json").read_text()) if args.skip_full else \
        quickstart(full, args.seeds, args.arm, args.num_cpus, {})
    rows.append(row("full fine-tuning (lr 1e-3)", results, full))
    for lr in args.lrs:
        out = args.output / f"lora-r{args.rank}-lr{lr:g}"
        seed_from(full, out)
        lora = {"enabled": True, "rank": args.rank, "alpha": 2 * args.rank}
        results = quickstart(out, args.seeds, args.arm, args.num_cpus, {"lr": lr}, lora)
        rows.append(row(f"LoRA r{args.rank} alpha {2 * args.rank} (lr {lr:g})", results, out))
    lines = ["| instruct | QA acc | perplexity before | perplexity after | instruct samples/s | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['qa']} | {r['ppl_before']} | {r['ppl_after']} | {r['samples_per_s']} | "
              f"{r['seconds']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    for r in rows:
        print(r["variant"], json.dumps(r["per_seed"]))
    (args.output / "lora_bench.json").write_text(json.dumps({"rows": rows, "table": table, "args": vars(args),
                                                             "seconds": round(time.time() - started)},
                                                            indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
