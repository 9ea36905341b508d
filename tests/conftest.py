import os

import pytest
from hypothesis import HealthCheck, settings
from pki import make_pki

# Deterministic property tests: same examples on every run, no flaky deadlines on CI.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """One kubeadm-shaped PKI for the whole run (see tests/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


ENGINES = ("nghttp2", "h2")


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Run a test once per HTTP/2 engine: what `auto` picks in this process (the
    gateway's engine; the simulator stays on h2, as kube-apiserver's stand-in). Without
    the compiled extension the nghttp2 run is skipped, except where CI requires it."""
    from kom_gateway.http import engine as engines

    if request.param == "nghttp2" and (missing := engines.nghttp2_missing()) is not None:
        if os.environ.get("KOM_REQUIRE_CLIENTS"):
            pytest.fail(f"the nghttp2 engine is not built: {missing}")
        pytest.skip(f"the nghttp2 engine is not built: {missing}")
    monkeypatch.setattr(engines, "auto_preference", request.param)
    return request.param
