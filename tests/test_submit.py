"""`sea-ray submit` / `sea-ray jobs` without a cluster: the command, the runtime environment,
credentials passed by name and never shown, validation before upload, token pick-up, exit codes.
The same commands against real `ray start` clusters are in tests/test_submit_cluster.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sea_ray import cli, jobs, submit

REPO = Path(__file__).resolve().parents[1]
SECRET = "sEcReT-value-0123456789"


class FakeJobs:
    """Stands in for JobSubmissionClient; records what would be sent."""

    def __init__(self, status="SUCCEEDED", exit_code=0, logs=("line 1\n", "line 2\n")):
        self.submitted = []
        self.status, self.exit_code, self.logs = status, exit_code, logs

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    async def tail_job_logs(self, sid):
        for chunk in self.logs:
            yield chunk

    def get_job_info(self, sid):
        return SimpleNamespace(submission_id=sid, status=self.status, driver_exit_code=self.exit_code,
                               message="boom" if self.status != "SUCCEEDED" else "",
                               runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET}}, entrypoint="python -m x")


@pytest.fixture
def fake_jobs(monkeypatch):
    jobs = FakeJobs()
    monkeypatch.setattr(submit, "client", lambda address: jobs)
    return jobs


S3_PATHS = ["run.storage=s3://b/runs", "data.manifest=s3://b/world/train/pretrain.json",
            "data.image_root=s3://b/world/images", "data.labels=s3://b/labels"]


def test_submit_sends_settings_never_credentials(fake_jobs, monkeypatch, capsys):
    for name in submit.DEFAULT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MY_SETTING", "on")
    code = cli.main(["submit", "--address", "http://127.0.0.1:1", "--no-validate", "--env", "MY_SETTING", "--env", "MODE=fast",
                     "--cluster-env", "AWS_ACCESS_KEY_ID", "--cluster-env", "AWS_SECRET_ACCESS_KEY",
                     "--pip", "rich==13.7.1", "--", "align", "--config", "workflows/configs/tiny_align.yaml",
                     "optim.max_steps=3", *S3_PATHS])
    assert code == 0
    (sent,) = fake_jobs.submitted
    assert sent["entrypoint"] == ("python -m workflows.align --config workflows/configs/tiny_align.yaml "
                                  "optim.max_steps=3 " + " ".join(S3_PATHS))
    env = sent["runtime_env"]["env_vars"]
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "MY_SETTING": "on", "MODE": "fast",
                   "SEA_RAY_CLUSTER_ENV": "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY"}
    assert SECRET not in repr(sent) and "AKIDEXAMPLE" not in repr(sent)
    assert sent["runtime_env"]["working_dir"] == str(REPO)
    assert {".venv", "out", "runs", ".git"} <= set(sent["runtime_env"]["excludes"])
    assert sent["runtime_env"]["pip"] == ["rich==13.7.1"]
    assert sent["submission_id"].startswith("sea-align-")
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "AKIDEXAMPLE" not in out.out + out.err
    assert "not sent (credentials never are): AWS_ACCESS_KEY_ID" not in out.out  # named: the cluster has it
    assert "from the cluster's own environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out.out


@pytest.mark.parametrize("item", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN=x", "MY_API_KEY", "DB_PASSWORD=y"])
def test_a_credential_in_env_is_refused(fake_jobs, monkeypatch, capsys, item):
    monkeypatch.setenv(item.partition("=")[0], SECRET)
    code = cli.main(["submit", "--address", "h:1", "--env", item, "--", "presets"])
    err = capsys.readouterr().err
    assert code == 2 and "a credential" in err and "--cluster-env" in err and SECRET not in err
    assert fake_jobs.submitted == []


def test_unsent_credentials_are_named_not_shown(fake_jobs, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert cli.main(["submit", "--address", "h:1", "--", "presets"]) == 0
    out = capsys.readouterr().out
    assert "not sent (credentials never are): " in out and "AWS_SECRET_ACCESS_KEY" in out and SECRET not in out
    assert "AWS_SECRET_ACCESS_KEY" not in (fake_jobs.submitted[0]["runtime_env"].get("env_vars") or {})


def test_wait_streams_logs_and_returns_the_jobs_exit_code(fake_jobs, capsys):
    assert cli.main(["submit", "--address", "h:1", "--wait", "--", "presets"]) == 0
    assert "line 1\nline 2\n" in capsys.readouterr().out
    assert fake_jobs.submitted[0]["entrypoint"] == "python -m sea_ray.cli presets"  # no workflows/presets.py
    fake_jobs.status, fake_jobs.exit_code = "FAILED", 2
    assert cli.main(["submit", "--address", "h:1", "--wait", "--", "presets"]) == 2
    assert "FAILED, exit code 2: boom" in capsys.readouterr().out
    fake_jobs.status, fake_jobs.exit_code = "STOPPED", None
    assert cli.main(["submit", "--address", "h:1", "--wait", "--", "presets"]) == 1


def test_config_is_validated_before_anything_is_sent(fake_jobs, tmp_path, capsys):
    assert cli.main(["submit", "--address", "h:1", "--", "align", "--config", "workflows/configs/tiny_align.yaml",
                     "optim.lrr=1", *S3_PATHS]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err
    outside = tmp_path / "a.yaml"
    outside.write_text((REPO / "workflows/configs/tiny_align.yaml").read_text())
    assert cli.main(["submit", "--address", "h:1", "--", "align", "--config", str(outside)]) == 2
    assert "not inside the working dir" in capsys.readouterr().err
    assert cli.main(["submit", "--address", "h:1", "--", "bogus"]) == 2
    assert cli.main(["submit", "--address", "h:1"]) == 2
    assert cli.main(["submit", "--address", "h:1", "--env", "SEA_RAY_NOT_SET_ANYWHERE", "--", "presets"]) == 2
    assert "not set in this environment" in capsys.readouterr().err
    assert fake_jobs.submitted == []


def test_pipeline_is_planned_before_submission(fake_jobs, capsys):
    code = cli.main(["submit", "--address", "h:1", "--", "pipeline", "--config",
                     "workflows/configs/tiny_pipeline.yaml", "output=s3://b/tiny", "align.set.optim.lr=-1"])
    assert code == 2 and "align: optim.lr" in capsys.readouterr().err
    assert cli.main(["submit", "--address", "h:1", "--", "pipeline", "--config",
                     str(REPO / "workflows/configs/tiny_pipeline.yaml"), "output=s3://b/tiny"]) == 0
    # an absolute config path inside the working dir is sent relative to it
    assert fake_jobs.submitted[0]["entrypoint"] == ("python -m workflows.pipeline --config "
                                                    "workflows/configs/tiny_pipeline.yaml output=s3://b/tiny")


def test_arguments_are_quoted_for_the_shell(tmp_path):
    assert submit.entrypoint_for(["align", "--config", "a b.yaml", "run.name=x;rm -rf /"], REPO, "python") == (
        "python -m workflows.align --config 'a b.yaml' 'run.name=x;rm -rf /'")
    assert submit.entrypoint_for(["import-manifest", "--input", "x"], REPO, "/opt/py/bin/python") == (
        "/opt/py/bin/python -m sea_ray.cli import-manifest --input x")


def test_every_job_verb_has_a_workflows_entry_point():
    for verb in [*jobs.JOBS, "pipeline"]:
        module = REPO / "workflows" / f"{verb}.py"
        assert module.is_file(), verb
        text = module.read_text()
        assert text.startswith('"""') and "python -m workflows." in text and f'main(["{verb}"' in text


def test_workflows_entry_point_runs_the_verb():
    out = subprocess.run([sys.executable, "-m", "workflows.pipeline", "--config",
                          "workflows/configs/tiny_pipeline.yaml", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, SEA_RAY_TEST="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"step": "instruct"' in out.stdout


def test_jobs_status_never_shows_env_values(fake_jobs, capsys):
    assert cli.main(["jobs", "--address", "h:1", "status", "sea-x"]) == 0
    text = capsys.readouterr().out
    assert "AWS_SECRET_ACCESS_KEY" in text and SECRET not in text
    assert cli.main(["jobs", "--address", "h:1", "stop"]) == 2


def test_address_is_required(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli.main(["jobs", "list"]) == 2
    assert "--address: required" in capsys.readouterr().err
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "127.0.0.1:8265")
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"


def test_unreachable_cluster_is_exit_1(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this process's Ray auth mode stays as it is
    code = cli.main(["jobs", "--address", "http://127.0.0.1:9", "list"])
    assert code == 1
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


_AUTH_PROBE = """
import os, sys
from sea_ray.submit import enable_token_auth_if_available
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
enable_token_auth_if_available()
headers = get_auth_headers_if_auth_enabled({})
value = headers.get("authorization", "")
print("mode", os.environ.get("RAY_AUTH_MODE"), "sends", value == "Bearer " + sys.argv[1])
"""


@pytest.mark.parametrize("how", ["env", "file", "home", "disabled", "none"])
def test_token_is_taken_from_the_environment(how, tmp_path):
    """Ray 2.60's Jobs SDK sends a token only in token mode; with RAY_AUTH_MODE unset, submit turns
    token mode on when a token is configured (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    token = "t0ken" + "ab" * 16
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine
    if how == "env":
        env["RAY_AUTH_TOKEN"] = token
    elif how == "file":
        (tmp_path / "tok").write_text(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "tok")
    elif how == "home":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(token)
    elif how == "disabled":
        env.update(RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-c", _AUTH_PROBE, token], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = {"env": "mode token sends True", "file": "mode token sends True", "home": "mode token sends True",
                "disabled": "mode disabled sends False", "none": "mode None sends False"}[how]
    assert out.stdout.strip().splitlines()[-1] == expected
    assert token not in out.stdout + out.stderr


def test_list_prints_a_table(monkeypatch):
    job = SimpleNamespace(submission_id="sea-a", job_id=None, status="SUCCEEDED", start_time=1_700_000_000_000,
                          end_time=1_700_000_060_000, driver_exit_code=0, entrypoint="python -m workflows.align",
                          runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET}})
    monkeypatch.setattr(submit, "client", lambda address: SimpleNamespace(list_jobs=lambda: [job]))
    buf = io.StringIO()
    assert submit.list_jobs("h:1", out=buf) == 0
    text = buf.getvalue()
    assert "sea-a" in text and "SUCCEEDED" in text and SECRET not in text


def test_sdk_errors_are_one_line_exit_1(fake_jobs, monkeypatch, capsys):
    def missing(sid):
        raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.\nmore")

    monkeypatch.setattr(fake_jobs, "get_job_info", missing)
    assert cli.main(["jobs", "--address", "h:1", "status", "nope"]) == 1
    err = capsys.readouterr().err
    assert "job nope: RuntimeError: Request failed with status code 404" in err and "more" not in err
