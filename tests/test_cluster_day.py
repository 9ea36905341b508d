"""The cluster-shaped day with faults, short: bench/cluster_bench.py's `--faults` (its
`FaultDay` and `slo_violations`, defined there once) at 150 kubelets for a minute, each
on its own TLS connection with its own node certificate, with a scheduler, informers and
pod churn, through one gateway process in front of the simulator. One after another: the
pod group answers 500, then resets every response mid-body; the event group goes down
and comes back; a client stalls with unread LISTs; a 20 KB hostile User-Agent arrives;
the config is reloaded; the replica is SIGKILLed and restarted in place (every kubelet
reconnects at once). Every SLO must hold; the SLO check itself is tested on made-up
failure lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from e2e import need
from pki import make_pki

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cluster_bench

pytestmark = pytest.mark.timeout(400)


def test_a_day_with_faults_meets_the_slos(tmp_path):
    need("openssl")
    need("go")
    fleet = cluster_bench.build_fleet(tmp_path)
    pki = make_pki(tmp_path)
    args = cluster_bench.parser().parse_args([
        "--nodes", "150", "--seconds", "60", "--churn", "5", "--live", "100",
        "--lease-interval", "2", "--status-interval", "10", "--relist", "20", "--faults"])
    result = cluster_bench.measure("gateway", fleet, pki, tmp_path, args)
    assert result["slo_violations"] == [], result
    assert result["pods_bound"] > 200, result
    day = result["fault_day"]
    # the hostile User-Agent was routed (cost linear in its length) and answered by the
    # apiserver (401: the simulator takes no anonymous requests)
    assert day["hostile_user_agent"].startswith("HTTP/1.1 401"), day
    assert day.get("stalled_client") == "cut off", day  # the stalled reader was let go


def test_slos_name_each_broken_one():
    """The SLO check itself: a clean day passes; each kind of breach is named."""
    day = cluster_bench.FaultDay(60)
    summary = {"retriable_writes": {}, "pods_never_delivered": 0, "lease_gap_max_s": 2.0,
               "informers_consistent": True, "all_watches_up_s": 1.5}
    seen = {"hostile_user_agent": "HTTP/1.1 401 Unauthorized",
            "handshakes_before_kill": {}, "handshakes_after_kill": {"tls-handshake-abandoned": 3}}

    def check(lines=(), back=4.0, **changes):
        return cluster_bench.slo_violations(day, {**summary, **changes}, list(lines), seen, 150,
                                            back)

    assert check() == []
    kill = day.kill
    assert check([{"t": kill + 2, "failure": "lease-update connection refused"}]) == []
    assert check([{"t": 3.0, "failure": "lease-update connection refused"}])  # not the kill's
    cuts = [{"t": 17.0, "failure": "pod-list EOF"}] * cluster_bench.THRESHOLD
    assert check(cuts) == []  # cut mid-body before the ejection: allowed, up to THRESHOLD
    assert check([*cuts, {"t": 17.5, "failure": "pod-list EOF"}])
    assert check([{"t": 9.0, "failure": "pod-list 500"}])  # a read failing with a status
    writes = [{"t": 9.0, "failure": "create-pod 500"}] * (2 * cluster_bench.THRESHOLD)
    assert check(writes) == []  # two ejection rounds in the 5 s of 500s
    assert check([*writes, {"t": 12.0, "failure": "create-pod 500"}])
    assert check([{"t": 30.0, "failure": "create-pod 500"}])  # not in the 500s' window
    assert check([{"t": 7.9, "failure": "create-pod 500"}]) == []  # the fleet's clock lags
    assert check(retriable_writes={"bind 429": 1})
    assert check(pods_never_delivered=1)
    assert check(lease_gap_max_s=41.0)
    assert check(informers_consistent=False)
    assert check(back=None) and check(back=25.0)
    seen["handshakes_after_kill"] = {"tls-handshake-timeout": 1}
    assert check()


def test_ejection_rounds():
    assert cluster_bench.ejection_rounds(5) == 2  # 2 s out, then 4 s
    assert cluster_bench.ejection_rounds(15) == 4  # 2, 4, 8, then 10 (capped)
    assert cluster_bench.ejection_rounds(0) == 0


def test_callgrind_counts_the_instrumented_window_of_every_dump(tmp_path):
    """--callgrind: the instructions are the dumps' `totals:` (a dump on request says
    `summary: 0`), over every part file callgrind wrote for the run."""
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\nsummary: 0\ntotals: 0\n")  # written at exit, nothing counted
    (tmp_path / "callgrind.out.1").write_text("events: Ir\nsummary: 0\nfn=x\n1 5\ntotals: 1200\n")
    (tmp_path / "callgrind.out.2").write_text("events: Ir\ntotals: 34\n")
    (tmp_path / "other.out").write_text("totals: 99999\n")
    assert cluster_bench.callgrind_total(out) == 1234


def test_watches_back_after_a_kill_whichever_sample_caught_the_dip():
    def lines(*samples):
        return [{"t": t, "watches_up": n} for t, n in samples]

    up = cluster_bench.seconds_until_all_up
    # the dip sampled a little before the kill's recorded time (the fleet's clock lags)
    assert up(lines((39.0, 150), (39.95, 0), (41.0, 100), (42.0, 150)), 40.1, 150) == 1.9
    assert up(lines((39.0, 150), (40.5, 0), (42.5, 150)), 40.0, 150) == 2.5
    assert up(lines((39.0, 150), (40.9, 150)), 40.0, 150) == 0.9  # back before a sample
    assert up(lines((39.0, 150), (40.5, 3)), 40.0, 150) is None  # never back
