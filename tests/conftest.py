import os

from hypothesis import HealthCheck, settings

# Deterministic property tests: same examples on every run, no flaky deadlines on CI.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
