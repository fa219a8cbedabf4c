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
  with the same adapter as the uninterrupted run;
- an elastic align (``scaling.num_workers: [1, 2]``, one trainer slot per node) shrinks to 1 worker
  when a node is lost and grows back to 2 when a node joins, and ends with the adapter of a run
  that never changed size (the global batch is fixed: accumulation follows the live size).

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
            # Ray Train's preemption watcher (on by default; tests/conftest.py turns it off for the
            # session Ray) polls the GCS for drained nodes each second
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            "RAY_TRAIN_METRICS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}


# every worker node holds one trainer slot: an elastic group of workers needing one each fits one per node
SLOT = {"sea_slot": 1}


def _say(what: str, **numbers) -> None:
    print(f"multinode: {what} {json.dumps(numbers, sort_keys=True)}", flush=True)


@pytest.fixture(scope="module")
def cluster():
    started = time.time()
    c = LocalCluster(num_cpus=0, object_store_mb=256, system_env=NODE_ENV).start()
    try:
        c.add_node(1, "sea_node_a", SLOT)
        c.add_node(1, "sea_node_b", SLOT)
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
    cluster.add_node(1, "sea_node_c", SLOT)  # as an autoscaler or KubeRay replaces a lost node


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


def _steps_reported(log: str, total: int = STEPS) -> list[int]:
    """The steps of the driver's progress lines (``align step N/T ...``), in order."""
    import re

    return [int(m) for m in re.findall(rf"align step (\d+)/{total}\b", log)]


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


# --------------------------------------------------------------------------- an elastic group

# 40 epochs of the 48-image split: a step takes 0.2-0.5 s here, and a shrink or a grow takes Ray
# Train 20-80 s (a node's death noticed, the old group shut down, a node started, a resize
# considered, the new group started): the 1-worker phase must outlast the start of a node
ELASTIC_STEPS = 240


def _elastic_raw(world, labels, storage_uri, name, workers) -> dict:
    raw = _align_raw(world, labels, storage_uri, name)
    raw["scaling"].update(num_workers=workers, resources_per_worker=SLOT, resize_interval_s=3)
    raw["optim"]["max_steps"] = ELASTIC_STEPS
    raw["checkpoint"]["every_n_steps"] = 10
    raw["log_every_n_steps"] = 1
    # local negatives: global ones are the micro-batches of one accumulation round across the
    # workers, a pool that changes with the number of workers (docs/clusters.md#elastic)
    raw["sea"]["negatives"] = "local"
    raw["max_failures"] = 2
    return raw


@pytest.fixture(scope="module")
def fixed_reference(cluster, world_dir, oracle_labels, tmp_path_factory) -> Path:
    """An uninterrupted 2-worker align of ELASTIC_STEPS: the yardstick of the elastic and the
    preemption tests (how often a run checkpoints does not change its numbers)."""
    while len(_worker_nodes(cluster)) < 2:
        cluster.add_node(1, f"sea_node_{len(cluster.nodes)}x", SLOT)
    work = tmp_path_factory.mktemp("multinode-fixed")
    proc = _start(cluster, "align", _elastic_raw(world_dir, oracle_labels, work, "fixed", 2), work / "fixed.yaml")
    _finish(proc, work / "fixed.yaml")
    return work / "fixed"


def test_an_elastic_group_shrinks_when_a_node_is_lost_grows_when_one_joins_and_optimises_the_same(
        cluster, fixed_reference, world_dir, oracle_labels, tmp_path):
    """2 workers -> node lost -> 1 worker (twice the accumulation) -> a node joins -> 2 workers:
    the final adapter equals the one of a fixed 2-worker run, and every logged step counts the
    same global batch."""
    import re

    import torch

    while len(_worker_nodes(cluster)) < 2:
        cluster.add_node(1, f"sea_node_{len(cluster.nodes)}x", SLOT)
    run_dir = tmp_path / "elastic"
    started = time.time()
    proc = _start(cluster, "align", _elastic_raw(world_dir, oracle_labels, tmp_path, "elastic", [1, 2]),
                  tmp_path / "elastic.yaml")
    events = {}

    def shrink():  # after the step-10 checkpoint: the node of rank 1 lost
        node = next(n for n in cluster.nodes
                    if n.node_id == placement.starts(str(run_dir))[0]["workers"][1]["node_id"])
        node.kill()
        events["killed"] = node
        events["dead_after_s"] = cluster.wait_for_death(node.node_id)

    def one_worker_started() -> bool:
        starts = placement.starts(str(run_dir))
        return bool(starts) and starts[-1]["world_size"] == 1

    def grow():  # once the group runs on 1 worker: a node joins (an autoscaler's replacement)
        events["shrunk_at_step"] = placement.starts(str(run_dir))[-1]["step"]
        events["joined"] = cluster.add_node(1, f"sea_node_{len(cluster.nodes)}e", SLOT)

    killer, killed = act_when(lambda: ckpt.is_complete(str(run_dir / ckpt.step_dir_name(10))), shrink, poll_s=0.02)
    grower, grown = act_when(lambda: "killed" in events and one_worker_started(), grow, poll_s=0.05, timeout=900)
    log = _finish(proc, tmp_path / "elastic.yaml")
    killer.join(timeout=150)
    grower.join(timeout=150)
    assert killed and grown, f"the run ended before it shrank and grew ({events}):\n{log[-3000:]}"
    starts = placement.starts(str(run_dir))
    sizes = [s["world_size"] for s in starts]
    assert sizes[:2] == [2, 1] and sizes[-1] == 2, f"not 2 -> 1 -> 2 workers: {starts}"
    assert ckpt.latest_complete(str(run_dir)).endswith(ckpt.step_dir_name(ELASTIC_STEPS))
    per_step = {int(m[0]): float(m[1]) for m in re.findall(r"align step (\d+)/\d+ .*?samples/step (\S+)", log)}
    assert per_step and set(per_step.values()) == {8.0}, per_step  # the global batch, at every size
    got, want = _adapter(run_dir), _adapter(fixed_reference)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    reported = _steps_reported(log, ELASTIC_STEPS)
    restarts = [i for i in range(1, len(reported)) if reported[i] <= reported[i - 1]]
    lost = sum(reported[i - 1] - reported[i] + 1 for i in restarts)
    _say("align, elastic 2 -> 1 -> 2", seconds=round(time.time() - started, 1),
         world_sizes=sizes, start_steps=[s["step"] for s in starts], steps_redone=lost,
         max_abs_adapter_diff=diff, node_dead_after_s=round(events["dead_after_s"], 1))
    for key in want:  # the same global batches; 1 worker sums its two micro-batches in another order
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    cluster.nodes.remove(events["killed"])
    events["killed"].stop()


