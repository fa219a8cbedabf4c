r"""The recipe of the synthetic world's backbones (the weights shipped in sea_ray/assets/world).

Trains the tiny open_clip CLIP (ClipLoss on world image-caption pairs) and the tiny Llama (world
text in the training stages' formats), then audits the CLIP's patch labels on held-out images of
another world seed. Run it::

    python workflows/backbones.py --out sea_ray/assets/world --device cuda     # the shipped weights
    python workflows/backbones.py --out sea_ray/assets/world --skip clip --llm-layers 8 --threads 1
                                               # the study's 8-layer Llama (llm-8l/; 2 layers likewise)
    python workflows/backbones.py --out /tmp/bb --clip-num-images 256 --clip-epochs 1 --llm-num-images 256 \
        --llm-epochs 1 --audit-images 20                                      # a smoke run

``--device cuda`` trains on a GPU (the shipped weights were made that way: about two minutes); on
2 CPU cores the full recipe takes tens of minutes. See sea_ray/world/backbones.py for what is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


# flag -> (function, keyword); unset flags keep the function's default (the shipped recipe)
CLIP_FLAGS = {"seed": "seed", "clip_num_images": "num_images", "clip_epochs": "epochs", "clip_stop_epoch": "stop_epoch",
              "clip_batch": "batch_size", "clip_lr": "lr", "crop_fraction": "crop_fraction",
              "crop_captions": "crop_captions", "background_share": "background_share", "device": "device",
              "threads": "threads"}
LLM_FLAGS = {"seed": "seed", "llm_num_images": "num_images", "llm_epochs": "epochs", "llm_batch": "batch_size",
             "llm_lr": "lr", "device": "device", "threads": "threads"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="output folder: clip/, llm/, recipe.json")
    parser.add_argument("--seed", type=int, help="world seed of the training images (default 1000; the quickstart "
                        "uses world seed 0)")
    parser.add_argument("--clip-num-images", type=int, help="world images the CLIP trains on")
    parser.add_argument("--clip-epochs", type=int, help="epochs the learning-rate schedule spans")
    parser.add_argument("--clip-stop-epoch", type=int, help="stop after this many epochs (the shipped run stopped "
                        "after 19 of 25); equal to --clip-epochs = run them all")
    parser.add_argument("--clip-batch", type=int)
    parser.add_argument("--clip-lr", type=float)
    parser.add_argument("--crop-fraction", type=float, help="share of the pairs that are crops")
    parser.add_argument("--crop-captions", choices=("words", "object"),
                        help="object crops captioned by colour, shape or both (words) or by both (object)")
    parser.add_argument("--background-share", type=float, help="share of the crops that hold background only")
    parser.add_argument("--llm-num-images", type=int, help="world images whose text the LLM reads")
    parser.add_argument("--llm-epochs", type=int)
    parser.add_argument("--llm-batch", type=int)
    parser.add_argument("--llm-lr", type=float)
    parser.add_argument("--llm-layers", type=int, help="decoder layers of the Llama (default 4, written to llm/; "
                        "another depth to llm-<L>l/, as the 2- and 8-layer Llamas of the study were)")
    parser.add_argument("--audit-seed", type=int, default=7, help="world seed of the held-out audit images")
    parser.add_argument("--audit-images", type=int, default=300)
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--skip", choices=("clip", "llm"), action="append", default=[], help="train only the other")
    args = parser.parse_args(argv)
    given = vars(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sea_ray.presets import WORLD_LLM_CONFIG, world_llm_config, world_llm_dir
    from sea_ray.world.audit import to_markdown, write_report
    from sea_ray.world.backbones import audit_world_clip, train_world_clip, train_world_llm
    from sea_ray.world.generator import ensure_world

    started = time.time()
    recipe = {"args": given, "command": " ".join(["python", "workflows/backbones.py",
                                                  *(sys.argv[1:] if argv is None else argv)])}
    if "clip" not in args.skip:
        kwargs = {kw: given[flag] for flag, kw in CLIP_FLAGS.items() if flag in given}
        recipe["clip"] = train_world_clip(os.path.join(args.out, "clip"), log_fn=print, **kwargs)
        world = tempfile.mkdtemp(prefix="sea-audit-world-")
        ensure_world(world, num_images=args.audit_images, seed=args.audit_seed, image_size=64, splits=(0, 0, 1))
        report = audit_world_clip(os.path.join(args.out, "clip"), world, limit=None)
        write_report(report, os.path.join(args.out, "clip", "audit.json"))
        recipe["audit"] = {k: report[k] for k in ("images", "vocab_size", "chance_precision_at_1", "one_word",
                                                  "one_word_precision_at_1", "results")}
        print(to_markdown(report))
        shutil.rmtree(world, ignore_errors=True)
    if "llm" not in args.skip:
        kwargs = {kw: given[flag] for flag, kw in LLM_FLAGS.items() if flag in given}
        layers = given.get("llm_layers", WORLD_LLM_CONFIG["num_hidden_layers"])
        folder = os.path.basename(world_llm_dir(layers))  # as sea_ray ships it: llm/, llm-<L>l/
        recipe["llm"] = train_world_llm(os.path.join(args.out, folder), log_fn=print,
                                        config=world_llm_config(layers), **kwargs)
    recipe["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=1, default=str)
    print(f"written to {args.out} in {recipe['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
