"""Sharded checkpoints in one process (no Ray, no process group): what they hold, when they count
as complete, what loading refuses. Written by two FSDP2 workers and resumed on another number of
workers: tests/test_train.py."""

import json
import os
import pickle

import pytest
import torch

from sea_ray.train import checkpoint as ckpt
from sea_ray.train.loop import restore_sharded, sharded_state


def _trained(seed=0, lr=0.1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # frozen: never checkpointed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _write(folder, model, optimizer, step=1):
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    model_state, optim_state = sharded_state(model, optimizer, keys)
    ckpt.write_sharded(str(folder), model_state, optim_state, {"last_epoch": step}, {"step": step, "samples": 3},
                       {"job": "instruct"}, "instruct")
    return keys


def test_a_sharded_checkpoint_holds_the_trainable_tensors_and_loads_whole_and_into_a_live_model(tmp_path):
    model, optimizer = _trained()
    folder = tmp_path / ckpt.step_dir_name(1)
    keys = _write(folder, model, optimizer)
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    assert meta["format"] == "sharded" and meta["world_size"] == 1
    assert set(meta["files"]) == {"model/.metadata", "model/__0_0.distcp", "optimizer/.metadata",
                                  "optimizer/__0_0.distcp", ckpt.OPTIM_FILE, ckpt.STATE_FILE, ckpt.CONFIG_FILE}
    assert ckpt.is_complete(str(folder)) and ckpt.resolve(str(tmp_path)) == str(folder)
    assert set(ckpt.sharded_keys(str(folder))) == keys == {"0.bias", "1.weight", "1.bias"}
    whole = ckpt.load_checkpoint(str(folder))
    for key in keys:
        torch.testing.assert_close(whole["model"][key], model.state_dict()[key], rtol=0, atol=0)
    assert set(whole["optimizer"]["optimizer"]["state"]) == keys
    assert whole["optimizer"]["scheduler"] == {"last_epoch": 1} and whole["state"]["step"] == 1
    # into a fresh model and optimizer (another lr): tensors, moments and parameter groups restored
    fresh, fresh_optimizer = _trained(seed=5, lr=0.5)
    info = restore_sharded(str(folder), fresh, fresh_optimizer, keys)
    assert info["state"] == {"step": 1, "samples": 3} and fresh_optimizer.param_groups[0]["lr"] == 0.1
    own = fresh.state_dict()
    assert max((own[k] - model.state_dict()[k]).abs().max().item() for k in keys) == 0.0
    assert not torch.equal(own["0.weight"], model.state_dict()["0.weight"])  # the frozen one is not loaded
    want, got = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index in want:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got[index][name], want[index][name], rtol=0, atol=0)


def test_a_sharded_checkpoint_without_one_of_its_shards_is_incomplete(tmp_path):
    model, optimizer = _trained()
    folder = tmp_path / ckpt.step_dir_name(1)
    _write(folder, model, optimizer)
    (folder / "optimizer" / "__0_0.distcp").unlink()
    assert not ckpt.is_complete(str(folder))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve(str(folder))
    assert ckpt.latest_complete(str(tmp_path)) is None


def test_a_resume_refuses_a_checkpoint_without_a_trainable_tensor(tmp_path):
    """A checkpoint of another trainable set (here: written without 1.bias) never half-loads."""
    model, optimizer = _trained()
    folder = tmp_path / ckpt.step_dir_name(1)
    model_state, optim_state = sharded_state(model, optimizer, {"0.bias", "1.weight"})
    ckpt.write_sharded(str(folder), model_state, optim_state, {}, {"step": 1, "samples": 3}, {}, "instruct")
    fresh, fresh_optimizer = _trained(seed=4)
    with pytest.raises(ValueError, match=r"lacks trainable tensors: \['1.bias'\]"):
        restore_sharded(str(folder), fresh, fresh_optimizer, {"0.bias", "1.weight", "1.bias"})


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_loading_never_unpickles_arbitrary_objects_from_dcp_metadata(tmp_path):
    model, optimizer = _trained()
    folder = tmp_path / ckpt.step_dir_name(1)
    _write(folder, model, optimizer)
    ran = tmp_path / "ran"
    (folder / "model" / ".metadata").write_bytes(pickle.dumps(_RunsCode(ran)))
    with pytest.raises(ValueError, match="may not name (posix|os).system"):
        ckpt.load_model_state(str(folder))
    assert not ran.exists()