# --------------------------------------------------------------------------- spot preemption

GRACE_S = 30  # the drain's deadline after SIGTERM (GCP spot's grace; Kubernetes' default)
PREEMPT = {"sea_spot": 1}  # the guarded nodes' trainer slot


def test_a_preempted_node_gets_a_just_in_time_checkpoint_and_the_restart_counts_apart(
        cluster, fixed_reference, world_dir, oracle_labels, tmp_path):
    """Two workers on spot nodes (each run by ``sea-ray node-guard``); SIGTERM to the node of
    rank 1 mid-run, as a cloud reclaiming it sends it: the node is drained (deadline 20 s), every
    worker takes a just-in-time checkpoint, Ray Train ends the group at the deadline, the node
    ends (at 30 s at the latest), and the group restarts (on a node that joins meanwhile) from
    that checkpoint, though the run makes no other checkpoint before its last step and
    ``max_failures`` is 0: the preemption counts against ``max_preemptions``. The final adapter
    equals the uninterrupted run's."""
    import torch

    spot = [cluster.add_node(1, f"sea_spot_{i}", PREEMPT, guard_grace_s=GRACE_S) for i in range(2)]
    raw = _elastic_raw(world_dir, oracle_labels, tmp_path, "spot", 2)
    raw["scaling"]["resources_per_worker"] = PREEMPT
    raw["checkpoint"]["every_n_steps"] = 1000  # none but the last: what a restart resumes from is the notice's
    raw.update(max_failures=0, max_preemptions=1)
    run_dir = tmp_path / "spot"
    started = time.time()
    proc = _start(cluster, "align", raw, tmp_path / "spot.yaml")
    events = {}

    def reclaim():  # a few steps in: the cloud reclaims the node of rank 1, and a replacement joins
        node_id = placement.starts(str(run_dir))[0]["workers"][1]["node_id"]
        victim = next(n for n in spot if n.node_id == node_id)
        events.update(victim=victim, at=time.time())
        victim.preempt()
        events["replacement"] = cluster.add_node(1, "sea_spot_2", PREEMPT, guard_grace_s=GRACE_S)

    log_path = (tmp_path / "spot.yaml").with_suffix(".log")
    thread, done = act_when(lambda: max(_steps_reported(log_path.read_text(), ELASTIC_STEPS), default=0) >= 3,
                            reclaim, poll_s=0.1)
    log = _finish(proc, tmp_path / "spot.yaml")
    thread.join(timeout=150)
    assert done, f"the run ended before the node was reclaimed ({events}):\n{log[-3000:]}"
    victim = events["victim"]
    deadline = time.time() + 60
    while not victim.gone() and time.time() < deadline:
        time.sleep(0.2)
    assert victim.gone(), "node-guard did not stop the preempted node"
    import re

    starts = placement.starts(str(run_dir))
    saved = sorted(s for s, _ in ckpt.list_checkpoints(str(run_dir)))
    assert len(starts) == 2, f"not one restart: {starts}"
    jit = {int(s) for s in re.findall(r"just-in-time checkpoint at step (\d+)", log)}
    assert len(jit) == 1, f"not one just-in-time checkpoint (every rank says it): {jit}"
    (jit,) = jit
    assert starts[1]["step"] == jit and 0 < jit < ELASTIC_STEPS, (starts, jit)
    assert saved == [jit, ELASTIC_STEPS], saved  # num_to_keep: none, so nothing was deleted
    assert victim.node_id not in {w["node_id"] for w in starts[1]["workers"]}
    reported = _steps_reported(log, ELASTIC_STEPS)
    restart = next(i for i in range(1, len(reported)) if reported[i] <= reported[i - 1])
    lost = reported[restart - 1] - jit
    got, want = _adapter(run_dir), _adapter(fixed_reference)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    _say("align, spot node preempted", seconds=round(time.time() - started, 1), just_in_time_step=jit,
         steps_trained_after_it=lost, checkpoints=saved, max_abs_adapter_diff=diff, grace_s=GRACE_S)
    for key in want:  # the same steps on the same rows with the same randomness: the same numbers
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    for node in (victim, events["replacement"], *spot):
        if node in cluster.nodes:
            cluster.nodes.remove(node)
        node.stop()
