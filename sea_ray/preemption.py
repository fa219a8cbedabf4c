"""A Ray worker node that gets a termination notice (SIGTERM) drains first: ``sea-ray node-guard``.

Clouds and Kubernetes end a spot or evicted node by sending SIGTERM and killing it a grace period
later (Kubernetes: ``terminationGracePeriodSeconds``; GCP spot VMs: 30 s; an AWS spot notice
comes two minutes ahead). A raylet that gets SIGTERM simply stops, and Ray Train sees its
workers die. Ray Train reacts better when it is told: a node *drained* with reason preemption
and a deadline (Ray's ``DrainNode``, what the autoscaler does on a cloud's notice) shows up in
``ray.train.get_preemption_info()``, the training stages take a just-in-time checkpoint
(``checkpoint.on_preemption``), and the restart after the node is gone counts against
``max_preemptions``, not ``max_failures``.

``sea-ray node-guard --grace-s 25 -- ray start --address=HEAD:6379 --block`` runs the node's
command and, on SIGTERM, drains the node it started (found as the raylet among its processes:
its ``--node_id`` and ``--gcs-address``) with a deadline a little before ``--grace-s``
(:func:`drain_deadline_s`), waits until the drained raylet ends, the node's command ends or
``--grace-s`` has passed, then kills what is left of the node at once (SIGKILL to its process
session, as a reclaimed VM goes; a command with no raylet is stopped with SIGTERM first). Without
a command (a Kubernetes ``preStop`` hook) it drains the one raylet running on this machine or
container and waits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from sea_ray.errors import SeaRayError

log = logging.getLogger(__name__)

DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
STOP_WAIT_S = 10.0  # after SIGTERM to the node's command, before SIGKILL
# The deadline Ray is told comes this much (at most a third of the grace) before the node is
# stopped: Ray Train ends the group at the deadline and restarts it as a preemption, and the
# drained raylet, idle then, ends by itself; a node stopped while its workers still ran would
# look like a plain failure to Ray Train (its raylet's death says SIGTERM, not preemption).
DEADLINE_MARGIN_S = 10.0


def drain_deadline_s(grace_s: float) -> float:
    """Seconds from the notice to the deadline the drain announces (before the node stops)."""
    return max(0.0, grace_s - min(DEADLINE_MARGIN_S, grace_s / 3))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def session_pids(sid: int) -> list[int]:
    """Every process of the process session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _flag(args: list[str], name: str) -> Optional[str]:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def raylets(pids: Optional[list[int]] = None) -> list[dict]:
    """``{pid, node_id, gcs_address}`` of each raylet among ``pids`` (None: every process here)."""
    if pids is None:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    found = []
    for pid in pids:
        args = _cmdline(pid)
        if args and os.path.basename(args[0]) == "raylet":
            node_id, gcs = _flag(args, "--node_id"), _flag(args, "--gcs-address")
            if node_id and gcs:
                found.append({"pid": pid, "node_id": node_id, "gcs_address": gcs})
    return found


def drain(node_id: str, gcs_address: str, deadline_s: float, message: str) -> None:
    """Ask Ray's GCS to drain ``node_id`` for preemption, its deadline ``deadline_s`` from now
    (``ray drain-node``, the call Ray's autoscaler makes on a cloud's preemption notice)."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray if os.path.exists(ray) else "ray", "drain-node", "--address", gcs_address, "--node-id", node_id,
           "--reason", DRAIN_REASON, "--reason-message", message,
           "--deadline-remaining-seconds", str(max(0, int(deadline_s)))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SeaRayError(f"ray drain-node {node_id} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    print(f"node-guard: node {node_id} drained for preemption, deadline in {max(0, int(deadline_s))} s",
          file=sys.stderr, flush=True)


def stop_session(sid: int, wait_s: float = STOP_WAIT_S, first: int = signal.SIGTERM) -> None:
    """``first`` (SIGTERM), then SIGKILL, to every process of session ``sid``; returns once none
    is left (or ``wait_s`` after each signal, at least 10 s after the SIGKILL)."""
    for sig, wait in ((first, wait_s), (signal.SIGKILL, max(wait_s, STOP_WAIT_S))):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.1)


def guard(command: list[str], grace_s: float) -> int:
    """Run ``command`` (a Ray node); on SIGTERM drain its node and stop it at the deadline.
    Returns the command's exit status (0 when it was stopped here after a drain)."""
    noticed = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: noticed.set())  # before the node starts: no notice is lost
    signal.signal(signal.SIGINT, lambda *_: noticed.set())
    child = subprocess.Popen(command, start_new_session=True)
    while child.poll() is None and not noticed.wait(0.2):
        pass
    if child.poll() is not None:
        return child.returncode
    noticed_at = time.time()
    stop_at = noticed_at + grace_s
    found = raylets(session_pids(child.pid))
    if not found:
        log.warning("node-guard: SIGTERM, but no raylet runs under %s: stopping it now", command[0])
    for raylet in found:
        try:
            drain(raylet["node_id"], raylet["gcs_address"], drain_deadline_s(grace_s) - (time.time() - noticed_at),
                  "SIGTERM to the node (sea-ray node-guard)")
        except (SeaRayError, OSError, subprocess.TimeoutExpired) as exc:
            log.warning("node-guard: %s", exc)
    # a drained raylet ends by itself once its work has gone (Ray Train moves off at the deadline)
    while any(_alive(r["pid"]) for r in found) and child.poll() is None and time.time() < stop_at:
        time.sleep(0.2)
    # then the node goes as a reclaimed VM goes: at once. A raylet given SIGTERM would first tell
    # Ray it was stopped on purpose, and its workers' deaths would no longer read as a preemption.
    stop_session(child.pid, first=signal.SIGKILL if found else signal.SIGTERM)
    child.wait()
    return 0


def drain_here(grace_s: float, node_id: Optional[str] = None) -> int:
    """A ``preStop`` hook: drain the raylet running here (or ``node_id``'s) and wait ``grace_s``."""
    found = raylets()
    if node_id:
        found = [r for r in found if r["node_id"] == node_id]
    if len(found) != 1:
        raise SeaRayError(f"node-guard: {len(found)} raylets run here; name the node with --node-id "
                          f"({', '.join(r['node_id'] for r in found) or 'none found'})")
    drain(found[0]["node_id"], found[0]["gcs_address"], drain_deadline_s(grace_s), "preStop hook (sea-ray node-guard)")
    time.sleep(grace_s)
    return 0
