"""The stage watchdog: a stage that makes no progress for ``stall_timeout_s`` fails, loudly.

Progress is an optimizer step, a report or a saved checkpoint (:meth:`Watchdog.beat`); the clock
starts when the stage has set up its model and data. When it runs out, the watchdog raises
:class:`StallError` in the training thread (the thread that entered it; in a Ray Train worker
that is not the process's main thread), with what the stage was waiting for. A thread that is
blocked outside Python (a collective whose peer died) cannot receive it; with ``hard_exit`` the
watchdog then ends the process ``grace_s`` later, so Ray Train sees a dead worker and its failure
handling (``max_failures``) takes over instead of a silent hang.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Callable, Optional

from sea_ray.errors import SeaRayError

log = logging.getLogger(__name__)


class StallError(SeaRayError):
    """A training stage made no optimizer step within its ``stall_timeout_s``."""


class Watchdog:
    """``with Watchdog(timeout_s, describe) as dog: ... dog.beat() ...``; ``timeout_s`` None = off.

    ``describe()`` is called when the time runs out and names what the stage waits for."""

    def __init__(self, timeout_s: Optional[float], describe: Callable[[], str], hard_exit: bool = False,
                 grace_s: float = 60.0, poll_s: Optional[float] = None):
        self.timeout_s, self.describe, self.hard_exit, self.grace_s = timeout_s, describe, hard_exit, grace_s
        self.poll_s = poll_s if poll_s is not None else min(5.0, (timeout_s or 5.0) / 4)
        self.message: Optional[str] = None
        self._last = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()  # firing and leaving never overlap
        self._target = threading.get_ident()
        self._thread: Optional[threading.Thread] = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.timeout_s is not None:
            self._target = threading.get_ident()
            self.beat()
            self._thread = threading.Thread(target=self._watch, name="sea-ray-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        with self._lock:
            self._done.set()
            if self.message is not None and exc_type is not StallError:
                _raise_in(self._target, None)  # left the block before the error arrived: cancel it
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            with self._lock:
                if self._done.is_set():
                    return
                self.message = (f"no optimizer step for {idle:.1f} s (stall_timeout_s={self.timeout_s:g}): "
                                f"{self.describe()}")
                log.error("%s", self.message)
                _raise_in(self._target, StallError)
            if self._done.wait(self.grace_s) or not self.hard_exit:
                return
            log.error("the training thread did not stop within %g s of the stall error (blocked outside "
                      "Python); ending this worker process", self.grace_s)
            os._exit(70)

    def error(self) -> StallError:
        """The error to raise for the stall that interrupted the training thread."""
        return StallError(self.message or "stalled")


def _raise_in(thread_id: int, exc_type) -> None:
    """Raise ``exc_type`` in the thread ``thread_id`` at its next Python instruction (None: cancel
    a pending one): CPython's ``PyThreadState_SetAsyncExc``."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc_type) if exc_type is not None else None)
