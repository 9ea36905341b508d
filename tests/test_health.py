"""Endpoint health: probes and outlier ejection (pure, time passed in)."""

from kom_gateway.config.model import Health
from kom_gateway.proxy.health import EndpointHealth

POLICY = Health(failure_threshold=2, consecutive_failures=3, base_ejection=10, max_ejection=25)


def fail(health: EndpointHealth, times: int, now: float, may_eject: bool = True) -> list[bool]:
    return [health.failure(now, may_eject) for _ in range(times)]


def test_consecutive_failures_eject_and_the_endpoint_returns_by_itself():
    h = EndpointHealth(POLICY)
    assert fail(h, 3, 100.0) == [False, False, True]
    assert not h.available(100.0) and not h.available(109.9)
    assert h.available(110.0)  # base ejection over: back without anyone's help


def test_a_success_breaks_the_run():
    h = EndpointHealth(POLICY)
    fail(h, 2, 0.0)
    h.success()
    assert fail(h, 2, 0.0) == [False, False] and h.available(0.0)


def test_repeated_ejections_last_longer_up_to_the_cap_and_are_forgiven_later():
    h = EndpointHealth(POLICY)
    durations = []
    now = 0.0
    for _ in range(4):
        assert fail(h, 3, now)[-1]
        durations.append(h.ejected_until - now)
        now = h.ejected_until
    assert durations == [10, 20, 25, 25]
    now += POLICY.max_ejection + POLICY.base_ejection + 1  # a long good run
    assert fail(h, 3, now)[-1] and h.ejected_until - now == 10


def test_defaults_last_endpoint_is_not_ejected_its_probe_decides():
    """(may_eject is False only for default's last endpoint: nothing to fall back to.)"""
    h = EndpointHealth(POLICY)
    assert fail(h, 5, 0.0, may_eject=False) == [False] * 5
    assert h.available(0.0) and h.wants_probe()
    assert h.probe_result(False) is False  # one failed probe is enough now
    assert not h.available(0.0)
    assert h.probe_result(True) is True and h.available(0.0) and not h.wants_probe()


def test_probes_take_out_after_the_threshold_and_one_pass_brings_back():
    h = EndpointHealth(POLICY)
    assert h.probe_result(False) is None and h.available(0.0)
    assert h.probe_result(False) is False and not h.available(0.0)
    assert h.probe_result(False) is None
    assert h.probe_result(True) is True and h.available(0.0)
    assert h.probe_result(True) is None


def test_a_refused_connection_takes_out_at_once_until_a_probe_passes():
    h = EndpointHealth(POLICY)
    assert h.connect_failed() is True and not h.available(0.0)
    assert h.connect_failed() is False
    assert h.probe_result(True) is True and h.available(0.0)


def test_failures_while_ejected_do_not_extend_the_ejection():
    h = EndpointHealth(POLICY)
    fail(h, 3, 0.0)
    until = h.ejected_until
    assert fail(h, 6, 1.0) == [False] * 6  # requests sent before it was ejected
    assert h.ejected_until == until


def test_a_passing_probe_does_not_clear_a_run_of_failed_requests():
    """/readyz can pass while every request breaks: the run must still reach the
    threshold, however often probes pass in between."""
    h = EndpointHealth(POLICY)
    fail(h, 2, 0.0)
    assert h.probe_result(True) is None
    assert fail(h, 1, 0.0) == [True]
