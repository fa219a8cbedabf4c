"""Checkpoints: trainable modules only, complete or invisible.

A checkpoint is a folder ``step_00000100`` under the run folder (local or ``s3://``), in one of
two formats (``checkpoint.format``; which one a stage writes: :func:`sea_ray.train.loop.checkpoint_format`).
**full** (rank 0 gathers and writes everything)::

    model.safetensors    the trainable tensors (adapter, SEA temperature; stage 2: the LLM, or its LoRA weights)
    optimizer.pt         optimizer + LR-scheduler state (tensors and numbers only)
    state.json           step, samples seen, epoch: the data position
    config.json          the resolved job config
    meta.json            sea_ray version, stage, format, and every file above with its size
    _COMPLETE            written last

**sharded** (every rank writes its own shard with ``torch.distributed.checkpoint``, DCP)::

    model/__<rank>_0.distcp, model/.metadata          the trainable tensors, each rank its shard
    optimizer/__<rank>_0.distcp, optimizer/.metadata  the optimizer's tensors (AdamW moments, step)
    optimizer.pt         the optimizer's parameter groups + LR-scheduler state (numbers only)
    state.json, config.json, meta.json, _COMPLETE     as above; meta.json lists every rank's files

Each rank hands its own folder to Ray Train, which merges them into the one step folder. A
sharded checkpoint loads on any number of workers (DCP reshards as it reads), or whole in one
process without a process group (:func:`load_model_state`, :func:`load_checkpoint`).

A checkpoint counts as complete only when ``_COMPLETE`` exists and every file in ``meta.json``
exists with its recorded size, so a half-written or half-uploaded checkpoint, or a sharded one
that lacks a rank's shard, is never used. Loading never unpickles arbitrary objects:
safetensors for full weights, ``torch.load(weights_only=True)`` for ``optimizer.pt`` and DCP's
tensor data, and DCP's pickled ``.metadata`` through an unpickler that admits only DCP's own
metadata classes (:class:`_MetadataUnpickler`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import warnings
from contextlib import contextmanager
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
FORMATS = ("full", "sharded")
MODEL_DIR, OPTIM_DIR = "model", "optimizer"  # the two DCP checkpoints of a sharded checkpoint
DCP_METADATA = ".metadata"  # DCP's index of a checkpoint's shards (written by rank 0)


@contextmanager
def _one_process(distributed: bool):
    """DCP without a process group: one process reads or writes the whole checkpoint (DCP warns
    that it assumes so on every call; here it is the intent)."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(uri: str) -> int:
    """The step of a checkpoint folder, from its name."""
    match = STEP_DIR.match(uri.rstrip("/").rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"{uri} is not a checkpoint folder (step_NNNNNNNN)")
    return int(match.group(1))


def write_checkpoint(directory: str, model_state: dict[str, torch.Tensor], optim_state: Optional[dict],
                     train_state: dict, config: dict, stage: str) -> None:
    """Write a full checkpoint into a local ``directory`` (Ray Train persists it to the run storage).

    One file at a time, each serialised copy dropped once written and the optimizer state
    streamed to its file: at most one serialised copy of the model's tensors is held beside the
    state itself (a 7B instruct checkpoint: 28 GB of weights and 56 GB of AdamW state in float32;
    holding them all serialised at once, the optimizer's twice, took 140 GB more)."""
    os.makedirs(directory, exist_ok=True)
    _write(directory, MODEL_FILE, st_save({k: v.detach().contiguous().cpu() for k, v in model_state.items()}))
    names = [MODEL_FILE] + _write_small(directory, train_state, config)
    if optim_state is not None:
        torch.save(optim_state, os.path.join(directory, OPTIM_FILE))
        names.append(OPTIM_FILE)
    _seal(directory, {name: os.path.getsize(os.path.join(directory, name)) for name in names}, train_state, stage,
          {"format": "full"})


