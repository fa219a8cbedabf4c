"""Multi-node Ray on one machine, and a node lost mid-job: a private cluster of a head (no CPUs:
no work on the head, as on the real clusters of cluster/) and two worker nodes of 1 logical CPU
each (tests/clusters.py, every node in its own process session), the jobs submitted as a user runs
them (``python -m sea_ray.cli <job> --config FILE`` with ``RAY_ADDRESS``).

- the labels job (Ray Data) labels on both worker nodes (the node ids each shard's marker records);
  with one worker node killed after the first shard is marked, it still ends with every image id
  exactly once and the same labels;
- align (Ray Train, 2 workers, ``scaling.placement_strategy: SPREAD``) puts one worker on each node
  (the run's ``workers/`` records); with the node of rank 0 killed after the first checkpoint,
  ``max_failures`` restarts the group on the node left, which resumes from that checkpoint and ends
  with the same adapter as the uninterrupted run.

Opt-in (``-m multinode``): minutes of start-up and training on 2 cores. The numbers measured
(node death noticed after, steps lost, max abs adapter difference, wall and CPU time) are
printed as ``multinode:`` lines (``-s`` shows them)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sea_ray.labels import dataset as D
from sea_ray.train import checkpoint as ckpt
from sea_ray.train import placement
from tests.clusters import REPO, LocalCluster
from tests.faults import act_when

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

STEPS, EVERY = 6, 3
ROWS_PER_SHARD = 6  # the session world's 60 images: 10 shards
# Ray's node health check (GCS): a node that stops answering is marked dead after about
# period x threshold (Ray's defaults: 3 s x 5); Ray Train's and Ray Data's test settings.
NODE_ENV = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "4", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}


def _say(what: str, **numbers) -> None:
    print(f"multinode: {what} {json.dumps(numbers, sort_keys=True)}", flush=True)


@pytest.fixture(scope="module")
def cluster():
    started = time.time()
    c = LocalCluster(num_cpus=0, object_store_mb=256, system_env=NODE_ENV).start()
    try:
        c.add_node(1, "sea_node_a")
        c.add_node(1, "sea_node_b")
        _say("cluster up", seconds=round(time.time() - started, 1))
        yield c
        _say("cluster CPU", seconds=round(c.cpu_seconds(), 1), wall_s=round(time.time() - started, 1))
    finally:
        c.cleanup()


def _worker_nodes(cluster) -> set[str]:
    return {n.node_id for n in cluster.nodes if n.sid is not None}


def _start(cluster, job: str, raw: dict, path: Path) -> subprocess.Popen:
    """``python -m sea_ray.cli JOB --config PATH`` against the cluster, its output in PATH.log."""
    path.write_text(yaml.safe_dump(raw))
    log = open(path.with_suffix(".log"), "w")
    env = cluster.env(RAY_ADDRESS=cluster.gcs_address)
    return subprocess.Popen([sys.executable, "-m", "sea_ray.cli", job, "--config", str(path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, path: Path, timeout: float = 1500) -> str:
    rc = proc.wait(timeout=timeout)
    out = path.with_suffix(".log").read_text()
    assert rc == 0, out[-6000:]
    return out


# --------------------------------------------------------------------------- labels (Ray Data)


@pytest.fixture(scope="module")
def all_images(world_dir, tmp_path_factory) -> Path:
    rows = [r for split in ("train", "val", "test") for r in json.loads((world_dir / split / "pretrain.json").read_text())]
    path = tmp_path_factory.mktemp("multinode-manifest") / "all.json"
    path.write_text(json.dumps(rows))
    return path


def _labels_raw(manifest: Path, images: Path, out: Path) -> dict:
    return {"job": "labels", "output": str(out), "model": {"preset": "tiny-openclip-llama"},
            "data": {"manifest": str(manifest), "image_root": str(images)}, "vocab": {"min_count": 1},
            "labeler": {"top_n": 3, "batch_size": ROWS_PER_SHARD},
            # two labelers at 1/4 CPU each: one per worker node (Ray Data spreads its actors), and
            # room on either node alone for both, as after a node is lost
            "compute": {"num_actors": 2, "cpus_per_actor": 0.25, "cpus_per_decode_task": 0.25,
                        "rows_per_shard": ROWS_PER_SHARD}}


def _labels_by_id(out: Path) -> dict:
    table = D.read_labels(str(out))
    ids = table["image_id"].to_pylist()
    lab = table["label_ids"].to_pylist()
    return {"ids": ids, "labels": dict(zip(ids, lab))}


LABELER = "MapWorker(MapBatches(LabelActor))"  # Ray Data's actor of the labels job's labeler


@pytest.fixture(scope="module")
def labels_reference(cluster, world_dir, all_images, tmp_path_factory):
    """The labels job over the cluster, uninterrupted: (output, its markers, wall seconds, the
    nodes its labelers were placed on)."""
    work = tmp_path_factory.mktemp("multinode-labels")
    before = {a["actor_id"] for a in cluster.actors(LABELER)}
    started = time.time()
    proc = _start(cluster, "labels", _labels_raw(all_images, world_dir / "images", work / "ref"), work / "ref.yaml")
    _finish(proc, work / "ref.yaml")
    seconds = time.time() - started
    labelers = [a["node_id"] for a in cluster.actors(LABELER) if a["actor_id"] not in before]
    return work / "ref", D.LabelsDir(str(work / "ref")).markers(), seconds, labelers


def test_the_labels_job_runs_on_both_worker_nodes(labels_reference, cluster, all_images):
    """Its two labelers are placed one on each worker node (Ray's actor table); its decode tasks
    ran on both and its rows were labelled on worker nodes only (the nodes each shard's marker
    names). Which labeler labels how many rows is Ray Data's choice (the first one up may take
    them all)."""
    out, markers, seconds, labelers = labels_reference
    nodes = _worker_nodes(cluster)
    assert len(nodes) == 2 and sorted(labelers) == sorted(nodes), f"labelers on {labelers}, worker nodes {nodes}"
    decoded_on = {n for m in markers.values() for n in m["nodes"]["decode"]}
    labelled_on = {n for m in markers.values() for n in m["nodes"]["label"]}
    assert decoded_on == nodes, "the decode tasks did not run on both worker nodes"
    assert labelled_on and labelled_on <= nodes  # the head has no CPU for a labeler
    want = [r["id"] for r in json.loads(all_images.read_text())]
    got = _labels_by_id(out)["ids"]
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    _say("labels, uninterrupted", seconds=round(seconds, 1), shards=len(markers), images=len(got),
         rows_labelled_on_nodes=len(labelled_on))


def test_the_labels_job_survives_a_lost_node(labels_reference, cluster, world_dir, all_images, tmp_path):
    """Kill a worker node (its raylet, labeler, tasks and object store) once the first shard is
    marked: Ray Data retries the lost tasks and restarts the lost labeler on the node left; every
    image id is in the output exactly once, with the labels of the uninterrupted run."""
    ref_out, ref_markers, _, _ = labels_reference
    out = tmp_path / "killed"
    victim = cluster.nodes[-1]
    markers_dir = out / D.MARKERS
    started = time.time()
    proc = _start(cluster, "labels", _labels_raw(all_images, world_dir / "images", out), tmp_path / "killed.yaml")

    def marked() -> list[str]:
        return sorted(p.name for p in markers_dir.glob("*.json")) if markers_dir.exists() else []

    def lose_node():
        at_kill = marked()
        victim.kill()
        return at_kill, cluster.wait_for_death(victim.node_id)

    thread, done = act_when(lambda: bool(marked()), lose_node, poll_s=0.02)
    text = _finish(proc, tmp_path / "killed.yaml")
    thread.join(timeout=150)
    assert done, f"the job ended before its first shard was seen:\n{text[-3000:]}"
    at_kill, noticed = done[0]
    assert 0 < len(at_kill) < len(ref_markers), f"the node was not lost mid-job ({len(at_kill)} shards marked)"
    got, want = _labels_by_id(out), _labels_by_id(ref_out)
    assert len(got["ids"]) == len(set(got["ids"])), "an image id is in the output twice"
    assert sorted(got["ids"]) == sorted(want["ids"]), "an image id is missing"
    assert got["labels"] == want["labels"]
    markers = D.LabelsDir(str(out)).markers()
    assert sorted(markers) == sorted(ref_markers) and sum(m["rows"] for m in markers.values()) == len(want["ids"])
    _say("labels, node lost", seconds=round(time.time() - started, 1), shards_marked_at_kill=len(at_kill),
         shards=len(markers), exactly_once=True, node_dead_after_s=round(noticed, 1))
    cluster.nodes.remove(victim)
    victim.stop()
    cluster.add_node(1, "sea_node_c")  # as an autoscaler or KubeRay replaces a lost node


# --------------------------------------------------------------------------- align (Ray Train)


@pytest.fixture(scope="module")
def oracle_labels(world_dir, tmp_path_factory) -> str:
    from sea_ray.config.loading import validate
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.world.oracle import write_oracle_labels

    cfg = validate(_align_raw(world_dir, "unused", "unused", "unused"))
    out = str(tmp_path_factory.mktemp("multinode-oracle"))
    write_oracle_labels(world_dir, out, 8, build_vision_tower(cfg.model.vision, cfg.data.image_aspect).transform_spec())
    return out


def _align_raw(world, labels, storage_uri, name) -> dict:
    return {"job": "align", "model": {"preset": "tiny-openclip-llama"},
            "run": {"name": name, "storage": str(storage_uri), "seed": 3},
            "data": {"manifest": f"{world}/train/pretrain.json", "image_root": f"{world}/images",
                     "labels": str(labels), "max_length": 48, "preprocess_cpus": 0.25},
            # 2 workers and their preprocessing actors at 1/4 CPU each: one node can hold them all
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.25, "placement_strategy": "SPREAD"},
            "batch": {"global_size": 8, "per_worker": 4}, "optim": {"max_steps": STEPS, "lr": 2e-3},
            "checkpoint": {"every_n_steps": EVERY, "num_to_keep": None},
            "sea": {"top_n": 3, "negatives": "global"}, "log_every_n_steps": 1, "max_failures": 1}


def _adapter(run_dir) -> dict:
    state = ckpt.load_model_state(ckpt.resolve(str(run_dir)))
    return {k: v for k, v in state.items() if k.startswith("adapter.") or k.startswith("sea_head.")}


def _steps_reported(log: str) -> list[int]:
    """The steps of the driver's progress lines (``align step N/T ...``), in order."""
    import re

    return [int(m) for m in re.findall(rf"align step (\d+)/{STEPS}\b", log)]


