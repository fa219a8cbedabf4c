"""``sea-ray node-guard`` (sea_ray.preemption) on this machine: finding a node's raylet, refusing an
ambiguous preStop drain, stopping a guarded command on SIGTERM. The drain of a real worker node
mid-training, its just-in-time checkpoint and the restart: tests/test_multinode.py."""

import signal
import subprocess
import sys
import time

import pytest

from sea_ray import preemption
from sea_ray.errors import SeaRayError


@pytest.mark.ray
def test_the_session_rays_raylet_is_found_with_its_node_id_and_gcs_address(ray_local):
    context = ray_local.get_runtime_context()
    found = {r["node_id"]: r for r in preemption.raylets()}
    assert context.get_node_id() in found  # other Rays on the machine are listed too
    assert found[context.get_node_id()]["gcs_address"] == context.gcs_address


def test_a_prestop_drain_names_the_node_when_it_is_not_the_one_raylet_here():
    with pytest.raises(SeaRayError, match="0 raylets run here; name the node with --node-id"):
        preemption.drain_here(0, node_id="ff" * 28)


def test_the_guard_stops_its_command_on_sigterm_and_passes_on_its_exit_status(tmp_path):
    """No raylet under the command (not a Ray node): SIGTERM stops it at once, the whole session."""
    child = tmp_path / "child.pid"
    script = f"import os, time; open({str(child)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    guard = subprocess.Popen([sys.executable, "-m", "sea_ray.cli", "node-guard", "--grace-s", "60", "--",
                              sys.executable, "-c", script])
    deadline = time.time() + 60
    while not child.exists() and time.time() < deadline:
        time.sleep(0.1)
    started = time.time()
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=60) == 0
    assert time.time() - started < 30  # not the 60 s grace: nothing to drain
    pid = int(child.read_text())
    assert not preemption.session_pids(pid)
    done = subprocess.run([sys.executable, "-m", "sea_ray.cli", "node-guard", "--", sys.executable, "-c",
                           "raise SystemExit(3)"], timeout=120)
    assert done.returncode == 3