def write_sharded(directory: str, model_state: dict[str, torch.Tensor], optim_state: dict, scheduler_state: dict,
                  train_state: dict, config: dict, stage: str) -> None:
    """Every rank: write this rank's shard of a sharded checkpoint into its own local ``directory``
    (Ray Train merges the ranks' folders into the step folder). A collective when a process group
    is up (DCP plans the save across ranks; the file lists are gathered on rank 0), one process
    otherwise.

    ``model_state``: the trainable tensors by name (FSDP2's DTensors, each rank holding its shard,
    or plain tensors, which DCP writes once over all ranks); ``optim_state``: the optimizer's state
    dict by parameter name (``get_optimizer_state_dict`` without ``full_state_dict``): its tensors
    go to the DCP checkpoint, its ``param_groups`` (numbers and names) to ``optimizer.pt`` with
    ``scheduler_state``. Nothing is gathered: each rank holds and writes only its shard."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    os.makedirs(directory, exist_ok=True)
    for part, state in ((MODEL_DIR, model_state), (OPTIM_DIR, flat_optimizer_state(optim_state["state"]))):
        not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        if not_tensors:
            raise TypeError(f"a sharded checkpoint holds tensors only; not tensors: {not_tensors[:5]}")
        with _one_process(distributed):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(directory, part)),
                     no_dist=not distributed)
    if rank == 0:
        torch.save({"optimizer": {"param_groups": optim_state["param_groups"]}, "scheduler": scheduler_state},
                   os.path.join(directory, OPTIM_FILE))
        _write_small(directory, train_state, config)
    files = _files_under(directory)
    everyone = [files]
    if distributed:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, files)
    if rank != 0:
        return
    merged: dict[str, int] = {}
    for files in everyone:
        for name, size in files.items():
            if merged.setdefault(name, size) != size:
                raise RuntimeError(f"two ranks wrote {name} of a sharded checkpoint with different sizes")
    _seal(directory, merged, train_state, stage, {"format": "sharded", "world_size": len(everyone)})


def flat_optimizer_state(state: dict) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state ``{name: {"exp_avg": t, ...}}`` as ``{"name/exp_avg": t}``
    (the keys of a sharded checkpoint's ``optimizer/``; parameter names never hold a ``/``).
    The tensors are the same objects, so DCP loading into the flat dict fills the nested one."""
    return {f"{name}/{key}": value for name, entry in state.items() for key, value in entry.items()}


def _nested_optimizer_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, entry = key.rpartition("/")
        nested.setdefault(name, {})[entry] = value
    return nested