@pytest.fixture(scope="module")
def align_reference(cluster, world_dir, oracle_labels, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode-align")
    started = time.time()
    proc = _start(cluster, "align", _align_raw(world_dir, oracle_labels, work, "reference"), work / "ref.yaml")
    _finish(proc, work / "ref.yaml")
    return work / "reference", time.time() - started


def test_align_puts_one_worker_on_each_node(align_reference, cluster):
    run_dir, seconds = align_reference
    starts = placement.starts(str(run_dir))
    assert [s["step"] for s in starts] == [0] and starts[0]["world_size"] == 2
    nodes = [w["node_id"] for w in starts[0]["workers"]]
    assert [w["rank"] for w in starts[0]["workers"]] == [0, 1]
    assert len(set(nodes)) == 2 and set(nodes) == _worker_nodes(cluster), \
        f"SPREAD did not put the workers on both worker nodes: {nodes}"
    assert ckpt.latest_complete(str(run_dir)).endswith(ckpt.step_dir_name(STEPS))
    _say("align, uninterrupted", seconds=round(seconds, 1), steps=STEPS)


def test_align_survives_the_loss_of_rank_0s_node(align_reference, cluster, world_dir, oracle_labels, tmp_path):
    """Kill the node of rank 0 (the worker that writes checkpoints) once the first checkpoint is
    complete: Ray Train notices the lost workers, ``max_failures: 1`` restarts the group, which
    now fits on the node left, resumes from that checkpoint and ends with the reference adapter."""
    import torch

    ref_dir, _ = align_reference
    run_dir = tmp_path / "lost"
    first = run_dir / ckpt.step_dir_name(EVERY)
    started = time.time()
    proc = _start(cluster, "align", _align_raw(world_dir, oracle_labels, tmp_path, "lost"), tmp_path / "lost.yaml")
    by_id = {n.node_id: n for n in cluster.nodes}

    def lose_rank0_node():
        node = by_id[placement.starts(str(run_dir))[0]["workers"][0]["node_id"]]
        done_before = ckpt.is_complete(str(run_dir / ckpt.step_dir_name(STEPS)))
        node.kill()
        return node, done_before, cluster.wait_for_death(node.node_id)

    thread, done = act_when(lambda: ckpt.is_complete(str(first)), lose_rank0_node, poll_s=0.02)
    log = _finish(proc, tmp_path / "lost.yaml")
    thread.join(timeout=150)
    assert done, f"the run ended before its first checkpoint was seen:\n{log[-3000:]}"
    victim, finished_before, noticed = done[0]
    assert not finished_before, "the run had ended before its node was lost"
    starts = placement.starts(str(run_dir))
    assert [s["step"] for s in starts] == [0, EVERY], f"not one restart from the step-{EVERY} checkpoint: {starts}"
    assert victim.node_id not in {w["node_id"] for w in starts[1]["workers"]}
    assert ckpt.latest_complete(str(run_dir)).endswith(ckpt.step_dir_name(STEPS))
    got, want = _adapter(run_dir), _adapter(ref_dir)
    assert sorted(got) == sorted(want)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    reported = _steps_reported(log)
    restart = next((i for i in range(1, len(reported)) if reported[i] <= reported[i - 1]), None)
    lost = (reported[restart - 1] - EVERY) if restart is not None else 0
    _say("align, rank 0's node lost", seconds=round(time.time() - started, 1), resumed_from_step=starts[1]["step"],
         steps_lost=lost, steps_reported=reported, max_abs_adapter_diff=diff, node_dead_after_s=round(noticed, 1))
    for key in want:  # the same steps on the same rows with the same randomness: the same numbers
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    cluster.nodes.remove(victim)
    victim.stop()
