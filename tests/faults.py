"""Test helper: SIGKILL a process once the run under test has reached a given point."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable


def kill_when(ready: Callable[[], bool], cmdline_has: str, timeout: float = 240.0) -> tuple[threading.Thread, list]:
    """Start a thread that waits until ``ready()`` and then SIGKILLs the first process whose
    command line contains ``cmdline_has``; returns the thread and the list of killed pids."""
    import psutil

    killed: list[int] = []

    def killer():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                for proc in psutil.process_iter(["cmdline"]):
                    if cmdline_has in " ".join(proc.info["cmdline"] or []):
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed
