"""The data plane's batched metric updates give what prometheus-client's own would."""

from __future__ import annotations

from prometheus_client import generate_latest

from kom_gateway.proxy.metrics import Metrics


def test_batched_histogram_observations_equal_prometheus_clients_own():
    """Metrics.add uses the histogram child's internals: the exposition must be what
    Histogram.observe (and Counter.inc) gives for the same values, edges and +Inf
    included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from kom_gateway.proxy.metrics import LATENCY_BUCKETS

    values = [0.0, 0.001, 0.005, 0.0051, 0.3, 1, 2.5, 59.9, 60, 61, 1e9]
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", ["g"], buckets=LATENCY_BUCKETS, registry=direct_registry)
    batched = Histogram("h", "h", ["g"], buckets=LATENCY_BUCKETS, registry=batched_registry)
    direct_count = Counter("c", "c", registry=direct_registry)
    batched_count = Counter("c", "c", registry=batched_registry)
    metrics = Metrics()
    for v in values:
        direct.labels("a").observe(v)
        direct_count.inc()
        metrics.add((batched_count,), (batched.labels("a"),), v)
    assert generate_latest(batched_registry) != generate_latest(direct_registry)  # not yet
    metrics.flush()
    assert samples(batched_registry) == samples(direct_registry)
    # the histogram's entry stays across flushes, zeroed: a flush with nothing new adds
    # nothing, and what comes after adds once
    metrics.flush()
    assert samples(batched_registry) == samples(direct_registry)
    for v in values[:4]:
        direct.labels("a").observe(v)
        direct_count.inc()
        metrics.add((batched_count,), (batched.labels("a"),), v)
    metrics.flush()
    metrics.flush()
    assert samples(batched_registry) == samples(direct_registry)


def test_a_series_resolved_once_adds_what_observe_would_across_flushes():
    """The request path resolves a Series once per kind of request and keeps it; two
    Series over the same children share their tallies, and what is added between
    flushes reaches the children once."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from kom_gateway.proxy.metrics import LATENCY_BUCKETS

    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", ["g"], buckets=LATENCY_BUCKETS, registry=direct_registry)
    batched = Histogram("h", "h", ["g"], buckets=LATENCY_BUCKETS, registry=batched_registry)
    direct_count = Counter("c", "c", ["g"], registry=direct_registry)
    batched_count = Counter("c", "c", ["g"], registry=batched_registry)
    metrics = Metrics()
    one = metrics.series((batched_count.labels("a"),), (batched.labels("a"),))
    again = metrics.series((batched_count.labels("a"),), (batched.labels("a"),))
    for round_values in ([0.004, 0.005, 0.0050001, 70.0], [], [1e-9, 30.0, float("inf")]):
        for i, v in enumerate(round_values):
            direct.labels("a").observe(v)
            direct_count.labels("a").inc()
            (one if i % 2 else again).add(v)
        metrics.flush()
        assert samples(batched_registry) == samples(direct_registry)


def test_a_resource_gets_a_label_of_its_own_once_an_apiserver_answered_it():
    """The resource and subresource labels come from the client's path: made-up names
    share one label, and a name gets its own once an apiserver answered it with success."""
    from kom_gateway.kube.requestinfo import parse_request
    from kom_gateway.proxy.accesslog import AccessLog, AccessLogSettings
    from kom_gateway.proxy.outcome import UNVERIFIED, Outcome, OutcomeRecorder
    from kom_gateway.routing.cutover import Client

    metrics = Metrics()
    recorder = OutcomeRecorder(metrics, AccessLog(AccessLogSettings(enabled=False)))
    client = Client("kubectl/v1.31.0", "token:x", "", "alice", ())

    def record(path: str, status: int, answered_by: str = "pod") -> None:
        recorder.record(Outcome(client, parse_request("GET", path), None, answered_by, status))

    for i in range(100):
        record(f"/apis/example.com/v1/made-up-{i}", 404, "default")
    record("/api/v1/namespaces/a/pods/gone", 404)  # no apiserver has vouched for pods yet
    record("/api/v1/namespaces/a/configmaps/c", 200, "gateway")  # not an apiserver's word
    record("/api/v1/namespaces/a/pods/p1", 200)
    record("/api/v1/namespaces/a/pods/gone", 404)
    record("/api/v1/namespaces/a/pods/p1/made-up", 404)
    record("/api/v1/namespaces/a/pods/p1/log", 200)
    record("/api/v1/namespaces/a/pods/p1/log", 404)
    record("/healthz", 200)
    metrics.flush()
    counts = {(s.labels["group"], s.labels["resource"], s.labels["subresource"], s.labels["code"]):
              s.value
              for family in metrics.registry.collect() if family.name == "kom_gateway_requests"
              for s in family.samples if s.name.endswith("_total")}  # fmt: skip
    assert counts == {
        ("default", UNVERIFIED, "", "404"): 100,
        ("pod", UNVERIFIED, "", "404"): 1,
        ("gateway", UNVERIFIED, "", "200"): 1,
        ("pod", "pods", "", "200"): 1,
        ("pod", "pods", "", "404"): 1,
        ("pod", "pods", UNVERIFIED, "404"): 1,
        ("pod", "pods", "log", "200"): 1,
        ("pod", "pods", "log", "404"): 1,
        ("pod", "", "", "200"): 1,
    }


def samples(registry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]
