"""``sea-ray <verb>``: one table from verb to function.

Config verbs take ``--config FILE`` plus ``dotted.key=value`` overrides. Exit codes: 0 success,
2 configuration (or usage) error, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from sea_ray.errors import ConfigError, SeaRayError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="job config YAML")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")


# --------------------------------------------------------------------------- verbs


def cmd_validate(args) -> int:
    from sea_ray.checks import job_problems
    from sea_ray.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    problems = job_problems(cfg)
    if problems:
        raise ConfigError(problems, args.config)
    if args.print:
        print(json.dumps(to_dict(cfg), indent=2))
    print(f"{args.config}: valid {cfg.job} config")
    return EXIT_OK


def cmd_world(args) -> int:
    from sea_ray.data.world import generate_world

    summary = generate_world(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_presets(args) -> int:
    from sea_ray.presets import PRESETS

    for name, spec in PRESETS.items():
        llm = spec["llm"].get("name_or_path") or f"{spec['llm']['config']['model_type']} (random init)"
        vision = spec["vision"]["name"] if spec["vision"]["name"] != "custom" else f"tiny {spec['vision']['backend']}"
        print(f"{name:24s} vision={vision:16s} adapter={spec['adapter']['type']:11s} llm={llm}")
    return EXIT_OK


def cmd_job(args) -> int:
    """Every config job: load + validate everything, then hand the typed config to its runner."""
    import importlib

    from sea_ray.checks import job_problems
    from sea_ray.config import load_config

    cfg = load_config(args.config, args.overrides, job=args.verb)
    problems = job_problems(cfg)
    if problems:
        raise ConfigError(problems, args.config)
    module, _, func = JOB_RUNNERS[args.verb].partition(":")
    summary = getattr(importlib.import_module(module), func)(cfg)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return EXIT_OK


# verb -> "module:function" taking the validated config and returning a JSON-able summary
JOB_RUNNERS: dict[str, str] = {}


def _world_args(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)


def _validate_args(p):
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved config as JSON")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "validate": ("validate a job config without starting anything", _validate_args, cmd_validate),
    "world": ("generate the synthetic world (images, captions, QA, ground truth)", _world_args, cmd_world),
    "presets": ("list the model presets", lambda p: None, cmd_presets),
}


for _verb, _help in (("labels", "precompute CLIP patch labels with Ray Data"),
                     ("align", "stage 1: SEA alignment pretraining with Ray Train"),
                     ("instruct", "stage 2: instruction tuning with Ray Train"),
                     ("tune", "search SEA and adapter hyperparameters with Ray Tune + Optuna"),
                     ("eval", "evaluate a checkpoint (alignment diagnostics, QA accuracy)")):
    if _verb in JOB_RUNNERS:
        VERBS[_verb] = (_help, _add_config_args, cmd_job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sea-ray", description="SEA (Supervised Embedding Alignment) on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (help_text, add_args, _) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return VERBS[args.verb][2](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SeaRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
