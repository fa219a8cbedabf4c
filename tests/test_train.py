"""The training recipes on Ray Train: align -> instruct with 2 CPU workers, checkpoints in an S3
bucket and on local disk, a killed worker, a stopped driver, half-written checkpoints. One
uninterrupted align run (in the bucket) is the yardstick of the fault tests and the start of the
instruct run."""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sea_ray import storage
from sea_ray.config.loading import validate
from sea_ray.train import checkpoint as ckpt
from sea_ray.train.driver import run

pytestmark = [pytest.mark.ray]  # in the default run: the Ray Train path itself (minutes, the core of the suite)

STEPS, EVERY = 6, 3  # 6 x 8 samples = one epoch of the 48-image train split


@pytest.fixture(scope="module")
def labelled_world(world_dir, tmp_path_factory):
    """The session world plus oracle labels (ground-truth patch words in the labels schema)."""
    from sea_ray.world.oracle import write_oracle_labels
    from sea_ray.model.vision import build_vision_tower

    cfg = _align_cfg(world_dir, "unused", "unused")
    labels = str(tmp_path_factory.mktemp("labels"))
    tower = build_vision_tower(cfg.model.vision, cfg.data.image_aspect)
    write_oracle_labels(world_dir, labels, 8, tower.transform_spec())
    return world_dir, labels


def _align_raw(world, labels, storage_uri, name="align", **extra):
    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"},
           "run": {"name": name, "storage": storage_uri, "seed": 3},
           "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images", "labels": labels,
                    "max_length": 48},
           "scaling": {"num_workers": 2}, "batch": {"global_size": 8, "per_worker": 4},
           "optim": {"max_steps": STEPS, "lr": 2e-3}, "checkpoint": {"every_n_steps": EVERY, "num_to_keep": None},
           "sea": {"top_n": 3, "negatives": "global"}, "log_every_n_steps": 2}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _align_cfg(world, labels, storage_uri, **extra):
    return validate(_align_raw(world, labels, storage_uri, **extra))


def _adapter(uri):
    state = ckpt.load_model_state(ckpt.resolve(uri))
    return {k: v for k, v in state.items() if k.startswith("adapter.")}


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-runs")
    return "s3://train-runs"


@pytest.fixture(scope="module")
def val_labels(labelled_world, tmp_path_factory):
    """Oracle labels of the world's validation split (the labels of its val manifest)."""
    from sea_ray.world.oracle import write_oracle_labels
    from sea_ray.model.vision import build_vision_tower

    world, _ = labelled_world
    cfg = _align_cfg(world, "unused", "unused")
    out = str(tmp_path_factory.mktemp("val-labels"))
    write_oracle_labels(world, out, 8, build_vision_tower(cfg.model.vision, cfg.data.image_aspect).transform_spec(),
                        split="val")
    return out


@pytest.fixture(scope="module")
def reference(ray_local, labelled_world, val_labels, bucket):
    """An uninterrupted 2-worker align run with its checkpoints in a bucket: the yardstick of the
    fault-tolerance tests. It validates every checkpoint on the val split (Ray's validation tasks)."""
    world, labels = labelled_world
    return run(_align_cfg(world, labels, f"{bucket}/runs", name="reference",
                          data={"val_manifest": f"{world}/val/pretrain.json", "val_labels": val_labels},
                          validation={"max_rows": 8}))


