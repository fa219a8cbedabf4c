"""End to end on a real Ray cluster (token authentication off; on: tests/test_submit_token.py):
`ray start --head` on loopback, a moto S3 server holding the synthetic world, `sea-ray submit` of
the tiny pipeline reading and writing the bucket, twice at once; a search of Ray Train trials; a
stopped job; relative paths from a researcher's own folder.

The cluster is private to this module (tests/clusters.py): its own temp dir, free ports for every
Ray component, and its own process session, killed whole at the end. The session's `ray_local`
(address="local") never joins it, and it never joins that.

"What does not corrupt the other's outputs" means here: two runs of one pipeline on one output
never write beside each other. The first takes `<output>/_pipeline/LOCK` (an exclusive create:
`If-None-Match: *` on S3), the second fails at once with exit code 1 and touches nothing, and the
first run's outputs are complete. (Runs on different outputs share only read-only inputs.)
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from sea_ray import storage
from sea_ray.train import checkpoint as ckpt
from tests.clusters import BIN, REPO, LocalCluster, clean_env, sea_ray

pytestmark = [pytest.mark.slow]

PIPELINE = "workflows/configs/tiny_pipeline.yaml"
# The tiny pipeline, smaller: two optimizer steps per stage on the session's 60-image world
# (uploaded to the bucket: the world step is left out).
SMALL = ["steps=[labels,align,instruct,eval]",
         "align.set.optim.max_steps=2", "align.set.checkpoint.every_n_steps=2",
         "align.set.batch.global_size=8", "align.set.batch.per_worker=4",
         "instruct.set.optim.max_steps=2", "instruct.set.checkpoint.every_n_steps=2",
         "instruct.set.batch.global_size=8", "instruct.set.batch.per_worker=4"]


# The cluster's secret key (moto takes any): planted so that the tests can look for it everywhere.
CLUSTER_SECRET = f"sea-cluster-secret-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = LocalCluster(auth="disabled", secret=CLUSTER_SECRET).start()
    try:
        yield c
    finally:
        c.cleanup()


def _upload_world(world_dir: Path, uri: str) -> None:
    fs, path = storage.fsspec_fs(uri)
    files = sorted(p for p in Path(world_dir).rglob("*") if p.is_file())
    fs.put([str(p) for p in files], [f"{path}/{p.relative_to(world_dir).as_posix()}" for p in files])


def _bucket_objects(bucket: str) -> dict[str, bytes]:
    fs, path = storage.fsspec_fs(bucket)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(path)}


def _assert_complete_outputs(out: str, steps=("labels", "align", "instruct", "eval")) -> None:
    assert storage.exists(f"{out}/labels/_SUCCESS")
    assert json.loads(storage.read_text(f"{out}/labels/_meta.json"))["counts"]["labelled"] == 48
    for run, stage in (("tiny-align", "align"), ("tiny-instruct", "instruct")):
        if stage in steps:
            final = f"{out}/runs/{run}/{ckpt.step_dir_name(2)}"
            assert ckpt.latest_complete(f"{out}/runs/{run}") == final
            assert ckpt.load_checkpoint(final)["meta"]["stage"] == stage
    if "eval" in steps:
        report = json.loads(storage.read_text(f"{out}/eval/report.json"))
        assert report["stage"] == "instruct" and report["checkpoint"].endswith(ckpt.step_dir_name(2))
    assert storage.exists(f"{out}/_pipeline/plan.json")
    assert not storage.exists(f"{out}/_pipeline/LOCK")


# --------------------------------------------------------------------------- the tests


def test_tiny_pipeline_submitted_twice_at_once_reads_and_writes_a_bucket(cluster, s3_bucket, world_dir):
    """The tiny pipeline submitted twice at once to one output: one run writes every output (read
    from and written to the bucket, the credentials never leaving the cluster), the other stops at
    the lock at once and touches nothing; a third run afterwards skips every step."""
    _upload_world(world_dir, f"{s3_bucket}/world")
    secret = CLUSTER_SECRET  # the user has the same key here: it must not travel
    env = clean_env(RAY_AUTH_MODE="disabled", AWS_SECRET_ACCESS_KEY=secret)
    out = f"{s3_bucket}/tiny"
    args = ["submit", "--address", cluster.address, "--wait", "--cluster-env", "AWS_SECRET_ACCESS_KEY", "--",
            "pipeline", "--config", PIPELINE, f"output={out}", f"data.world={s3_bucket}/world", *SMALL]
    t0 = time.time()
    procs = [subprocess.Popen([str(BIN / "sea-ray"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    seconds = time.time() - t0
    codes = [p.returncode for p in procs]
    texts = [o + e for o, e in results]
    assert 0 in codes, "\n=====\n".join(t[-6000:] for t in texts)
    won = codes.index(0)
    stdout = results[won][0]
    if codes == [0, 0]:  # the second one started after the first had finished: it skipped every step
        assert sum('"status": "ran"' in o for o, _ in results) == 1
        assert any(o.count('"status": "skipped"') == 4 for o, _ in results)
        stdout = next(o for o, _ in results if '"status": "ran"' in o)
    else:  # the usual case: the second run found the lock and stopped at once
        assert sorted(codes) == [0, 1], texts[won ^ 1][-4000:]
        assert "another pipeline run writes this output" in texts[won ^ 1]
        assert "FAILED, exit code 1" in texts[won ^ 1]
    assert "SUCCEEDED" in stdout and '"status": "ran"' in stdout
    _assert_complete_outputs(out)
    plan = json.loads(storage.read_text(f"{out}/_pipeline/plan.json"))
    assert plan["steps"]["align"]["config"]["data"]["labels"] == f"{out}/labels"
    assert plan["steps"]["instruct"]["config"]["init_adapter"] == f"{out}/runs/tiny-align"
    # the credentials stayed on the cluster: not sent, not printed, not in the job metadata, the
    # bucket or anywhere on the cluster's disk (Ray's session logs included)
    assert "from the cluster's own environment: AWS_SECRET_ACCESS_KEY" in stdout
    assert not [t for t in texts if secret in t]
    with urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=30) as response:
        metadata = response.read().decode()
    assert "sea-pipeline-" in metadata and secret not in metadata
    assert not [k for k, v in _bucket_objects(s3_bucket).items() if secret.encode() in v]
    assert cluster.files_containing(secret) == []
    print(f"\ntwo submit --wait of the tiny pipeline at once: {seconds:.1f} s")

    again = sea_ray(*args, env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count('"status": "skipped"') == 4 and '"status": "ran"' not in again.stdout

    listing = sea_ray("jobs", "--address", cluster.address, "list", env=env, timeout=120)
    assert listing.returncode == 0 and listing.stdout.count("SUCCEEDED") >= 2 and secret not in listing.stdout


def test_a_search_of_ray_train_trials_submitted_to_a_cluster(cluster, s3_bucket, world_dir):
    """`sea-ray tune` with trial_mode=ray_train on the cluster (its dashboard on): each trial is a
    2-worker TorchTrainer run; trials, checkpoints and results live in the bucket."""
    import pandas as pd

    from sea_ray.config.loading import validate
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.tune.trials import EXECUTIONS
    from sea_ray.world.oracle import write_oracle_labels

    _upload_world(world_dir, f"{s3_bucket}/world")
    tiny = validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                     "data": {"manifest": "unused", "labels": "unused"}, "batch": {"global_size": 8, "per_worker": 8}})
    tower = build_vision_tower(tiny.model.vision, tiny.data.image_aspect)
    write_oracle_labels(world_dir, f"{s3_bucket}/labels", 8, tower.transform_spec(), top_n=10)
    exp = f"{s3_bucket}/tune/search"
    overrides = [f"base.data.manifest={s3_bucket}/world/train/pretrain.json",
                 f"base.data.image_root={s3_bucket}/world/images", f"base.data.labels={s3_bucket}/labels",
                 f"base.run.storage={s3_bucket}/tune", "base.run.name=search", "trial_mode=ray_train",
                 "num_samples=2", "max_concurrent=1", "optuna.n_startup_trials=1", "report_every_n_steps=2",
                 "validation.num_images=8", "plots=false", "base.scaling.num_workers=2",
                 "base.scaling.cpus_per_worker=0.5", "base.batch.global_size=8", "base.batch.per_worker=4",
                 "base.optim.max_steps=4", "base.checkpoint.every_n_steps=2"]
    done = sea_ray("submit", "--address", cluster.address, "--wait", "--", "tune", "--config",
                   "workflows/configs/tiny_tune.yaml", *overrides, env=clean_env(RAY_AUTH_MODE="disabled"),
                   timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    fs, path = storage.fsspec_fs(exp)
    table = pd.read_csv(fs.open(f"{path}/results.csv"))
    assert len(table) == 2 and set(table["status"]) <= {"completed", "stopped"}
    assert (table["status"] == "completed").any() and table["val_sea_loss"].notna().all()
    for trial_id, status, steps in zip(table["trial_id"], table["status"], table["steps"]):
        trial = f"{exp}/trials/{trial_id}"
        executions = json.loads(storage.read_text(f"{trial}/{EXECUTIONS}"))
        assert [e["mode"] for e in executions] == ["ray_train"]
        if status == "completed":
            assert steps == 4 and storage.exists(f"{trial}/step_00000004/_COMPLETE")
    assert storage.exists(f"{exp}/best.yaml")


def test_stopping_a_pipeline_job_releases_its_lock(cluster, s3_bucket, world_dir):
    """`sea-ray jobs stop` sends SIGTERM: the pipeline releases `_pipeline/LOCK`, so the next run on
    that output starts without --break-lock."""
    _upload_world(world_dir, f"{s3_bucket}/world")
    env = clean_env(RAY_AUTH_MODE="disabled")
    out = f"{s3_bucket}/stopped"
    sid = f"sea-stop-{secrets.token_hex(4)}"
    started = sea_ray("submit", "--address", cluster.address, "--submission-id", sid, "--", "pipeline", "--config",
                      PIPELINE, f"output={out}", f"data.world={s3_bucket}/world", *SMALL, env=env, timeout=300)
    assert started.returncode == 0 and f"submitted {sid}" in started.stdout, started.stderr[-3000:]
    deadline = time.time() + 300
    while not storage.exists(f"{out}/_pipeline/LOCK"):
        assert time.time() < deadline, "the pipeline never took its lock"
        time.sleep(0.5)
    stopped = sea_ray("jobs", "--address", cluster.address, "stop", sid, env=env, timeout=120)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    released = time.time() + 30
    while storage.exists(f"{out}/_pipeline/LOCK") and time.time() < released:
        time.sleep(0.5)
    if storage.exists(f"{out}/_pipeline/LOCK"):
        logs = sea_ray("jobs", "--address", cluster.address, "logs", sid, env=env, timeout=120)
        pytest.fail(f"the stopped job left its lock; its log ends:\n{logs.stdout[-6000:]}")
    status = sea_ray("jobs", "--address", cluster.address, "status", sid, env=env, timeout=120)
    assert "STOPPED" in status.stdout


def test_relative_paths_submitted_from_outside_the_repo(cluster, world_dir, tmp_path):
    """A researcher's own folder: `sea-ray submit --working-dir . -- labels --config cfg.yaml` with
    relative inputs (inside the upload: they reach the job) and a relative output: refused before
    submission with the value to write; with that value the outputs land where the user pointed,
    and nothing is written into the job's package folder."""
    project = tmp_path / "project"
    shutil.copytree(world_dir, project / "world")
    (project / "cfg.yaml").write_text((REPO / "workflows/configs/tiny_labels.yaml").read_text())
    env = clean_env(RAY_AUTH_MODE="disabled")
    args = ["submit", "--address", cluster.address, "--wait", "--working-dir", ".", "--", "labels", "--config",
            "cfg.yaml", "data.manifest=world/train/pretrain.json", "data.image_root=world/images"]

    def run(*extra):
        return subprocess.run([str(BIN / "sea-ray"), *args, *extra], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)

    refused = run("output=labels")
    assert refused.returncode == 2, (refused.stdout + refused.stderr)[-4000:]
    assert "output: 'labels' is a relative path" in refused.stderr
    assert f"output={project / 'labels'}" in refused.stderr and "submitting" not in refused.stdout
    done = run(f"output={project / 'labels'}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    meta = json.loads((project / "labels" / "_meta.json").read_text())
    assert meta["counts"]["labelled"] == 48 and (project / "labels" / "_SUCCESS").is_file()
    assert not list(Path(cluster.temp_dir).rglob("_SUCCESS")), "an output was written into Ray's folders"
