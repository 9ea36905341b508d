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