def test_align_run_writes_complete_checkpoints_and_metrics(reference, bucket, ray_local):
    run_dir = reference["run"]
    assert run_dir == f"{bucket}/runs/reference"
    steps = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert steps == [EVERY, STEPS]
    loaded = ckpt.load_checkpoint(reference["checkpoint"])
    assert loaded["state"]["step"] == STEPS and loaded["meta"]["stage"] == "align"
    assert set(loaded["model"]) == {"adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias",
                                    "sea_head.log_inv_temperature"}
    assert loaded["config"]["sea"]["enabled"] is True
    for key in ("loss_lm", "loss_sea", "temperature", "lambda_sea", "lr", "samples_per_s", "tokens_per_s"):
        assert key in reference["metrics"]
    assert reference["metrics"]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end
    assert reference["metrics"]["sea_pairs"] > 0 and reference["metrics"]["loss_sea"] > 0
    fs, path = storage.fsspec_fs(f"{run_dir}/tensorboard")
    assert any("events.out.tfevents." in p for p in fs.find(path))
    assert json.loads(storage.read_text(f"{run_dir}/config.json"))["run"]["name"] == "reference"
    # where the worker group ran (sea_ray.train.placement): one start, both ranks on the session's node
    (start,) = reference["workers"]
    assert start["step"] == 0 and start["world_size"] == 2 and [w["rank"] for w in start["workers"]] == [0, 1]
    assert {w["node_id"] for w in start["workers"]} == {ray_local.get_runtime_context().get_node_id()}
    assert len({w["pid"] for w in start["workers"]}) == 2


