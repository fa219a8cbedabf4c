"""Security of a local Ray and of credentials (the cluster side is in tests/test_submit_cluster.py).

- A local Ray started by sea_ray listens on loopback only, also when the caller exported no Ray
  variable and when something imported Ray before sea_ray started it.
- A local job that reads and writes S3 leaves no credential value in Ray's session folder
  (its logs, runtime-env agent log included), the bucket or the run folders.
- Relative paths of a submitted config: inputs inside the uploaded working dir are rewritten for
  the job, every other relative path is refused before anything is sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sea_ray import cli, paths, storage, submit
from sea_ray.preemption import session_pids
from tests.faults import listening_addresses

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

START_LOCAL_RAY = """
import sys
from types import SimpleNamespace
if sys.argv[1] == "ray-first":
    import ray  # noqa: F401  (imported before sea_ray starts it: the loopback setting is read then)
from sea_ray.runtime import init_ray
ray = init_ray(SimpleNamespace(address=None, num_cpus=1), quiet=True)
print(ray.util.get_node_ip_address(), flush=True)
sys.stdin.read()  # keep Ray up until the test has looked
ray.shutdown()
"""


def no_ray_env(**extra: str) -> dict[str, str]:
    """This environment without any RAY_* variable (the caller exported none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def _start_local_ray(order: str) -> tuple[subprocess.Popen, str]:
    """The embedded default's Ray started in a child process: (the process, its node address).
    Ray gives a starting raylet a fixed 30 s to register, which a loaded 2-core machine can miss:
    such a start is retried (the start, never the checks)."""
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", START_LOCAL_RAY, order], cwd=REPO, env=no_ray_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        node_ip = proc.stdout.readline().strip()
        if node_ip:
            return proc, node_ip
        _, err = proc.communicate("", timeout=120)
        if "timed out during startup" not in err or attempt == 2:
            pytest.fail(f"the local Ray did not start:\n{err[-3000:]}")
    raise AssertionError("unreachable")


@pytest.mark.parametrize("order", ["sea-ray-first", "ray-first"])
def test_a_local_ray_listens_on_loopback_only(order):
    proc, node_ip = _start_local_ray(order)
    try:
        listeners = listening_addresses(session_pids(proc.pid))
    finally:
        proc.communicate("", timeout=120)
    assert len({name for name, _, _ in listeners}) >= 3, listeners  # gcs_server, raylet, the driver, ...
    exposed = [(name, ip, port) for name, ip, port in listeners
               if not ipaddress.ip_address(ip).is_loopback]
    assert exposed == [], f"Ray listeners on non-loopback addresses: {exposed}"
    assert ipaddress.ip_address(node_ip).is_loopback, node_ip


def _files_containing(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_a_local_s3_job_leaves_no_credential_value_anywhere(s3_server, s3_bucket, world_dir, tmp_path):
    """The labels job (Ray Data, an actor pool) on a local Ray, reading and writing the bucket, with a
    planted secret key: absent from Ray's session folder, the bucket and the local files it wrote."""
    secret = f"sea-planted-{secrets.token_hex(12)}"  # moto takes any secret key
    fs, root = storage.fsspec_fs(f"{s3_bucket}/world")
    files = sorted(p for p in Path(world_dir).rglob("*") if p.is_file())
    fs.put([str(p) for p in files], [f"{root}/{p.relative_to(world_dir).as_posix()}" for p in files])
    ray_tmp = Path(tempfile.mkdtemp(prefix="sea-sec-", dir="/tmp"))  # short: Ray's socket paths
    work = tmp_path / "cwd"
    work.mkdir()
    env = no_ray_env(AWS_SECRET_ACCESS_KEY=secret, RAY_TMPDIR=str(ray_tmp), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    try:
        done = subprocess.run([str(BIN / "sea-ray"), "labels", "--config", str(REPO / "workflows/configs/tiny_labels.yaml"),
                               f"output={s3_bucket}/labels", f"data.manifest={s3_bucket}/world/train/pretrain.json",
                               f"data.image_root={s3_bucket}/world/images", "ray.num_cpus=2",
                               "compute.cpus_per_actor=0.5"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        assert json.loads(storage.read_text(f"{s3_bucket}/labels/_meta.json"))["counts"]["labelled"] > 0
        sessions = list((ray_tmp / "ray").glob("session_*"))
        assert sessions and list(sessions[0].rglob("*.log")), "the job's Ray session folder was not found"
        assert _files_containing(ray_tmp, secret.encode()) == []
        assert _files_containing(work, secret.encode()) == []
        fs.invalidate_cache()
        leaked = [p for p in fs.find(s3_bucket.removeprefix("s3://")) if secret.encode() in fs.cat_file(p)]
        assert leaked == []
        assert secret not in done.stdout + done.stderr
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- relative paths


@pytest.fixture
def user_project(tmp_path):
    """A researcher's own folder outside the repo: a config, a manifest and images inside it,
    another manifest outside it."""
    project = tmp_path / "project"
    (project / "data" / "images").mkdir(parents=True)
    (project / "data" / "train.json").write_text("[]")
    (tmp_path / "elsewhere.json").write_text("[]")
    (project / "cfg.yaml").write_text((REPO / "workflows/configs/tiny_align.yaml").read_text())
    return project


class _Recorder:
    def __init__(self):
        self.submitted = []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)


def _submit(monkeypatch, cwd: Path, *args: str) -> tuple[int, _Recorder]:
    jobs = _Recorder()
    monkeypatch.setattr(submit, "client", lambda address: jobs)
    monkeypatch.chdir(cwd)
    return cli.main(["submit", "--address", "h:1", "--no-validate", *args]), jobs


def test_relative_outputs_are_refused_with_what_to_write_instead(monkeypatch, capsys, user_project):
    code, jobs = _submit(monkeypatch, user_project, "--working-dir", ".", "--", "align", "--config", "cfg.yaml",
                         "data.manifest=data/train.json", "data.image_root=data/images", "data.labels=s3://b/l",
                         "run.storage=runs")
    err = capsys.readouterr().err
    assert code == 2 and jobs.submitted == []
    assert f"run.storage: 'runs' is a relative path" in err and f"run.storage={user_project / 'runs'}" in err
    assert "s3:// URI" in err
    assert "data.manifest" not in err and "data.image_root" not in err  # inside the upload: fine


def test_relative_inputs_are_rewritten_into_the_upload_or_refused(monkeypatch, capsys, user_project):
    # from a subfolder of the working dir: the inputs are rewritten relative to the working dir
    sub = user_project / "data"
    code, jobs = _submit(monkeypatch, sub, "--working-dir", str(user_project), "--", "align", "--config",
                         "../cfg.yaml", "data.manifest=train.json", "data.image_root=images",
                         "data.labels=s3://b/l", "run.storage=s3://b/runs")
    assert code == 0, capsys.readouterr().err
    entry = jobs.submitted[0]["entrypoint"]
    assert entry.endswith("data.manifest=data/train.json data.image_root=data/images"), entry
    assert "--config cfg.yaml" in entry
    # an input outside the upload is refused
    code, jobs = _submit(monkeypatch, user_project, "--working-dir", ".", "--", "align", "--config", "cfg.yaml",
                         "data.manifest=../elsewhere.json", "data.image_root=data/images", "data.labels=s3://b/l",
                         "run.storage=s3://b/runs")
    err = capsys.readouterr().err
    assert code == 2 and jobs.submitted == []
    assert "data.manifest: '../elsewhere.json' is a relative path to" in err and "not uploaded" in err
    # so is one inside the working dir that the upload leaves out (.gitignore'd)
    (user_project / ".gitignore").write_text("data/\n")
    code, _ = _submit(monkeypatch, user_project, "--working-dir", ".", "--", "align", "--config", "cfg.yaml",
                      "data.manifest=data/train.json", "data.image_root=s3://b/i", "data.labels=s3://b/l",
                      "run.storage=s3://b/runs")
    assert code == 2 and "data.manifest" in capsys.readouterr().err


def test_hub_ids_and_uris_are_left_alone(user_project):
    from sea_ray.config.loading import validate

    cfg = validate({"job": "align", "model": {"preset": "tiny-openclip-llama"},
                    "data": {"manifest": "s3://b/m.json", "labels": "file:///abs/labels"},
                    "run": {"storage": "s3://b/runs"}})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "llm": cfg.model.llm.model_copy(update={"name_or_path": "HuggingFaceTB/SmolLM2-135M", "config": None})})})
    assert paths.for_submission(cfg, user_project, user_project, []) == ([], [])


