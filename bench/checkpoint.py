"""Checkpoint benchmarks on the CPU: what a checkpoint costs the training, measured side by side in one run.

    python bench/checkpoint.py            # ~10-20 minutes on 2 cores, ~10 GB of memory at its peak
    python bench/checkpoint.py --quick    # a smoke run with tiny sizes (numbers meaningless)

Every arm is an instruct stage on Ray Train (2 FSDP2 workers, gloo) with an LLM built from a
Llama config at ``--hidden`` width (random weights; the tiny open_clip tower), trained with AdamW,
so a checkpoint holds the adapter and the whole LLM with its two AdamW moments (12 bytes per
parameter in float32).

- **Stall, sync vs async upload** (``--stall-layers`` decoder layers, storage: an S3 bucket on a
  moto server in this process, sharded checkpoints): three arms, checkpoints never (only at the
  last step) / every 2 steps uploaded synchronously / every 2 steps uploaded asynchronously
  (``checkpoint.upload``). The stall of one checkpoint is the arm's training time (from the end of
  the first optimizer step to the end of the last one, before its final save) minus the no-checkpoint
  arm's, per checkpoint in that window; it holds the time ``save`` blocks a worker (local write and,
  synchronously, the upload) and the slowdown of the steps that share the CPUs with a background
  upload. Printed: the table per arm and ``stall_async / stall_sync``.
- **Rank-0 memory, full vs sharded** (``--memory-layers`` decoder layers, the largest model here;
  storage: a local folder): one checkpoint each, ``checkpoint.format: full`` (rank 0 gathers the
  full state and writes it) vs ``sharded`` (each rank writes its shard). Measured inside each
  worker: its resident memory just before the save and its peak during the save (the kernel's
  high-water mark, reset before the save through ``/proc/self/clear_refs``). Printed: the table
  per rank and the ratio of rank 0's growth during the save, ``full / sharded``.

Time and memory are machine-dependent and this machine is shared; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import offline_env  # noqa: E402,F401 - the benchmarks' environment, before Ray or transformers


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def bench_worker(loop_config: dict) -> None:
    """The Ray Train worker of every arm: sea_ray's own worker (``train_loop``) with its ``save``
    and ``optimizer_step`` timed, and the memory around ``save`` recorded, into this rank's JSON."""
    import ray.train

    from sea_ray.train import loop

    rank = ray.train.get_context().get_world_rank()
    record = {"rank": rank, "steps": [], "saves": []}
    real_save, real_step = loop.save, loop.optimizer_step

    def optimizer_step(st):
        real_step(st)
        record["steps"].append(time.perf_counter())

    def save(st, metrics):
        try:  # reset the high-water mark to the current resident set (Linux; needs no privilege)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        real_save(st, metrics)
        record["saves"].append({"step": st.state["step"], "blocked_s": time.perf_counter() - start,
                                "rss_before_mb": before / 1024,
                                "peak_mb": _status_kb("VmHWM") / 1024 if reset else None})

    loop.save, loop.optimizer_step = save, optimizer_step
    try:
        loop.train_loop(loop_config)
    finally:
        with open(os.path.join(loop_config["bench_out"], f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def instruct_config(world: str, storage_uri: str, name: str, hidden: int, layers: int, steps: int, every: int,
                    fmt: str, upload: str):
    from sea_ray.config.loading import validate
    from sea_ray.presets import get_preset

    model = get_preset("tiny-openclip-llama")
    model["llm"] = {"config": {"model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
                               "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
                               "num_key_value_heads": max(1, hidden // 64), "max_position_embeddings": 256},
                    "tokenizer": "world"}
    return validate({
        "job": "instruct", "model": model, "strategy": "fsdp", "run": {"name": name, "storage": storage_uri, "seed": 0},
        "data": {"manifest": f"{world}/train/instruct.json", "image_root": f"{world}/images", "max_length": 64},
        "scaling": {"num_workers": 2}, "batch": {"global_size": 2, "per_worker": 1},
        "optim": {"max_steps": steps, "warmup_ratio": 0.0},
        "checkpoint": {"every_n_steps": every, "num_to_keep": 1, "format": fmt, "upload": upload},
        "log_every_n_steps": 1})


def run_arm(cfg, out: str) -> list[dict]:
    """One arm on Ray Train; the records of its ranks."""
    from sea_ray.train.driver import fit, loop_config, make_trainer, run_uri

    os.makedirs(out, exist_ok=True)
    config = dict(loop_config(cfg, run_uri(cfg)), bench_out=out)
    fit(make_trainer(cfg, bench_worker, config, callbacks=[]), f"bench {cfg.run.name}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(cfg.scaling.num_workers)]


def llm_parameters(cfg) -> int:
    import torch

    from sea_ray.model.llm import build_llm

    with torch.device("meta"):
        llm, _ = build_llm(cfg.model.llm)
    return sum(p.numel() for p in llm.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--hidden", type=int, default=1024, help="the LLM's width")
    parser.add_argument("--stall-layers", type=int, default=4, help="decoder layers of the stall arms' LLM")
    parser.add_argument("--memory-layers", type=int, default=16, help="decoder layers of the memory arms' LLM")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps of a stall arm (checkpoints every 2)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.stall_layers, args.memory_layers, args.steps = 64, 2, 2, 5

    import ray
    from moto.server import ThreadedMotoServer

    from sea_ray.world.generator import generate_world

    root = tempfile.mkdtemp(prefix="sea-bench-ckpt-")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    world = f"{root}/world"
    generate_world(world, num_images=40, seed=0, image_size=64)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    # 1) the stall of a checkpoint, sync vs async upload to S3
    arms = {"none": ("sync", 10 * args.steps), "sync": ("sync", 2), "async": ("async", 2)}
    stall_rows, windows = {}, {}
    for arm, (upload, every) in arms.items():
        cfg = instruct_config(world, "s3://bench/runs", f"stall-{arm}", args.hidden, args.stall_layers, args.steps,
                              every, "sharded", upload)
        records = run_arm(cfg, f"{root}/records/stall-{arm}")
        rank0 = records[0]
        steps = rank0["steps"]
        mid = [s for s in rank0["saves"] if s["step"] < args.steps]  # the final save is outside the window
        windows[arm] = (steps[-1] - steps[0], len(mid))
        durations = [b - a for a, b in zip(steps, steps[1:])]
        stall_rows[arm] = {"checkpoints in window": len(mid),
                           "blocked in save, s (rank 0, mean)": statistics.mean(s["blocked_s"] for s in mid) if mid else 0.0,
                           "median step, s": statistics.median(durations), "window, s": windows[arm][0]}
        print(f"stall arm {arm}: {stall_rows[arm]}", flush=True)
    params_stall = llm_parameters(cfg)
    base = windows["none"][0]
    for arm in ("sync", "async"):
        window, count = windows[arm]
        stall_rows[arm]["stall per checkpoint, s"] = (window - base) / max(1, count)
    stall_rows["none"]["stall per checkpoint, s"] = 0.0

    # 2) rank-0 memory of a checkpoint, full vs sharded
    memory_rows = {}
    for fmt in ("full", "sharded"):
        cfg = instruct_config(world, f"{root}/runs", f"memory-{fmt}", args.hidden, args.memory_layers, 2, 2, fmt,
                              "sync")
        records = run_arm(cfg, f"{root}/records/memory-{fmt}")
        for record in records:
            save = record["saves"][-1]
            memory_rows[(fmt, record["rank"])] = save
        print(f"memory arm {fmt}: {[r['saves'][-1] for r in records]}", flush=True)
    params_memory = llm_parameters(cfg)
    ray.shutdown()
    server.stop()

    print()
    print(f"Stall of a checkpoint: 2 FSDP workers, LLM {params_stall / 1e6:.1f}M parameters "
          f"(checkpoint ~{params_stall * 12 / 2**30:.2f} GiB), sharded, to a moto S3 server in this process")
    print(f"{'arm':<8}{'checkpoints':>12}{'blocked s':>11}{'median step s':>15}{'window s':>10}{'stall/ckpt s':>14}")
    for arm, row in stall_rows.items():
        print(f"{arm:<8}{row['checkpoints in window']:>12}{row['blocked in save, s (rank 0, mean)']:>11.2f}"
              f"{row['median step, s']:>15.2f}{row['window, s']:>10.2f}{row['stall per checkpoint, s']:>14.2f}")
    print()
    print(f"Memory of a checkpoint: 2 FSDP workers, LLM {params_memory / 1e6:.1f}M parameters "
          f"(checkpoint ~{params_memory * 12 / 2**30:.2f} GiB), to a local folder")
    print(f"{'format':<9}{'rank':>5}{'RSS before MB':>15}{'peak in save MB':>17}{'growth MB':>11}{'blocked s':>11}")
    for (fmt, rank), save in sorted(memory_rows.items()):
        peak = save["peak_mb"]
        growth = peak - save["rss_before_mb"] if peak is not None else float("nan")
        print(f"{fmt:<9}{rank:>5}{save['rss_before_mb']:>15.0f}{peak or float('nan'):>17.0f}{growth:>11.0f}"
              f"{save['blocked_s']:>11.2f}")
    print()
    sync_stall, async_stall = stall_rows["sync"]["stall per checkpoint, s"], stall_rows["async"]["stall per checkpoint, s"]
    blocked = stall_rows["async"]["blocked in save, s (rank 0, mean)"] / max(
        1e-9, stall_rows["sync"]["blocked in save, s (rank 0, mean)"])
    print(f"stall_async_over_sync: {async_stall / sync_stall:.3f}" if sync_stall > 0 else
          "stall_async_over_sync: n/a (the sync arm showed no stall)")
    print(f"blocked_async_over_sync: {blocked:.3f}")

    def growth(fmt):
        save = memory_rows[(fmt, 0)]
        return (save["peak_mb"] or float("nan")) - save["rss_before_mb"]

    def peak(fmt):
        return memory_rows[(fmt, 0)]["peak_mb"] or float("nan")

    print(f"rank0_save_growth_full_over_sharded: {growth('full') / max(1.0, growth('sharded')):.2f}")
    print(f"rank0_save_peak_full_over_sharded: {peak('full') / peak('sharded'):.2f}")


if __name__ == "__main__":
    main()