def test_every_checkpoint_is_validated_beside_training_and_logged(reference, bucket, tmp_path):
    """Ray's validation tasks measured each checkpoint on the val split; the numbers are in the
    summary per step and in the run's TensorBoard under val/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    validated = reference["validation"]
    assert sorted(validated) == [EVERY, STEPS]
    for metrics in validated.values():
        assert set(metrics) == {"val_loss_lm", "val_ppl", "val_sea_loss", "val_word_acc"}
        assert metrics["val_ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["val_loss_lm"])).item(), rel=1e-5)
        assert 0.0 <= metrics["val_word_acc"] <= 1.0
    assert validated[EVERY] != validated[STEPS]  # measured on each checkpoint's own weights
    fs, path = storage.fsspec_fs(f"{reference['run']}/tensorboard")
    fs.get(path.rstrip("/") + "/", str(tmp_path / "tb") + "/", recursive=True)
    scalars = {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert sorted(s for s, _ in scalars["val/loss_lm"]) == [EVERY, STEPS]
    assert dict(scalars["val/word_acc"])[STEPS] == pytest.approx(validated[STEPS]["val_word_acc"])


def test_killed_worker_resumes_and_matches_uninterrupted_run(reference, labelled_world, tmp_path):
    """SIGKILL one Train worker after the first checkpoint; FailureConfig restarts the group,
    which resumes from that checkpoint; the final adapter equals the uninterrupted one. What a
    killed worker leaves in its local checkpoint folder (planted here, as a worker killed with an
    upload pending leaves it) the next start of its rank deletes: none is left on the machine."""
    from sea_ray.train.loop import local_checkpoint_root
    from tests.faults import kill_when

    world, labels = labelled_world
    cfg = _align_cfg(world, labels, str(tmp_path), name="killed", max_failures=1)
    roots = [Path(local_checkpoint_root(storage.join(str(tmp_path), "killed"), rank)) for rank in (0, 1)]
    for root in roots:
        (root / "step_00000002-left").mkdir(parents=True)
        (root / "step_00000002-left" / "model.safetensors").write_bytes(b"\0" * 1000)
    first = Path(tmp_path, "killed", ckpt.step_dir_name(EVERY))
    thread, killed = kill_when(lambda: ckpt.is_complete(str(first)), "RayTrainWorker")
    summary = run(cfg)
    thread.join(timeout=1)
    assert summary["run"] == storage.join(str(tmp_path), "killed")
    assert [list(root.iterdir()) for root in roots] == [[], []]
    assert killed, "no Train worker was killed: the run ended before its first checkpoint was seen"
    assert summary["checkpoint"].endswith(ckpt.step_dir_name(STEPS))
    assert [s["step"] for s in summary["workers"]] == [0, EVERY]  # restarted once, from that checkpoint
    assert killed[0] not in {w["pid"] for w in summary["workers"][1]["workers"]}
    got, want = _adapter(summary["run"]), _adapter(reference["run"])
    print(f"killed worker: resumed from step {EVERY}, max abs adapter difference "
          f"{max(float((got[k] - want[k]).abs().max()) for k in want):.3g}")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_stopped_driver_resumes_in_place(reference, labelled_world, tmp_path, ray_local):
    """Kill the driver process after its first checkpoint, plant what an interrupted run can leave
    (an older complete step folder Ray Train never recorded, a newer incomplete one), run the same
    config again: it resumes from the newest complete checkpoint, which the driver chose once,
    ends where the uninterrupted run ends, and keeps only ``num_to_keep`` checkpoints."""
    import yaml

    world, labels = labelled_world
    raw = _align_raw(world, labels, str(tmp_path), name="stopped", checkpoint={"num_to_keep": 1})
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
               PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "sea_ray.cli", "align", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = Path(tmp_path, "stopped")
    first = run_dir / ckpt.step_dir_name(EVERY)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ckpt.is_complete(str(first)):
        time.sleep(0.02)
    assert proc.poll() is None, "the driver finished before it could be stopped"
    proc.kill()
    proc.wait()
    assert not ckpt.is_complete(str(run_dir / ckpt.step_dir_name(STEPS)))
    time.sleep(1.0)  # let Ray reap the dead driver's controller
    shutil.copytree(first, run_dir / ckpt.step_dir_name(1))  # complete, and unknown to Ray Train
    shutil.copytree(first, run_dir / ckpt.step_dir_name(EVERY + 1))
    (run_dir / ckpt.step_dir_name(EVERY + 1) / ckpt.COMPLETE).unlink()  # an upload cut short
    summary = run(validate(raw))
    assert [s["step"] for s in summary["workers"]] == [0, EVERY]  # the re-run started from step 3
    assert [s for s, _ in ckpt.list_checkpoints(summary["run"])] == [STEPS]
    got, want = _adapter(summary["run"]), _adapter(reference["run"])
    print(f"stopped driver: resumed from step {EVERY}, max abs adapter difference "
          f"{max(float((got[k] - want[k]).abs().max()) for k in want):.3g}")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_half_written_checkpoints_are_never_used(tmp_path):
    run_dir = tmp_path / "run"
    good = run_dir / ckpt.step_dir_name(4)
    ckpt.write_checkpoint(str(good), {"adapter.w": torch.ones(2)}, None, {"step": 4}, {}, "align")
    # a newer folder without its marker, and one whose weights were cut short after the marker
    no_marker = run_dir / ckpt.step_dir_name(8)
    ckpt.write_checkpoint(str(no_marker), {"adapter.w": torch.zeros(2)}, None, {"step": 8}, {}, "align")
    (no_marker / ckpt.COMPLETE).unlink()
    truncated = run_dir / ckpt.step_dir_name(12)
    ckpt.write_checkpoint(str(truncated), {"adapter.w": torch.zeros(2)}, None, {"step": 12}, {}, "align")
    data = (truncated / ckpt.MODEL_FILE).read_bytes()
    (truncated / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [4, 8, 12]
    assert ckpt.latest_complete(str(run_dir)) == str(good)
    assert ckpt.resolve(str(run_dir)) == str(good)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve(str(truncated))
    torch.testing.assert_close(ckpt.load_model_state(str(good))["adapter.w"], torch.ones(2))


def test_a_published_checkpoint_gets_its_marker_last(tmp_path, monkeypatch):
    """Copied to the run (the in-process trainers), the marker arrives after every other file, so
    a process killed mid-copy leaves a folder no reader takes for complete."""
    local = tmp_path / "local"
    ckpt.write_checkpoint(str(local), {"adapter.w": torch.ones(2)}, {"step": 1}, {"step": 2}, {}, "align")
    fs, _ = storage.fsspec_fs(str(tmp_path))
    copied = []
    real = type(fs).put_file
    monkeypatch.setattr(type(fs), "put_file", lambda self, src, dst, **kw: copied.append(Path(dst).name)
                        or real(self, src, dst, **kw))
    ckpt.publish(str(local), str(tmp_path / "run" / ckpt.step_dir_name(2)))
    assert copied[-1] == ckpt.COMPLETE and sorted(copied) == sorted(p.name for p in local.iterdir())
    assert ckpt.latest_complete(str(tmp_path / "run")) == str(tmp_path / "run" / ckpt.step_dir_name(2))


def _instruct_raw(world, storage_uri, name, **extra):
    raw = {"job": "instruct", "model": {"preset": "tiny-openclip-llama"}, "run": {"name": name, "storage": storage_uri},
           "data": {"manifest": f"{world}/train/instruct.json", "image_root": f"{world}/images", "max_length": 96},
           "scaling": {"num_workers": 2}, "batch": {"global_size": 8, "per_worker": 4},
           "optim": {"max_steps": INSTRUCT_STEPS}, "checkpoint": {"every_n_steps": 2, "num_to_keep": None},
           "strategy": "fsdp"}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


INSTRUCT_STEPS = 4


@pytest.fixture(scope="module")
def s3_instruct(reference, labelled_world, bucket):
    """Instruct on two FSDP2 workers from the align run's adapter, its checkpoints (steps 2 and 4)
    in the bucket, sharded (checkpoint.format auto under FSDP) and uploaded asynchronously (the
    default): the yardstick of the resume on other world sizes."""
    world, _ = labelled_world
    return run(validate(_instruct_raw(world, f"{bucket}/runs", "s3-instruct", init_adapter=f"{bucket}/runs/reference")))


def test_instruct_from_the_adapter_of_an_align_run_in_a_bucket(reference, s3_instruct, bucket):
    runs = f"{bucket}/runs"
    assert ckpt.is_complete(reference["checkpoint"])
    assert reference["checkpoint"] == f"{runs}/reference/{ckpt.step_dir_name(STEPS)}"
    instruct = s3_instruct
    saved = ckpt.load_checkpoint(instruct["checkpoint"])
    assert saved["meta"]["stage"] == "instruct"
    assert any(k.startswith("llm.") for k in saved["model"]) and any(k.startswith("adapter.") for k in saved["model"])
    assert not any(k.startswith("vision.") for k in saved["model"])
    # the adapter started from the align checkpoint, then moved
    start = _adapter(reference["checkpoint"])
    assert any(not torch.equal(saved["model"][k], start[k]) for k in start)
    assert "loss_sea" not in instruct["metrics"] and instruct["metrics"]["loss_lm"] > 0


def test_fsdp_checkpoints_are_sharded_every_rank_its_shard_and_one_missing_shard_makes_one_incomplete(
        s3_instruct, labelled_world, tmp_path):
    """Each FSDP rank wrote its own shard of the trainable tensors and of the optimizer state
    (nothing gathered on rank 0), Ray Train merged the ranks' folders into the step folder in the
    bucket, and meta.json lists every rank's files: without one shard the checkpoint is incomplete."""
    from sea_ray.train.loop import build_model

    uri = s3_instruct["checkpoint"]
    assert uri.endswith(ckpt.step_dir_name(INSTRUCT_STEPS))
    assert [s for s, _ in ckpt.list_checkpoints(s3_instruct["run"])] == [2, INSTRUCT_STEPS]
    meta = json.loads(storage.read_text(f"{uri}/{ckpt.META_FILE}"))
    assert meta["format"] == "sharded" and meta["world_size"] == 2
    for part in (ckpt.MODEL_DIR, ckpt.OPTIM_DIR):
        assert {f"{part}/.metadata", f"{part}/__0_0.distcp", f"{part}/__1_0.distcp"} <= set(meta["files"])
    assert ckpt.MODEL_FILE not in meta["files"]
    # trainable tensors only: the adapter and the LLM, at full size, not the frozen tower
    saved = ckpt.sharded_keys(uri)
    model, _ = build_model(validate(_instruct_raw(labelled_world[0], str(tmp_path), "unused")))
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert {k: shape for k, (shape, _) in saved.items()} == trainable
    # a copy of the checkpoint without rank 1's model shard
    fs, path = storage.fsspec_fs(uri)
    local = tmp_path / "run" / ckpt.step_dir_name(INSTRUCT_STEPS)
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    assert ckpt.is_complete(str(local))
    (local / "model" / "__1_0.distcp").unlink()
    assert not ckpt.is_complete(str(local)) and ckpt.latest_complete(str(tmp_path / "run")) is None


