"""The recipe of the synthetic world's backbones (the weights shipped in sea_ray/assets/world).

Trains the tiny open_clip CLIP (ClipLoss on world image-caption pairs) and the tiny Llama (world
text in the training stages' formats), then audits the CLIP's patch labels on held-out images of
another world seed. Run it::

    python workflows/backbones.py --out sea_ray/assets/world            # the shipped weights
    python workflows/backbones.py --out /tmp/bb --num-images 256 --clip-epochs 1 --llm-epochs 1   # a smoke run

``--device cuda`` trains on a GPU (the shipped weights were made that way: about a minute); on
2 CPU cores the full recipe takes tens of minutes. See sea_ray/backbones.py for what is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder: clip/, llm/, recipe.json, audit.json")
    parser.add_argument("--num-images", type=int, default=20000, help="world images the CLIP and LLM train on")
    parser.add_argument("--seed", type=int, default=1000, help="world seed of the training images (the quickstart "
                        "uses seed 0)")
    parser.add_argument("--clip-epochs", type=int, default=40)
    parser.add_argument("--clip-batch", type=int, default=128)
    parser.add_argument("--clip-lr", type=float, default=2e-3)
    parser.add_argument("--crop-fraction", type=float, default=0.3,
                        help="share of pairs that are a crop of one object captioned with that object alone")
    parser.add_argument("--llm-epochs", type=int, default=3)
    parser.add_argument("--llm-batch", type=int, default=64)
    parser.add_argument("--llm-lr", type=float, default=3e-3)
    parser.add_argument("--audit-seed", type=int, default=7, help="world seed of the held-out audit images")
    parser.add_argument("--audit-images", type=int, default=300)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip", choices=("clip", "llm"), action="append", default=[], help="train only the other")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sea_ray.backbones import audit_world_clip, train_world_clip, train_world_llm
    from sea_ray.data.world import ensure_world
    from sea_ray.labels.audit import to_markdown, write_report

    started = time.time()
    recipe = {"args": vars(args), "command": " ".join(["python", "workflows/backbones.py", *(argv or sys.argv[1:])])}
    if "clip" not in args.skip:
        recipe["clip"] = train_world_clip(os.path.join(args.out, "clip"), num_images=args.num_images, seed=args.seed,
                                          epochs=args.clip_epochs, batch_size=args.clip_batch, lr=args.clip_lr,
                                          crop_fraction=args.crop_fraction, threads=args.threads,
                                          device=args.device, log_fn=print)
        world = tempfile.mkdtemp(prefix="sea-audit-world-")
        ensure_world(world, num_images=args.audit_images, seed=args.audit_seed, image_size=64, splits=(0, 0, 1))
        report = audit_world_clip(os.path.join(args.out, "clip"), world, limit=None)
        write_report(report, os.path.join(args.out, "clip", "audit.json"))
        recipe["audit"] = {k: report[k] for k in ("images", "vocab_size", "chance_precision_at_1", "one_word",
                                                  "one_word_precision_at_1", "results")}
        print(to_markdown(report))
        shutil.rmtree(world, ignore_errors=True)
    if "llm" not in args.skip:
        recipe["llm"] = train_world_llm(os.path.join(args.out, "llm"), num_images=args.num_images, seed=args.seed,
                                        epochs=args.llm_epochs, batch_size=args.llm_batch, lr=args.llm_lr,
                                        threads=args.threads, device=args.device, log_fn=print)
    recipe["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=1, default=str)
    print(f"written to {args.out} in {recipe['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