def test_relative_outputs_are_refused_inside_a_ray_job_package(monkeypatch, tmp_path, capsys):
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (package / "workflows" / "configs").mkdir(parents=True)
    (package / "workflows" / "configs" / "tiny_eval.yaml").write_text(
        (REPO / "workflows/configs/tiny_eval.yaml").read_text())
    monkeypatch.chdir(package)
    code = cli.main(["eval", "--config", "workflows/configs/tiny_eval.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "output: 'out/eval' is a relative path, and this job runs in Ray's temporary copy" in err


def test_a_job_fails_when_the_cluster_lacks_a_named_variable(monkeypatch):
    from sea_ray.errors import ConfigError
    from sea_ray.runtime import CLUSTER_ENV_VAR, check_cluster_env

    monkeypatch.setenv(CLUSTER_ENV_VAR, "SEA_TEST_KEY_ID,SEA_TEST_SECRET")
    monkeypatch.setenv("SEA_TEST_KEY_ID", "present")
    monkeypatch.delenv("SEA_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError) as info:
        check_cluster_env()
    assert [p.split(":")[0] for p in info.value.problems] == ["SEA_TEST_SECRET"]
    monkeypatch.setenv("SEA_TEST_SECRET", "s3cr3t-value")
    check_cluster_env()  # every named variable is there: nothing to say