def test_a_sharded_run_resumes_on_one_worker_and_again_on_two_and_ends_where_the_uninterrupted_run_does(
        s3_instruct, labelled_world, tmp_path):
    """2 -> 1 -> 2 workers: the bucket run's step-2 checkpoint (2 FSDP workers) resumed on 1 worker
    (DCP reads both shards into the unsharded model; upload sync) to step 3, that checkpoint (1
    worker) resumed on 2 FSDP workers to the end: the final trainable tensors and the AdamW moments
    equal the uninterrupted 2-worker run's (same global batches; only the reduction order differs)."""
    world, _ = labelled_world
    fs, path = storage.fsspec_fs(f"{s3_instruct['run']}/{ckpt.step_dir_name(2)}")
    run_dir = tmp_path / "elastic"
    fs.get(path.rstrip("/") + "/", str(run_dir / ckpt.step_dir_name(2)) + "/", recursive=True)
    init = {"init_adapter": s3_instruct["run"].replace("s3-instruct", "reference")}
    one = run(validate(_instruct_raw(world, str(tmp_path), "elastic", scaling={"num_workers": 1},
                                     checkpoint={"every_n_steps": 1, "upload": "sync"}, **init)))
    assert [s for s, _ in ckpt.list_checkpoints(one["run"])] == [2, 3, 4]
    assert json.loads((run_dir / ckpt.step_dir_name(3) / ckpt.META_FILE).read_text())["world_size"] == 1
    # the 1-worker run as if stopped after step 3: its step-3 checkpoint alone in a run folder
    shutil.copytree(run_dir / ckpt.step_dir_name(3), tmp_path / "elastic-2" / ckpt.step_dir_name(3))
    two = run(validate(_instruct_raw(world, str(tmp_path), "elastic-2", **init)))
    assert [s for s, _ in ckpt.list_checkpoints(two["run"])] == [3, 4]
    assert json.loads(storage.read_text(f"{two['checkpoint']}/{ckpt.META_FILE}"))["world_size"] == 2
    got, want = ckpt.load_checkpoint(two["checkpoint"]), ckpt.load_checkpoint(s3_instruct["checkpoint"])
    assert got["state"] == want["state"] and set(got["model"]) == set(want["model"])
    diff = max((got["model"][k] - want["model"][k]).abs().max().item() for k in want["model"])
    print(f"2 -> 1 -> 2 workers vs uninterrupted: max abs difference of the trainable tensors {diff:.3g}")
    for key in want["model"]:
        torch.testing.assert_close(got["model"][key], want["model"][key], rtol=1e-4, atol=1e-6)
    got_adam, want_adam = got["optimizer"]["optimizer"]["state"], want["optimizer"]["optimizer"]["state"]
    assert set(got_adam) == set(want_adam)
    for key in want_adam:
        torch.testing.assert_close(got_adam[key]["exp_avg"], want_adam[key]["exp_avg"], rtol=1e-4, atol=1e-7)
        assert float(got_adam[key]["step"]) == float(want_adam[key]["step"]) == INSTRUCT_STEPS


