"""Cost of parse + route per request, against an empty call measured in the same run.

    python bench/route_bench.py [--repeats 15] [--iterations 20000]

Prints per-request nanoseconds (median over repeats) for:
  baseline     an empty function taking the same arguments
  parse        parse_request only
  route-warm   parse_request + Router.decide, client object reused (bucket cached),
               as the data plane does per connection
  route-cold   parse_request + Router.decide with a new Client per request (hash each time)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kom_gateway.config import load_config_file
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.routing import Client

ROOT = Path(__file__).resolve().parent.parent
KUBELET = "kubelet/v1.31.0 (linux/amd64) kubernetes/6911225"
SCHEDULER = "kube-scheduler/v1.31.0 (linux/amd64) kubernetes/6911225/scheduler"
KCM = "kube-controller-manager/v1.31.0 (linux/amd64) kubernetes/6911225/shared-informers"
KUBECTL = "kubectl/v1.31.0 (linux/amd64) kubernetes/6911225"

# A mix shaped like a big cluster's traffic: kubelet heartbeats and pod status, watches,
# scheduler bindings, controller lists, events, discovery.
MIX: list[tuple[str, str, str]] = [
    ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-17", KUBELET),
    ("PATCH", "/api/v1/nodes/node-17/status", KUBELET),
    ("PATCH", "/api/v1/namespaces/team-a/pods/web-7d9f-abcde/status", KUBELET),
    (
        "GET",
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-17&resourceVersion=12345&"
        "allowWatchBookmarks=true&timeoutSeconds=431&watch=true",
        KUBELET,
    ),
    (
        "GET",
        "/api/v1/namespaces/team-a/configmaps?fieldSelector=metadata.name%3Dapp-config"
        "&limit=500&resourceVersion=0",
        KUBELET,
    ),
    ("GET", "/api/v1/namespaces/team-a/secrets/db-password", KUBELET),
    ("POST", "/api/v1/namespaces/team-a/events", KUBELET),
    ("POST", "/api/v1/namespaces/team-a/pods/web-7d9f-abcde/binding", SCHEDULER),
    ("GET", "/api/v1/pods?limit=500&resourceVersion=0", SCHEDULER),
    (
        "GET",
        "/apis/apps/v1/replicasets?allowWatchBookmarks=true&resourceVersion=991&"
        "timeoutSeconds=350&watch=true",
        KCM,
    ),
    ("PUT", "/apis/apps/v1/namespaces/team-a/deployments/web/status", KCM),
    ("POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", KCM),
    ("GET", "/api/v1/namespaces/team-a/pods/web-7d9f-abcde/log?follow=true", KUBECTL),
    ("GET", "/apis/apps/v1", KUBECTL),
    ("GET", "/api/v1/namespaces/kube-system/pods", KUBECTL),
    ("DELETE", "/api/v1/namespaces/team-a/pods/web-7d9f-abcde", KUBECTL),
]


def _time_loop(fn: Callable[[str, str, Client], object], items: list, iterations: int) -> float:
    """Nanoseconds per call over `iterations` calls cycling through `items`."""
    rounds = max(1, iterations // len(items))
    start = time.perf_counter_ns()
    for _ in range(rounds):
        for method, target, client in items:
            fn(method, target, client)
    return (time.perf_counter_ns() - start) / (rounds * len(items))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--config", default=str(ROOT / "config" / "example.yaml"))
    args = parser.parse_args()

    router = load_config_file(args.config).router()
    clients = {
        ua: Client(ua, identity=f"x509:CN={ua.split('/')[0]}")
        for ua in (KUBELET, SCHEDULER, KCM, KUBECTL)
    }
    items = [(m, t, clients[ua]) for m, t, ua in MIX]

    def baseline(method: str, target: str, client: Client) -> None:
        return None

    def parse(method: str, target: str, client: Client) -> object:
        return parse_request(method, target)

    def route_warm(method: str, target: str, client: Client) -> object:
        return router.decide(parse_request(method, target), client)

    def route_cold(method: str, target: str, client: Client) -> object:
        fresh = Client(client.user_agent, client.identity)
        return router.decide(parse_request(method, target), fresh)

    cases = {
        "baseline": baseline,
        "parse": parse,
        "route-warm": route_warm,
        "route-cold": route_cold,
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleave cases so machine noise hits all alike
        for name, fn in cases.items():
            samples[name].append(_time_loop(fn, items, args.iterations))

    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["baseline"]
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{args.repeats} repeats x {args.iterations} calls, mix of {len(MIX)} requests"
    )
    print(f"{'case':<12} {'median ns':>10} {'min ns':>8} {'max ns':>8} {'x baseline':>11}")
    for name, values in samples.items():
        print(
            f"{name:<12} {medians[name]:>10.0f} {min(values):>8.0f} {max(values):>8.0f} "
            f"{medians[name] / base:>11.1f}"
        )
    print(json.dumps({"median_ns": {k: round(v) for k, v in medians.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
