"""Checkpoints: trainable modules only, complete or invisible.

A checkpoint is a folder ``step_00000100`` under the run folder (local or ``s3://``)::

    model.safetensors    the trainable tensors (adapter, SEA temperature; stage 2: the LLM, or its LoRA weights)
    optimizer.pt         optimizer + LR-scheduler state (tensors and numbers only)
    state.json           step, samples seen, epoch: the data position
    config.json          the resolved job config
    meta.json            sea_ray version, stage, and every file above with its size
    _COMPLETE            written last

It counts as complete only when ``_COMPLETE`` exists and every file in ``meta.json`` exists with
its recorded size, so a half-written or half-uploaded checkpoint is never used. Loading never
unpickles arbitrary objects: safetensors for weights, ``torch.load(weights_only=True)`` for the
optimizer state.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sea_ray import __version__, storage

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, META_FILE = (
    "model.safetensors", "optimizer.pt", "state.json", "config.json", "meta.json")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint(directory: str, model_state: dict[str, torch.Tensor], optim_state: Optional[dict],
                     train_state: dict, config: dict, stage: str) -> None:
    """Write a checkpoint into a local ``directory`` (Ray Train persists it to the run storage).

    One file at a time, each serialised copy dropped once written and the optimizer state
    streamed to its file: at most one serialised copy of the model's tensors is held beside the
    state itself (a 7B instruct checkpoint: 28 GB of weights and 56 GB of AdamW state in float32;
    holding them all serialised at once, the optimizer's twice, took 140 GB more)."""
    os.makedirs(directory, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)

    write(MODEL_FILE, st_save({k: v.detach().contiguous().cpu() for k, v in model_state.items()}))
    write(STATE_FILE, json.dumps(train_state, indent=2, sort_keys=True).encode())
    write(CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    names = [MODEL_FILE, STATE_FILE, CONFIG_FILE]
    if optim_state is not None:
        torch.save(optim_state, os.path.join(directory, OPTIM_FILE))
        names.append(OPTIM_FILE)
    meta = {"sea_ray_version": __version__, "stage": stage, "step": train_state.get("step"),
            "files": {name: os.path.getsize(os.path.join(directory, name)) for name in names}}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, COMPLETE), "w") as f:
        f.write(str(train_state.get("step")))


def publish(directory: str, uri: str) -> None:
    """Copy a checkpoint written by :func:`write_checkpoint` to ``uri`` (local or remote), its
    ``_COMPLETE`` marker last: a reader that sees the marker sees every file."""
    storage.put_folder(directory, uri, last=COMPLETE)


def is_complete(uri: str) -> bool:
    fs, path = storage.fsspec_fs(uri)
    try:
        if not fs.exists(f"{path}/{COMPLETE}") or not fs.exists(f"{path}/{META_FILE}"):
            return False
        with fs.open(f"{path}/{META_FILE}", "rb") as f:
            meta = json.loads(f.read())
        for name, size in meta["files"].items():
            if not fs.exists(f"{path}/{name}") or fs.size(f"{path}/{name}") != size:
                return False
    except (OSError, ValueError, KeyError) as exc:
        log.warning("checkpoint %s is unreadable (%s): ignored", uri, exc)
        return False
    return True


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every step folder in a run, complete or not, oldest first."""
    fs, path = storage.fsspec_fs(run_uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").split("/")[-1]
        match = STEP_DIR.match(name)
        if match:
            found.append((int(match.group(1)), storage.join(run_uri, name)))
    return sorted(found)


def latest_complete(run_uri: str) -> Optional[str]:
    """The newest complete checkpoint of a run; incomplete ones are skipped with a warning."""
    for step, uri in reversed(list_checkpoints(run_uri)):
        if is_complete(uri):
            return uri
        log.warning("checkpoint %s (step %d) is incomplete: skipped", uri, step)
    return None


def resolve(uri: str) -> str:
    """A checkpoint folder from either a checkpoint URI or a run URI (newest complete one)."""
    if storage.exists(storage.join(uri, META_FILE)):
        if not is_complete(uri):
            raise FileNotFoundError(f"checkpoint {uri} is incomplete")
        return uri
    found = latest_complete(uri)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {uri}")
    return found


def load_model_state(uri: str) -> dict[str, torch.Tensor]:
    return st_load(storage.read_bytes(storage.join(uri, MODEL_FILE)))


def load_checkpoint(uri: str) -> dict:
    """{'model', 'optimizer' (or None), 'state', 'config', 'meta'} of a complete checkpoint."""
    if not is_complete(uri):
        raise FileNotFoundError(f"checkpoint {uri} is incomplete")
    optim = None
    if storage.exists(storage.join(uri, OPTIM_FILE)):
        optim = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, OPTIM_FILE))), weights_only=True)
    return {
        "model": load_model_state(uri),
        "optimizer": optim,
        "state": json.loads(storage.read_text(storage.join(uri, STATE_FILE))),
        "config": json.loads(storage.read_text(storage.join(uri, CONFIG_FILE))),
        "meta": json.loads(storage.read_text(storage.join(uri, META_FILE))),
    }