def test_eval_and_export_read_a_sharded_checkpoint(s3_instruct, tmp_path):
    """The single-process readers take the sharded checkpoint in the bucket whole, without a
    process group: eval's model loading and export's LLaVA folder hold its trained tensors."""
    from safetensors.torch import load_file

    from sea_ray.eval.loading import load_model
    from sea_ray.export.llava import export

    state = ckpt.load_model_state(s3_instruct["checkpoint"])
    model, info = load_model(s3_instruct["run"])
    assert info["checkpoint"] == s3_instruct["checkpoint"] and info["stage"] == "instruct"
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    export(s3_instruct["run"], str(tmp_path / "hf"))
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    embed = [k for k in exported if k.endswith("embed_tokens.weight")]
    trained = state["llm.model.embed_tokens.weight"]  # the export appends the image token's row
    assert len(embed) == 1 and torch.equal(exported[embed[0]][: len(trained)], trained)


def test_lora_instruct_under_fsdp_checkpoints_its_lora_weights_and_the_adapter(reference, labelled_world, tmp_path):
    """LoRA on two FSDP2 workers (the frozen base sharded beside its LoRA weights): the checkpoint,
    gathered from the shards, holds every LoRA weight and the adapter, and no base weight."""
    world, _ = labelled_world
    lora = {"enabled": True, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    sigint = signal.getsignal(signal.SIGINT)
    instruct = run(validate({
        "job": "instruct", "model": {"preset": "tiny-openclip-llama", "llm": {"lora": lora}},
        "init_adapter": reference["run"], "run": {"name": "lora-fsdp", "storage": str(tmp_path)},
        "data": {"manifest": f"{world}/train/instruct.json", "image_root": f"{world}/images", "max_length": 96},
        "scaling": {"num_workers": 2}, "batch": {"global_size": 8, "per_worker": 4},
        "optim": {"max_steps": 2, "lr": 1e-2}, "checkpoint": {"every_n_steps": 2}, "strategy": "fsdp"}))
    saved = ckpt.load_checkpoint(instruct["checkpoint"])
    llm = {k for k in saved["model"] if k.startswith("llm.")}
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(llm) == 8 and all(".lora_A." in k or ".lora_B." in k for k in llm)
    assert set(saved["model"]) - llm == set(_adapter(reference["run"]))
    assert all(saved["model"][k].abs().max() > 0 for k in llm)  # lora_B left its zero init on both workers' steps
    assert instruct["metrics"]["loss_lm"] > 0
    # Ray Train's fit() leaves a SIGINT handler holding its controller actor; run() puts ours back
    assert signal.getsignal(signal.SIGINT) is sigint and not _train_controllers()


def _train_controllers():
    """The Ray Train controller actors this process still holds a handle to."""
    import ray

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, ray.actor.ActorHandle)
            and o._ray_actor_creation_function_descriptor.class_name.endswith("TrainController")]


