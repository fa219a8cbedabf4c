"""The documentation works as written.

- docs/configuration.md is what `python -m sea_ray.docs_gen` generates from the config classes;
- every relative link in README.md and docs/ points at a file that exists;
- every `sea-ray ...` line of a ```bash block parses with the real command-line parser;
- every ```bash block marked `<!-- run -->` (the line before the fence) runs, in page order, in one
  scratch folder shared by all pages (`workflows/` linked in, outputs under `out/`), so pages reuse
  each other's small worlds and runs; a local S3 server stands in for a bucket. A page that needs
  no other page (OWN_SCRATCH) runs in a folder of its own, in tests/test_docs_pipeline.py.

Mark a block to run with `<!-- run -->` when it is CPU-sized (seconds to a minute or two) and
self-contained given the pages before it in PAGE_ORDER.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sea_ray import docs_gen
from sea_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages run in this order (later pages may use earlier pages' outputs); others follow by name.
PAGE_ORDER = ["configuration.md", "data.md", "labels.md", "align.md", "instruct.md", "eval.md", "export.md", "tune.md",
              "pipeline.md", "own-data.md", "object-storage.md", "clusters.md", "quickstart.md", "README.md"]
BLOCK = re.compile(r"^(?P<marker><!-- run -->\s*\n)?```bash\n(?P<body>.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(#[^)]*)?\)")
BLOCK_TIMEOUT_S = 900


def blocks(page: Path) -> list[tuple[bool, str]]:
    """(marked to run, body) of every ```bash block of a page."""
    return [(bool(m.group("marker")), m.group("body")) for m in BLOCK.finditer(page.read_text())]


def _ordered(pages):
    rank = {name: i for i, name in enumerate(PAGE_ORDER)}
    return sorted(pages, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def test_configuration_reference_is_up_to_date():
    page = REPO / "docs" / "configuration.md"
    assert page.read_text() == docs_gen.render(), "run `python -m sea_ray.docs_gen` to regenerate it"


def test_docs_exist_for_every_job_and_topic():
    names = {p.name for p in PAGES}
    assert {"align.md", "instruct.md", "pipeline.md", "submit.md", "clusters.md", "object-storage.md",
            "configuration.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    text = page.read_text()
    broken = [target for target, _ in LINK.findall(text)
              if "://" not in target and not target.startswith("mailto:")
              and not (page.parent / target).exists()]
    assert broken == []


def _sea_ray_commands(body: str) -> list[list[str]]:
    """The argument lists of every `sea-ray` command in a shell snippet."""
    text = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):  # an operator ends a command
                while words and (words[0] == "!" or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):  # `!`, VAR=value
                    words = words[1:]
                if words and words[0] in ("sea-ray", ".venv/bin/sea-ray"):
                    commands.append(words[1:])
                words = []
            else:
                words.append(token)
    return commands


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_sea_ray_command_shown_parses(page):
    parser = build_parser()
    bad = []
    for _, body in blocks(page):
        for words in _sea_ray_commands(body):
            try:
                parser.parse_args(words)
            except SystemExit:
                bad.append("sea-ray " + shlex.join(words))
    assert bad == []


# --------------------------------------------------------------------------- running the marked blocks


def make_scratch(tmp_path_factory) -> tuple[Path, dict]:
    """A folder for pages' commands, with the repository's recipes linked in, and their environment
    (AWS_* point at the session's S3 server: ask for the s3_server fixture)."""
    root = tmp_path_factory.mktemp("docs")
    (root / "workflows").symlink_to(REPO / "workflows")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("RAY_AUTH") or k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    # `sea-ray` and `python` come from this interpreter's bin; PYTHONPATH makes them (and Ray's workers) import
    # this checkout's sea_ray, whichever checkout that environment was installed from
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=pythonpath, RAY_AUTH_MODE="disabled",
               SEA_RAY_CACHE=str(root / ".cache"), MPLBACKEND="Agg")
    return root, env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, s3_server):
    """One folder for every page's commands."""
    return make_scratch(tmp_path_factory)


# Pages that use no other page's outputs run in a scratch folder of their own, in another test
# file (tests/test_docs_pipeline.py), so that they run beside the rest.
OWN_SCRATCH = ("pipeline.md", "own-data.md")
RUNNABLE = _ordered([p for p in PAGES if any(marked for marked, _ in blocks(p)) and p.name not in OWN_SCRATCH])


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_marked_commands_run(page, scratch):
    outputs = run_marked_blocks(page, *scratch)
    if page.name == "align.md":  # a single job's output in a file: its own lines, not Ray's
        chatter = [line for line in outputs[0].splitlines() if any(m in line for m in RAY_CHATTER)]
        assert chatter == [], "\n".join(chatter[:20])
        assert "align step 4/4 loss_lm" in outputs[0]


# What Ray prints at INFO level or as progress bars, once per step or per second, in a job whose
# output is not a terminal (sea_ray.runtime.quiet_ray_logs turns it off unless -v).
RAY_CHATTER = ("Reporting training result", "Failed to query Ray Train Controller", "Starting execution of Dataset",
               "Attempting to start training worker group", "Progress bars disabled", "it/s]", "not writable")


def run_marked_blocks(page: Path, root: Path, env: dict) -> list[str]:
    """Every ``<!-- run -->`` block of ``page``, in order, in ``root``; their outputs (stdout and
    stderr) in that order."""
    outputs = []
    for i, (marked, body) in enumerate(blocks(page)):
        if not marked:
            continue
        t0 = time.time()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=root, env=env, capture_output=True,
                                text=True, timeout=BLOCK_TIMEOUT_S)
        print(f"{page.name} block {i}: {time.time() - t0:.1f} s")
        assert result.returncode == 0, (f"{page.name} block {i} failed ({result.returncode}):\n{body}\n"
                                        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")
        outputs.append(result.stdout + result.stderr)
    return outputs
