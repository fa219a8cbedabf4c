"""Test helpers: act once the run under test has reached a given point (SIGKILL a process, lose a
node); the CPU time and listening sockets of a test's own processes (found by their process
session: ``sea_ray.preemption.session_pids``)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable


def kill_when(ready: Callable[[], bool], cmdline_has: str, timeout: float = 240.0) -> tuple[threading.Thread, list]:
    """Start a thread that waits until ``ready()`` and then SIGKILLs the first process under this
    one (the test's own Ray: its raylet is a child of this process) whose command line contains
    ``cmdline_has``; returns the thread and the list of killed pids. Processes of other test runs
    on the machine are never touched."""
    import psutil

    killed: list[int] = []

    def killer():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                for proc in psutil.Process().children(recursive=True):
                    try:
                        cmdline = " ".join(proc.cmdline())
                    except psutil.Error:  # ended meanwhile
                        continue
                    if cmdline_has in cmdline:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed


def act_when(ready: Callable[[], bool], action: Callable[[], object], timeout: float = 600.0,
             poll_s: float = 0.05) -> tuple[threading.Thread, list]:
    """Start a thread that waits until ``ready()`` and then calls ``action()`` once; returns the
    thread and a list that holds ``action()``'s result once it ran (empty: ``ready()`` never came
    within ``timeout``). An exception in ``ready()`` counts as not ready yet."""
    done: list = []

    def waiter():
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ready():
                    done.append(action())
                    return
            except Exception:  # noqa: BLE001 - e.g. a file being written: not ready yet
                pass
            time.sleep(poll_s)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    return thread, done


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (and of their children that they reaped), read
    from /proc; a process that ended meanwhile counts 0."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def listening_addresses(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on, read from
    /proc (the socket tables of this network namespace and each process's descriptors)."""
    import ipaddress
    import os

    listening = {}  # socket inode -> (address, port)
    for table, width in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))  # kernel words are little-endian
                ip = ipaddress.ip_address(raw)
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                listening[fields[9]] = (str(ip), int(hex_port, 16))
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.append((name, *listening[target[8:-1]]))
        except OSError:  # the process ended meanwhile
            pass
    return found
