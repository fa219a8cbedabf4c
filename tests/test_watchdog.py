"""The stage watchdog: no optimizer step for ``stall_timeout_s`` is a clear error, not a hang."""

from __future__ import annotations

import threading
import time

import pytest

from sea_ray.config.loading import validate
from sea_ray.train.loop import LocalIO, run_stage
from sea_ray.train.watchdog import StallError, Watchdog


def test_a_stall_raises_in_the_training_thread_with_what_it_waits_for():
    """Ray Train runs the training function in a thread of its own: the error must land there."""
    caught = {}

    def train():
        try:
            with Watchdog(0.3, lambda: "the data feed", poll_s=0.05) as dog:
                while True:
                    time.sleep(0.01)
        except StallError:
            caught["error"] = dog.error()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert "no optimizer step" in str(caught["error"]) and "the data feed" in str(caught["error"])


def test_beats_keep_a_slow_but_moving_stage_alive_and_leaving_cancels_it():
    with Watchdog(0.4, lambda: "x", poll_s=0.05) as dog:
        for _ in range(12):  # 1.2 s in all, never 0.4 s without a beat
            time.sleep(0.1)
            dog.beat()
    assert dog.message is None
    with Watchdog(None, lambda: "off") as off:  # None: no watchdog at all
        time.sleep(0.1)
    assert off._thread is None


class _StuckIO(LocalIO):
    """A feed that never delivers a micro-batch (the reported symptom: no step, forever)."""

    def micro_batches(self, order, start_step, steps):
        def never():
            while True:
                time.sleep(0.05)
            yield  # pragma: no cover

        return never()


def test_a_stage_whose_feed_never_delivers_fails_within_its_timeout(tmp_path):
    cfg = validate({"job": "align", "data": {"manifest": str(tmp_path / "unused.json")},
                    "model": {"preset": "tiny-openclip-llama"}, "sea": {"enabled": False}, "stall_timeout_s": 1.5,
                    "run": {"storage": str(tmp_path)}})
    started = time.monotonic()
    with pytest.raises(StallError, match=r"align stage, worker 0 of 1, at step 0/.*micro-batch 1 of .*data feed"):
        run_stage(cfg, _StuckIO(str(tmp_path / "run"), rows={}, num_rows=64))
    assert time.monotonic() - started < 120  # a bound on a hang, not a timing assertion
