"""Test helper: a private Ray cluster on this machine (`ray start --head` on loopback, its own
temp dir, free ports and process session), and the environment clients use to reach it.

Teardown kills exactly that session's processes (never `ray stop`, which stops every Ray of the
user on the machine, other test runs' included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.faults import session_pids

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray addresses and auth settings (the pytest process may
    hold the session Ray's), with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("RAY_AUTH") or k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class LocalCluster:
    """`ray start --head` on 127.0.0.1 in a temp dir and a process session of its own."""

    def __init__(self, auth: str = "disabled", token: str | None = None, num_cpus: int = 4,
                 secret: str | None = None):
        self.auth, self.token, self.num_cpus, self.secret = auth, token, num_cpus, secret
        self.temp_dir = tempfile.mkdtemp(prefix="sea-rc-", dir="/tmp")  # short: Ray's socket paths
        self.sid: int | None = None
        self.address = ""

    def env(self) -> dict[str, str]:
        env = clean_env(RAY_AUTH_MODE=self.auth, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        SEA_RAY_CACHE=os.path.join(self.temp_dir, "cache"),
                        # time for a stopped job's SIGTERM handler on a loaded 2-core box (Ray: 3 s)
                        RAY_JOB_STOP_WAIT_TIME_S="30")
        # The cluster holds its own credentials, as a Kubernetes Secret or an instance role gives
        # them to real nodes; `sea-ray submit` never sends any.
        if self.secret:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def start(self) -> "LocalCluster":
        (gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager,
         object_manager) = _free_ports(9)
        cmd = [str(BIN / "ray"), "start", "--head", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--port={gcs}", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}"]
        proc = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.sid = proc.pid  # the session every process of this cluster lives in
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out[-4000:]}")
        self.address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while True:  # the Jobs API lists jobs (the dashboard answers before its job module does)
            try:
                request = urllib.request.Request(f"{self.address}/api/jobs/", headers=headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    json.loads(response.read())
                break
            except (OSError, ValueError):
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.sid is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(self.sid):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + wait
            while session_pids(self.sid) and time.time() < deadline:
                time.sleep(0.1)
        self.sid = None

    def files_containing(self, needle: str) -> list[str]:
        found = []
        for path in Path(self.temp_dir).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
        return found

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def sea_ray(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """``sea-ray ARGS`` from the repository root, its output captured."""
    return subprocess.run([str(BIN / "sea-ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
