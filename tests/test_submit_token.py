"""`sea-ray submit` and `sea-ray jobs` against a real Ray cluster with token authentication on (a
private `ray start --head` of its own, tests/clusters.py): no token, no access; the token from
RAY_AUTH_TOKEN or a token file submits, follows and lists; the job's exit code comes back."""

from __future__ import annotations

import secrets

import pytest

from tests.clusters import LocalCluster, clean_env, sea_ray

pytestmark = [pytest.mark.slow]


def test_token_authentication_on(tmp_path):
    """A cluster with token auth: no token, no access; the token from RAY_AUTH_TOKEN (mode unset)
    or RAY_AUTH_TOKEN_PATH (mode token) submits, follows and lists; the job's exit code comes back."""
    token = secrets.token_hex(16)
    c = LocalCluster(auth="token", token=token, num_cpus=1).start()
    try:
        home = tmp_path / "home"  # no ~/.ray/auth_token of this machine
        home.mkdir()
        denied = sea_ray("jobs", "--address", c.address, "list", env=clean_env(HOME=str(home),
                                                                                RAY_AUTH_MODE="token"),
                         timeout=120)
        assert denied.returncode == 1 and "Authentication" in denied.stderr, denied.stderr[-3000:]

        ok = sea_ray("submit", "--address", c.address, "--wait", "--", "presets",
                     env=clean_env(HOME=str(home), RAY_AUTH_TOKEN=token), timeout=300)
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
        assert "tiny-openclip-llama" in ok.stdout and "SUCCEEDED" in ok.stdout

        token_file = tmp_path / "auth_token"
        token_file.write_text(token)
        env = clean_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        failed = sea_ray("submit", "--address", c.address, "--wait", "--no-validate", "--", "validate", "--config",
                         "workflows/configs/tiny_align.yaml", "bogus=1", env=env, timeout=300)
        assert failed.returncode == 2, (failed.stdout + failed.stderr)[-4000:]
        assert "bogus: unknown key" in failed.stdout and "FAILED, exit code 2" in failed.stdout
        listing = sea_ray("jobs", "--address", c.address, env=env, timeout=120)
        assert listing.returncode == 0 and "SUCCEEDED" in listing.stdout and "FAILED" in listing.stdout
        for result in (denied, ok, failed, listing):
            assert token not in result.stdout + result.stderr
    finally:
        c.cleanup()
