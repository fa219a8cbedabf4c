"""Benchmark: manifests at real size (the LCS-558K and mix665k shapes), no image files needed.

Run (CPU; about a minute per measurement on 2 cores)::

    .venv/bin/python bench/manifests.py                 # 558,128 caption rows and 665,298 conversation rows
    .venv/bin/python bench/manifests.py --scale 0.01    # the same shapes at 1 %, seconds
    .venv/bin/python bench/manifests.py --baseline ../main  # beside another checkout's sea_ray, same files

Writes the two LLaVA-format JSON files into a temporary folder (their shapes: LCS-558K's one
caption per image, ``<image>`` in the human turn; mix665k's multi-turn conversations over COCO /
GQA / OCR-VQA / TextVQA / VG paths with about 6 % text-only rows), then measures, each in a fresh
Python process (so its peak RSS is its own):

- ``import``: ``sea-ray import-manifest`` of each file (validated Parquet shards, no images read);
- ``labels_plan``: the labels job's planning step on the captions (manifest read, row checks,
  vocabulary, shards and the fingerprint; the tiny preset's tower, since its size does not change
  the planning).

Prints one line per measurement: rows, wall seconds, peak RSS in MB, and the goal (< 60 s, < 4 GB);
with ``--baseline DIR`` each measurement is also made with the ``sea_ray`` of the checkout at DIR
(on the same files, one process after the other) and the ratios this / baseline are printed.
Time is machine-dependent; nothing here asserts it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

LCS_ROWS, MIX_ROWS = 558_128, 665_298
WORDS = ("a man woman dog cat red blue green small large wooden table street car city river bridge sunset "
         "vintage modern house garden chair window tree beach mountain snow bike book phone cup").split()
SOURCES = ("coco/train2017/{:012d}.jpg", "gqa/images/{}.jpg", "ocr_vqa/images/{}.jpg",
           "textvqa/train_images/{:016x}.jpg", "vg/VG_100K/{}.jpg")


def _caption(rng: random.Random, low: int = 6, high: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_lcs(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("[")
        for i in range(rows):
            image = f"{i // 10000:05d}/{i:09d}.jpg"
            row = {"id": f"{i:09d}", "image": image, "conversations": [
                {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                {"from": "gpt", "value": _caption(rng)}]}
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")


def write_mix(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("[")
        for i in range(rows):
            turns = []
            for t in range(rng.randint(1, 5)):
                question = "What is " + _caption(rng)[:40] + "?"
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                          {"from": "gpt", "value": _caption(rng, 10, 110)}]  # the real file: ~1.0 GB
            row = {"id": str(i), "conversations": turns}
            if rng.random() > 0.06:  # mix665k: about 6 % of its rows are text-only
                row["image"] = rng.choice(SOURCES).format(i)
            else:
                turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    kind, manifest, out = sys.argv[1:4]
    t = time.perf_counter()
    if kind == "import":
        from sea_ray.data.importer import import_manifest
        summary = import_manifest(manifest, out, image_root="/nonexistent/images", max_error_fraction=1.0)
        rows = summary["rows_written"]
    else:
        from sea_ray.config.loading import validate
        from sea_ray.labels.job import plan
        cfg = validate({"job": "labels", "output": out, "model": {"preset": "tiny-openclip-llama"},
                        "data": {"manifest": manifest, "image_root": "/nonexistent/images"}})
        p = plan(cfg)
        rows = len(p.rows) if hasattr(p, "rows") else None
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}))
""")


REPO = Path(__file__).resolve().parents[1]


def measure(kind: str, manifest: Path, out: Path, tree: Path = REPO) -> dict:
    """One measurement in a fresh process importing the ``sea_ray`` of the checkout ``tree``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, kind, str(manifest), str(out)], capture_output=True,
                          text=True, env=env, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{kind} on {manifest.name} ({tree}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def line(kind: str, name: str, result: dict, label: str = "") -> str:
    ok = result["seconds"] < 60 and result["peak_rss_mb"] < 4096
    return (f"{kind:12s} {name:28s} {label:9s} rows {result['rows']}  {result['seconds']:6.1f} s  "
            f"peak RSS {result['peak_rss_mb']:5d} MB  goal (< 60 s, < 4 GB): {'met' if ok else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real row counts")
    parser.add_argument("--baseline", type=Path, help="another checkout whose sea_ray is measured beside this one")
    args = parser.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "sea_ray" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {baseline}: no sea_ray package there")
    with tempfile.TemporaryDirectory(prefix="sea-manifests-") as tmp:
        root = Path(tmp)
        lcs, mix = root / "blip_laion_cc_sbu_558k.json", root / "llava_v1_5_mix665k.json"
        write_lcs(lcs, max(1, int(LCS_ROWS * args.scale)))
        write_mix(mix, max(1, int(MIX_ROWS * args.scale)))
        print(f"manifests: {lcs.name} {lcs.stat().st_size / 1e6:.0f} MB, {mix.name} {mix.stat().st_size / 1e6:.0f} MB")
        for kind, manifest in (("import", lcs), ("import", mix), ("labels_plan", lcs)):
            if baseline is None:
                print(line(kind, manifest.name, measure(kind, manifest, root / f"out-{kind}-{manifest.stem}")),
                      flush=True)
                continue
            before = measure(kind, manifest, root / f"base-{kind}-{manifest.stem}", baseline)
            after = measure(kind, manifest, root / f"out-{kind}-{manifest.stem}")
            print(line(kind, manifest.name, before, "baseline"), flush=True)
            print(line(kind, manifest.name, after, "this"), flush=True)
            print(f"{'':12s} {'':28s} {'ratio':9s} time {after['seconds'] / max(before['seconds'], 0.1):.2f}x  "
                  f"peak RSS {after['peak_rss_mb'] / max(before['peak_rss_mb'], 1):.2f}x", flush=True)


if __name__ == "__main__":
    main()