def test_scale_out_semantics_and_schedule():
    from types import SimpleNamespace

    from sea_ray.train.loop import accumulation_steps, build_optimizer, total_steps

    cfg = SimpleNamespace(batch=SimpleNamespace(global_size=256, per_worker=16),
                          optim=SimpleNamespace(max_steps=None, epochs=1.0))
    # the global batch is fixed: accumulation absorbs the number of workers
    assert [accumulation_steps(cfg, w) * w * 16 for w in (1, 2, 8)] == [256, 256, 256]
    assert [accumulation_steps(cfg, w) for w in (1, 2, 8)] == [16, 8, 2]
    with pytest.raises(ValueError, match="not divisible"):
        accumulation_steps(cfg, 3)
    assert total_steps(cfg, 558_128) == 2180  # LCS-558K, one epoch at 256
    param = torch.nn.Parameter(torch.zeros(2, 2))
    model = torch.nn.Linear(1, 1)
    model.weight = param
    sched_cfg = SimpleNamespace(optim=SimpleNamespace(weight_decay=0.0, lr=1.0, betas=(0.9, 0.999),
                                                      warmup_ratio=3 / 13))
    optimizer, scheduler = build_optimizer(model, sched_cfg, 13)
    lrs = []
    for _ in range(14):
        lrs.append(round(scheduler.get_last_lr()[0], 3))
        optimizer.step()
        scheduler.step()
    assert [lrs[s] for s in (0, 2, 3, 8, 13)] == [0.0, 0.667, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("warmup, steps", [(0, 1), (0, 7), (3, 13), (5, 5), (2, 1000)])
def test_the_lr_schedule_is_transformers_cosine_with_warmup(warmup, steps):
    from transformers.optimization import get_cosine_schedule_with_warmup

    from sea_ray.train.loop import lr_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, warmup, steps).lr_lambdas[0]
    ours = lr_factor(warmup, steps)
    assert [ours(s) for s in range(steps + 1)] == pytest.approx([reference(s) for s in range(steps + 1)], abs=1e-12)


