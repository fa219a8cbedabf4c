"""Test helper: a private Ray cluster on this machine (`ray start --head` on loopback, its own
temp dir, free ports and process session), worker nodes joined to it (:mod:`tests.ray_node`, each
with its own resources, temp dir, ports and process session), and the environment clients use to
reach it.

Teardown kills exactly that session's processes (never `ray stop`, which stops every Ray of the
user on the machine, other test runs' included); :meth:`WorkerNode.kill` is a node lost at once:
its raylet and everything under it (workers, actors, agents), by the pids of its session."""

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

from sea_ray.preemption import session_pids, stop_session
from tests.faults import cpu_seconds

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


def _kill_session(sid: int) -> None:
    """Every process of session ``sid`` stopped (SIGTERM, then SIGKILL; 5 s each at most)."""
    stop_session(sid, 5.0)


def _start_in_session(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd`` (a command that starts Ray processes and exits) in a new process session;
    returns (the session id, which every process it started lives in, and its output). Raises
    with the output when it fails."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        raise
    if proc.returncode != 0:
        _kill_session(proc.pid)
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out[-4000:]}")
    return proc.pid, out


NODE_START_ATTEMPTS = 3


class WorkerNode:
    """A worker node of a :class:`LocalCluster`: its own raylet, object store, agents and temp dir,
    in a process session of its own; ``tag`` is a custom resource only this node has (1 unit)."""

    def __init__(self, cluster: "LocalCluster", tag: str, sid: int, temp_dir: str, node_id: str,
                 guard: subprocess.Popen | None = None):
        self.cluster, self.tag, self.sid, self.temp_dir, self.node_id = cluster, tag, sid, temp_dir, node_id
        self.guard = guard  # `sea-ray node-guard` running the node (its own session), or None
        self.cpu_at_end = 0.0  # CPU seconds its processes had used when it was killed or stopped

    def preempt(self) -> None:
        """SIGTERM to the node, as a cloud reclaiming a spot VM or Kubernetes evicting a pod sends
        it: to its ``sea-ray node-guard``, which drains it and stops it at the deadline."""
        assert self.guard is not None, "a node without sea-ray node-guard only dies on SIGTERM"
        self.guard.send_signal(signal.SIGTERM)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids()) if self.sid is not None else self.cpu_at_end

    def pids(self) -> list[int]:
        return session_pids(self.sid) if self.sid is not None else []

    def kill(self) -> list[int]:
        """The node lost at once: SIGKILL to every process of its session (raylet, its workers and
        actors, agents), nothing else on the machine; returns the pids killed."""
        pids = self.pids()
        self.cpu_at_end = cpu_seconds(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.sid = None
        self._end_guard()
        return pids

    def gone(self) -> bool:
        """Every process of the node has ended (a preempted node, once its guard stopped it)."""
        return self.sid is None or not session_pids(self.sid)

    def _end_guard(self) -> None:
        if self.guard is not None and self.guard.poll() is None:
            _kill_session(self.guard.pid)
        if self.guard is not None:
            self.guard.wait(timeout=30)

    def stop(self) -> None:
        if self.sid is not None:
            self.cpu_at_end = cpu_seconds(self.pids())
            _kill_session(self.sid)
            self.sid = None
        self._end_guard()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class LocalCluster:
    """`ray start --head` on 127.0.0.1 in a temp dir and a process session of its own; worker
    nodes join it with :meth:`add_node`. ``system_env``: Ray settings every node of the cluster
    starts with (``RAY_health_check_period_ms``, ...); ``object_store_mb``: each node's object store."""

    def __init__(self, auth: str = "disabled", token: str | None = None, num_cpus: int = 4,
                 secret: str | None = None, system_env: dict[str, str] | None = None,
                 object_store_mb: int | None = None):
        self.auth, self.token, self.num_cpus, self.secret = auth, token, num_cpus, secret
        self.system_env = dict(system_env or {})
        self.object_store_mb = object_store_mb
        self.temp_dir = tempfile.mkdtemp(prefix="sea-rc-", dir="/tmp")  # short: Ray's socket paths
        self.sid: int | None = None
        self.address = ""
        self.gcs_address = ""
        self.nodes: list[WorkerNode] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the cluster's processes and of its clients (``extra`` on top)."""
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
        env.update(self.system_env)
        env.update(extra)
        return env

    def start(self) -> "LocalCluster":
        (gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager,
         object_manager) = _free_ports(9)
        self.sid, _ = _start_in_session(
            [str(BIN / "ray"), "start", "--head", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
             "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}",
             *([f"--object-store-memory={self.object_store_mb * 2**20}"] if self.object_store_mb else [])],
            self.env())
        self.gcs_address = f"127.0.0.1:{gcs}"
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

    def add_node(self, num_cpus: int, tag: str, resources: dict[str, float] | None = None,
                 guard_grace_s: float | None = None) -> WorkerNode:
        """A worker node joined to this cluster (:mod:`tests.ray_node`) with ``num_cpus`` logical
        CPUs, the custom resource ``tag`` (1) plus ``resources``, its own ports, temp dir and
        process session. ``guard_grace_s``: run it under ``sea-ray node-guard --grace-s`` (so that
        :meth:`WorkerNode.preempt` drains it), as a spot node's container would be."""
        agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(6)
        temp_dir = tempfile.mkdtemp(prefix=f"sea-rn-{tag[-6:]}-", dir="/tmp")
        params = {"gcs_address": self.gcs_address, "num_cpus": num_cpus, "resources": {tag: 1, **(resources or {})},
                  "temp_dir": temp_dir, "dashboard_agent_listen_port": agent_http, "metrics_agent_port": agent_grpc,
                  "runtime_env_agent_port": runtime_env, "metrics_export_port": metrics,
                  "node_manager_port": node_manager, "object_manager_port": object_manager}
        if self.object_store_mb:
            params["object_store_memory"] = self.object_store_mb * 2**20
        if guard_grace_s is not None:
            return self._add_guarded(tag, temp_dir, params, guard_grace_s)
        for attempt in range(1, NODE_START_ATTEMPTS + 1):
            try:
                sid, out = _start_in_session([sys.executable, "-m", "tests.ray_node", json.dumps(params)], self.env())
                node_id = json.loads(out.strip().splitlines()[-1])["node_id"]
                break
            except RuntimeError as exc:  # Ray gives a raylet 30 s to register: a loaded machine can miss it
                if "timed out during startup" not in str(exc) or attempt == NODE_START_ATTEMPTS:
                    shutil.rmtree(temp_dir, ignore_errors=True)
                    raise
            except BaseException:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
        node = WorkerNode(self, tag, sid, temp_dir, node_id)
        try:
            self.wait_for_node(node_id)
        except BaseException:
            node.stop()
            raise
        self.nodes.append(node)
        return node

    def _add_guarded(self, tag: str, temp_dir: str, params: dict, grace_s: float) -> WorkerNode:
        cmd = [str(BIN / "sea-ray"), "node-guard", "--grace-s", str(grace_s), "--",
               sys.executable, "-m", "tests.ray_node", json.dumps({**params, "block": True})]
        for attempt in range(1, NODE_START_ATTEMPTS + 1):
            log_path = os.path.join(temp_dir, f"node-guard-{attempt}.log")
            with open(log_path, "w") as log:
                guard = subprocess.Popen(cmd, env=self.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                         text=True, start_new_session=True)
            line = guard.stdout.readline()  # the node's {"node_id", "sid"}, once it has started
            try:
                started = json.loads(line)
                break
            except ValueError:
                _kill_session(guard.pid)
                guard.wait(timeout=30)
                with open(log_path) as f:
                    out = f.read()
                # Ray gives a raylet 30 s to register: a loaded machine can miss it
                if "timed out during startup" not in out or attempt == NODE_START_ATTEMPTS:
                    raise RuntimeError(f"node-guard did not start a node: {line!r}:\n{out[-3000:]}") from None
        node = WorkerNode(self, tag, started["sid"], temp_dir, started["node_id"], guard)
        try:
            self.wait_for_node(node.node_id)
        except BaseException:
            node.stop()
            raise
        self.nodes.append(node)
        return node

    def node_state(self, node_id: str) -> str | None:
        """``ALIVE`` or ``DEAD`` (None: unknown) of a node, in Ray's node table."""
        from ray.util.state import list_nodes

        for n in list_nodes(address=self.address, timeout=30):
            n = n if isinstance(n, dict) else vars(n)
            if n["node_id"] == node_id:
                return n["state"]
        return None

    def actors(self, class_name: str) -> list[dict]:
        """Ray's table of the cluster's actors of ``class_name``, alive or dead (the state API)."""
        from ray.util.state import list_actors

        found = [a if isinstance(a, dict) else vars(a) for a in list_actors(address=self.address, limit=10_000,
                                                                             timeout=30)]
        return [a for a in found if a["class_name"] == class_name]

    def wait_for_node(self, node_id: str, timeout: float = 120) -> None:
        """Return once Ray lists the node alive."""
        deadline = time.time() + timeout
        while True:
            try:
                if self.node_state(node_id) == "ALIVE":
                    return
            except Exception:  # noqa: BLE001 - the state API is not answering yet
                if time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise TimeoutError(f"node {node_id} did not join the cluster within {timeout:.0f} s")
            time.sleep(0.5)

    def wait_for_death(self, node_id: str, timeout: float = 120) -> float:
        """Seconds until Ray marks the node dead."""
        start = time.time()
        while self.node_state(node_id) != "DEAD":
            if time.time() - start > timeout:
                raise TimeoutError(f"node {node_id} was not marked dead within {timeout:.0f} s")
            time.sleep(0.2)
        return time.time() - start

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every process of the cluster, its lost nodes' included (up to
        their loss); a worker process that ended without being reaped by its raylet is not counted."""
        head = cpu_seconds(session_pids(self.sid)) if self.sid is not None else 0.0
        return head + sum(node.cpu_seconds() for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
        if self.sid is None:
            return
        _kill_session(self.sid)
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
        """Stop the cluster and delete its temp dir (kept, with Ray's logs, when
        ``SEA_RAY_KEEP_CLUSTER_DIR`` is set: debugging a failed test)."""
        self.stop()
        if not os.environ.get("SEA_RAY_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def sea_ray(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """``sea-ray ARGS`` from the repository root, its output captured."""
    return subprocess.run([str(BIN / "sea-ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