def _write(directory: str, name: str, data: bytes) -> None:
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def _write_small(directory: str, train_state: dict, config: dict) -> list[str]:
    _write(directory, STATE_FILE, json.dumps(train_state, indent=2, sort_keys=True).encode())
    _write(directory, CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    return [STATE_FILE, CONFIG_FILE]


def _files_under(directory: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under a local folder (``/``-separated)."""
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, directory).replace(os.sep, "/")] = os.path.getsize(path)
    return found


def _seal(directory: str, files: dict[str, int], train_state: dict, stage: str, extra: dict) -> None:
    """``meta.json`` (every file and its size; ``extra``: the format, and the world size that
    wrote a sharded checkpoint), then ``_COMPLETE``."""
    meta = dict(extra, sea_ray_version=__version__, stage=stage, step=train_state.get("step"),
                files=dict(sorted(files.items())))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, COMPLETE), "w") as f:
        f.write(str(train_state.get("step")))


def publish(directory: str, uri: str) -> None:
    """Copy a checkpoint written by :func:`write_checkpoint` or :func:`write_sharded` (one
    process) to ``uri`` (local or remote), its ``_COMPLETE`` marker last: a reader that sees the
    marker sees every file."""
    storage.put_tree(directory, uri, last=COMPLETE)


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


def latest_complete(run_uri: str, delete_newer: bool = False) -> Optional[str]:
    """The newest complete checkpoint of a run (None: none); the incomplete ones newer than it
    are skipped with a warning, or, with ``delete_newer``, deleted."""
    for step, uri in reversed(list_checkpoints(run_uri)):
        if is_complete(uri):
            return uri
        if delete_newer:
            log.warning("deleting incomplete checkpoint %s (step %d): the run resumes before it", uri, step)
            storage.remove_tree(uri)
        else:
            log.warning("checkpoint %s (step %d) is incomplete: skipped", uri, step)
    return None


def resume_point(run_uri: str) -> Optional[str]:
    """Where a (re-)started run resumes: its newest complete checkpoint (None: from the start).
    Step folders newer than it are incomplete (an upload or a write that was cut short) and are
    deleted, so the resumed run writes those steps afresh rather than into their remains."""
    return latest_complete(run_uri, delete_newer=True)


def prune(run_uri: str, keep: Optional[int]) -> list[str]:
    """Keep a run's ``keep`` newest complete checkpoints (``checkpoint.num_to_keep``; None: all)
    and delete its other step folders, older or incomplete ones left by an interrupted run among
    them; returns the deleted URIs."""
    if keep is None:
        return []
    found = list_checkpoints(run_uri)
    kept = set([uri for _, uri in found if is_complete(uri)][-keep:])
    deleted = [uri for _, uri in found if uri not in kept]
    for uri in deleted:
        storage.remove_tree(uri)
    return deleted


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


def checkpoint_format_of(uri: str) -> str:
    """``full`` or ``sharded``: what a checkpoint's ``meta.json`` says (checkpoints written before
    the sharded format existed are full)."""
    fmt = json.loads(storage.read_text(storage.join(uri, META_FILE))).get("format", "full")
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint {uri} has format {fmt!r}; this sea_ray reads {', '.join(FORMATS)}")
    return fmt


# --------------------------------------------------------------------------- reading DCP shards


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its ``.metadata`` (the index of the shards): this unpickler builds only DCP's
    metadata classes, ``torch.Size``, dtypes and layouts, and paths, so a crafted ``.metadata``
    cannot run code (DCP's own reader uses ``pickle.load``)."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    _PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata":
            found = super().find_class(module, name)
            if isinstance(found, type):  # its dataclasses and enums, not its functions
                return found
        elif (module, name) in self._ALLOWED or (module in ("pathlib", "pathlib._local") and name in self._PATHS):
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a checkpoint's DCP metadata may not name {module}.{name}: refused")


def _reader(uri: str):
    """DCP's fsspec reader on sea_ray's filesystem of ``uri`` (local, or ``s3://`` with its
    endpoint and retries): every rank reads only the byte ranges its shards need. Its metadata
    goes through :class:`_MetadataUnpickler`, and one that indexes non-tensor data (which DCP
    would load with ``torch.load(weights_only=False)``; sea_ray never writes any) is refused."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class Reader(FsspecReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self.fs.concat_path(self.path, DCP_METADATA), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
                    raise ValueError(f"unreadable DCP metadata in {uri}: {exc}") from None
            other = sorted(k for k, v in metadata.state_dict_metadata.items()
                           if not isinstance(v, TensorStorageMetadata))
            if other:
                raise ValueError(f"DCP checkpoint {uri} holds non-tensor entries (refused): {other[:5]}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    fs, path = storage.fsspec_fs(uri)
    reader = Reader(uri if storage.is_remote(uri) else path)
    reader.fs.fs = fs
    return reader


def sharded_keys(uri: str, part: str = MODEL_DIR) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the tensors in a sharded checkpoint's ``part`` (its metadata only)."""
    metadata = _reader(storage.join(uri, part)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in metadata.state_dict_metadata.items()}


def _load_whole(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of one DCP checkpoint, whole, on the CPU, in this process (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = _reader(uri)
    metadata = reader.read_metadata()
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()}
    with _one_process(False):
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def load_sharded(uri: str, model_state: dict[str, torch.Tensor], optim_flat: dict[str, torch.Tensor]) -> dict:
    """Fill a live model's and optimizer's tensors from a sharded checkpoint, in place, on any
    number of ranks (a collective when a process group is up): ``model_state`` the trainable
    tensors by name, ``optim_flat`` the optimizer's (:func:`flat_optimizer_state`), each rank's
    DTensor shards or plain tensors; DCP reads each rank's part of the saved shards, whatever
    the world size that wrote them. Returns :func:`load_checkpoint` without tensors (its
    ``optimizer`` the parameter groups and scheduler state to apply)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    info = load_checkpoint(uri, tensors=False)
    saved = sharded_keys(uri)
    missing = sorted(set(model_state) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {uri} lacks trainable tensors: {missing[:5]}")
    distributed = dist.is_available() and dist.is_initialized()
    with _one_process(distributed):
        dcp.load(model_state, storage_reader=_reader(storage.join(uri, MODEL_DIR)), no_dist=not distributed)
        dcp.load(optim_flat, storage_reader=_reader(storage.join(uri, OPTIM_DIR)), no_dist=not distributed)
    return info


# --------------------------------------------------------------------------- reading, either format


def load_model_state(uri: str) -> dict[str, torch.Tensor]:
    """The trainable tensors of a checkpoint, whole, in this process (either format)."""
    if checkpoint_format_of(uri) == "sharded":
        return _load_whole(storage.join(uri, MODEL_DIR))
    return st_load(storage.read_bytes(storage.join(uri, MODEL_FILE)))


def load_checkpoint(uri: str, tensors: bool = True) -> dict:
    """{'model', 'optimizer' (or None), 'state', 'config', 'meta'} of a complete checkpoint, in
    this process, either format (a sharded one read whole: ``optimizer.optimizer.state`` by
    parameter name, as a full checkpoint holds it). ``tensors=False``: without the model's and the
    optimizer's tensors (``model`` None, ``optimizer`` its parameter groups and scheduler state)."""
    if not is_complete(uri):
        raise FileNotFoundError(f"checkpoint {uri} is incomplete")
    meta = json.loads(storage.read_text(storage.join(uri, META_FILE)))
    sharded = checkpoint_format_of(uri) == "sharded"
    optim = None
    if storage.exists(storage.join(uri, OPTIM_FILE)) and (tensors or sharded):
        optim = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, OPTIM_FILE))), weights_only=True)
        if sharded and tensors:
            optim["optimizer"]["state"] = _nested_optimizer_state(_load_whole(storage.join(uri, OPTIM_DIR)))
    return {
        "model": load_model_state(uri) if tensors else None,
        "optimizer": optim,
        "state": json.loads(storage.read_text(storage.join(uri, STATE_FILE))),
        "config": json.loads(storage.read_text(storage.join(uri, CONFIG_FILE))),
        "meta": meta,
    }
