"""Object storage that stops answering: a real S3-compatible server (moto's, in a process of its
own so it can be paused with SIGSTOP, as a hung or restarting server looks to a client) under
pyarrow and s3fs, and under an align run whose checkpoints live in it; and the one-line errors of
an object store that is gone or a bucket that does not exist."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from sea_ray import storage

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pausable_s3(monkeypatch):
    """A moto server process on loopback, its endpoint and credentials in this process's
    environment (and so in every process started from here); yields its ``Popen``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    deadline = time.time() + 60
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    try:
        yield server
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
            server.kill()
        server.wait()


def _paused(server, seconds: float) -> threading.Timer:
    """Pause the server now, resume it after ``seconds``."""
    def resume():
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)

    os.kill(server.pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, resume)
    timer.start()
    return timer


def test_pyarrow_and_s3fs_ride_out_a_20_s_pause_with_the_default_retries(pausable_s3):
    storage.write_text("s3://outage/a.txt", "hello")
    for name, read in (("pyarrow", lambda: _pyarrow_read("s3://outage/a.txt")),
                       ("s3fs", lambda: storage.read_text("s3://outage/a.txt"))):
        t0 = time.time()
        _paused(pausable_s3, 20).join(0)
        assert read() in ("hello", b"hello"), name
        assert time.time() - t0 >= 19, f"{name} answered while the server was paused"
        time.sleep(0.5)


def _pyarrow_read(uri):
    fs, path = storage.pyarrow_fs(uri)
    fs.get_file_info(path)  # a HEAD, as Ray Train's storage calls make
    with fs.open_input_stream(path) as f:
        return f.read()


def test_past_the_retries_the_error_is_one_line_naming_the_key(pausable_s3, monkeypatch):
    storage.write_text("s3://outage/b.txt", "hello")
    monkeypatch.setenv(storage.S3_ATTEMPTS_VAR, "2")
    monkeypatch.setenv(storage.S3_TIMEOUT_VAR, "1")
    timer = _paused(pausable_s3, 8)
    try:
        with pytest.raises(OSError) as failed:
            _pyarrow_read("s3://outage/b.txt")
    finally:
        timer.join()
    line = storage.storage_error(failed.value)
    assert "\n" not in line and "'b.txt'" in line and "bucket 'outage'" in line
    assert "tried 2 times, 1 s each" in line and storage.S3_ATTEMPTS_VAR in line


def _sea_ray(*args, timeout=600):
    return subprocess.run([os.path.join(BIN, "sea-ray"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_missing_buckets_end_in_one_error_line_and_a_world_can_be_written_to_a_bucket(pausable_s3, tmp_path):
    made = _sea_ray("world", "--out", "s3://outage/world", "--num-images", "6", "--image-size", "64")
    assert made.returncode == 0, made.stderr[-3000:]
    assert storage.exists("s3://outage/world/world.json") and storage.exists("s3://outage/world/images/world_000005.png")
    assert not os.path.exists(os.path.join(REPO, "s3:"))
    missing = _sea_ray("world", "--out", "s3://no-such-bucket/world", "--num-images", "2", "--image-size", "64")
    assert missing.returncode == 1
    errors = [line for line in missing.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
    assert errors == ["error: s3://no-such-bucket/world: The specified bucket does not exist (-v shows the traceback)"]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}]))
    imported = _sea_ray("import-manifest", "--input", str(manifest), "--output", "s3://gone/m")
    assert imported.returncode == 1 and "Traceback" not in imported.stderr
    assert "error: s3://gone/m" in imported.stderr and "The specified bucket does not exist" in imported.stderr


@pytest.mark.slow
def test_an_align_run_rides_out_a_20_s_pause_of_the_bucket_holding_its_checkpoints(pausable_s3, world_dir, tmp_path):
    """The run waits out the pause (its next checkpoint upload) and finishes. The report that led
    here had 4 of 4 such runs die 16-18 s into a pause with a Ray Train ControllerError (AWS Error
    NETWORK_CONNECTION); at this test's timing the SDKs' own defaults survive it too, so what
    tells the retries from the defaults is the pyarrow test above. This one found that s3fs
    answered listings from its first one for ever (the poll below never saw a checkpoint)."""
    from sea_ray.model.vision import build_vision_tower
    from sea_ray.config.loading import validate
    from sea_ray.train import checkpoint as ckpt
    from sea_ray.world.oracle import write_oracle_labels

    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"},
           "run": {"name": "paused", "storage": "s3://outage/runs", "seed": 0},
           "data": {"manifest": f"{world_dir}/train/pretrain.json", "image_root": f"{world_dir}/images",
                    "labels": str(tmp_path / "labels"), "max_length": 48},
           "scaling": {"num_workers": 1}, "batch": {"global_size": 4, "per_worker": 4},
           "optim": {"max_steps": 12}, "checkpoint": {"every_n_steps": 1}, "log_every_n_steps": 1,
           "sea": {"top_n": 3}, "ray": {"num_cpus": 2}}
    tower = build_vision_tower(validate(raw).model.vision, "crop")
    write_oracle_labels(world_dir, str(tmp_path / "labels"), 8, tower.transform_spec())
    config = tmp_path / "align.json"
    config.write_text(json.dumps(raw))
    run = subprocess.Popen([os.path.join(BIN, "sea-ray"), "align", "--config", str(config)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not ckpt.list_checkpoints("s3://outage/runs/paused"):  # the first checkpoint is in the bucket
            assert run.poll() is None, run.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.5)
        _paused(pausable_s3, 20).join()
        paused_mid_run = run.poll() is None
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-4000:]
    assert paused_mid_run, "the run had finished before the pause ended"
    steps = [step for step, _ in ckpt.list_checkpoints("s3://outage/runs/paused")]
    assert steps[-1] == 12, steps