def test_tensorboard_events_reach_a_bucket_at_every_checkpoint_not_only_at_the_end(s3_bucket):
    from sea_ray.train.tracking import TensorBoard, Tracker

    board = TensorBoard(None, f"{s3_bucket}/run")
    tracker = Tracker([board])
    tracker.log({"loss_lm": 1.0}, 1)
    tracker.flush()  # what a checkpoint does mid-run
    fs, path = storage.fsspec_fs(f"{s3_bucket}/run/tensorboard")
    mid = {p: fs.size(p) for p in fs.find(path)}
    assert any("events.out.tfevents." in p for p in mid)
    tracker.log({"loss_lm": 0.5}, 2)
    tracker.close()
    fs.invalidate_cache()
    end = {p: fs.size(p) for p in fs.find(path)}
    assert set(end) == set(mid) and sum(end.values()) > sum(mid.values())  # the same files, grown
    assert board._local is None


def test_the_placement_strategy_and_an_elastic_range_reach_ray_train(tmp_path):
    from sea_ray.train.driver import make_trainer

    for strategy in ("PACK", "SPREAD"):
        cfg = validate({"job": "align", "data": {"manifest": str(tmp_path / "unused.json")}, "sea": {"enabled": False},
                        "model": {"preset": "tiny-openclip-llama"}, "run": {"storage": str(tmp_path)},
                        "scaling": {"num_workers": 2, "placement_strategy": strategy}})
        trainer = make_trainer(cfg, lambda config: None, {"validate": False}, [])
        assert trainer.scaling_config.placement_strategy == strategy
    cfg = validate({"job": "align", "data": {"manifest": str(tmp_path / "unused.json")}, "sea": {"enabled": False},
                    "model": {"preset": "tiny-openclip-llama"}, "run": {"storage": str(tmp_path)},
                    "scaling": {"num_workers": [1, 2], "resources_per_worker": {"slot": 1}, "resize_interval_s": 3}})
    scaling = make_trainer(cfg, lambda config: None, {"validate": False}, []).scaling_config
    assert scaling.num_workers == (1, 2) and scaling.elastic_resize_monitor_interval_s == 3
    assert scaling.resources_per_worker == {"CPU": 0.5, "slot": 1}


def test_worker_group_starts_are_recorded_and_read_back_oldest_first(tmp_path):
    from sea_ray.train import placement

    run_dir = str(tmp_path / "run")
    assert placement.starts(run_dir) == []
    placement.record(run_dir, 0, [{"rank": 1, "node_id": "b"}, {"rank": 0, "node_id": "a"}])
    placement.record(run_dir, 3, [{"rank": 0, "node_id": "a"}, {"rank": 1, "node_id": "a"}])
    (tmp_path / "run" / placement.FOLDER / "notes.txt").write_text("not a start")
    starts = placement.starts(run_dir)
    assert [(s["step"], s["world_size"]) for s in starts] == [(0, 2), (3, 2)]
    assert [w["node_id"] for w in starts[0]["workers"]] == ["a", "b"]  # by rank
