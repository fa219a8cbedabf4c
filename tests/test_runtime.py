"""sea_ray.runtime without a real Ray: the local start's retry and the quiet switches."""

import io

import pytest
import ray

from sea_ray import runtime

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


@pytest.fixture
def fake_init(monkeypatch):
    """ray.init raising the given errors in turn, then returning "context"; the calls recorded."""
    def install(*errors):
        calls = {"init": [], "shutdown": 0}
        pending = list(errors)

        def init(**kwargs):
            calls["init"].append(kwargs)
            if pending:
                raise pending.pop(0)
            return "context"

        monkeypatch.setattr(ray, "init", init)
        monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
        return calls

    return install


def test_a_local_ray_that_misses_its_startup_window_is_started_again(fake_init):
    calls = fake_init(TIMEOUT, TIMEOUT)
    assert runtime.start_local_ray(num_cpus=2) == "context"
    assert [c["address"] for c in calls["init"]] == ["local"] * 3 and calls["shutdown"] == 2
    assert calls["init"][-1]["num_cpus"] == 2


def test_the_third_startup_timeout_and_any_other_error_are_raised(fake_init):
    calls = fake_init(TIMEOUT, TIMEOUT, TIMEOUT)
    with pytest.raises(Exception, match="timed out during startup"):
        runtime.start_local_ray()
    assert len(calls["init"]) == 3
    calls = fake_init(ValueError("num_cpus must be positive"))
    with pytest.raises(ValueError):
        runtime.start_local_ray(num_cpus=-1)
    assert len(calls["init"]) == 1 and calls["shutdown"] == 0


def test_quiet_turns_off_transformers_progress_bars_in_a_log_not_on_a_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv(runtime.QUIET_VAR, "1")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        monkeypatch.setattr("sys.stderr", Terminal())
        runtime.quiet_ray_logs()
        assert hf_logging.is_progress_bar_enabled()
        monkeypatch.setattr("sys.stderr", io.StringIO())  # a file: a job's log
        runtime.quiet_ray_logs()
        assert not hf_logging.is_progress_bar_enabled()
        assert runtime.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for the processes started from here
    finally:
        hf_logging.enable_progress_bar()