def test_dcp_entries_that_are_not_tensors_are_refused(tmp_path):
    """DCP would load a non-tensor entry with torch.load(weights_only=False): such a checkpoint
    is refused as a whole, and sea_ray never writes one."""
    import torch.distributed.checkpoint as dcp

    part = tmp_path / "model"
    dcp.save({"w": torch.ones(2), "note": {"any": "object"}}, storage_writer=dcp.FileSystemWriter(str(part)),
             no_dist=True)
    with pytest.raises(ValueError, match="non-tensor entries"):
        ckpt._load_whole(str(part))
    model, optimizer = _trained()
    model_state, optim_state = sharded_state(model, optimizer, {"1.bias"})
    with pytest.raises(TypeError, match="tensors only"):
        ckpt.write_sharded(str(tmp_path / "x"), dict(model_state, extra=3), optim_state, {}, {"step": 1}, {}, "align")


def test_a_sharded_checkpoint_reads_from_a_bucket(tmp_path, s3_bucket):
    """Published to s3:// (the in-process trainers' copy, marker last) and read from there by DCP's
    fsspec reader: whole, and into a live model."""
    model, optimizer = _trained()
    local = tmp_path / "local"
    keys = _write(local, model, optimizer)
    uri = f"{s3_bucket}/run/{ckpt.step_dir_name(1)}"
    ckpt.publish(str(local), uri)
    assert ckpt.latest_complete(f"{s3_bucket}/run") == uri
    state = ckpt.load_model_state(uri)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in keys)
    fresh, fresh_optimizer = _trained(seed=3)
    restore_sharded(uri, fresh, fresh_optimizer, keys)
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in keys)


# --------------------------------------------------------------------------- which checkpoint a run resumes from


def _full(run_dir, step, complete=True):
    folder = run_dir / ckpt.step_dir_name(step)
    ckpt.write_checkpoint(str(folder), {"adapter.w": torch.full((2,), float(step))}, None, {"step": step}, {}, "align")
    if not complete:
        (folder / ckpt.COMPLETE).unlink()
    return str(folder)


def _steps(run_dir):
    return [s for s, _ in ckpt.list_checkpoints(str(run_dir))]


def test_a_resume_point_is_the_newest_complete_checkpoint_and_the_incomplete_ones_after_it_go(tmp_path):
    run_dir = tmp_path / "run"
    assert ckpt.resume_point(str(run_dir)) is None  # no run folder yet: from the start
    _full(run_dir, 2, complete=False)  # older and incomplete: kept (prune's business, after the run)
    four = _full(run_dir, 4)
    _full(run_dir, 6, complete=False)
    _full(run_dir, 8, complete=False)
    assert ckpt.resume_point(str(run_dir)) == four
    assert _steps(run_dir) == [2, 4]


def test_prune_keeps_the_newest_complete_checkpoints_and_deletes_what_an_interrupted_run_left(tmp_path):
    run_dir = tmp_path / "run"
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        _full(run_dir, step, complete)
    assert ckpt.prune(str(run_dir), None) == [] and _steps(run_dir) == [1, 2, 3, 4, 5]
    deleted = ckpt.prune(str(run_dir), 2)
    assert [ckpt.step_of(uri) for uri in deleted] == [1, 2, 5] and _steps(run_dir) == [3, 4]


def _resume_rank(rank: int, run_uri: str, init: str, out) -> None:
    """One rank of a 2-process gloo group; only rank 0 is given the run's folder."""
    import torch.distributed as dist

    from sea_ray.train.loop import RayTrainIO

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        io = object.__new__(RayTrainIO)
        io.run_uri, io.world_rank, io.world_size = (run_uri if rank == 0 else "/nowhere"), rank, 2
        out.put((rank, io.resume_from()))
    finally:
        dist.destroy_process_group()


def test_only_rank_0_chooses_the_resume_point_and_every_rank_gets_its_choice(tmp_path):
    """Two ranks in one process group: rank 1 looks at no storage, and both get rank 0's choice,
    the newest complete checkpoint."""
    import multiprocessing as mp

    run_dir = tmp_path / "run"
    _full(run_dir, 3)
    six = _full(run_dir, 6)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_resume_rank, args=(r, str(run_dir), str(tmp_path / "pg"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == {0: six, 1: six}
