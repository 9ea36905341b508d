"""The cluster-shaped day with faults, short: bench/cluster_bench.py's `--faults` (its
`FaultDay` and `slo_violations`, defined there once) at 150 kubelets for a minute, each
on its own TLS connection with its own node certificate, with a scheduler, informers and
pod churn, through one gateway process in front of the simulator. One after another: the
pod group answers 500, then resets every response mid-body; the event group goes down
and comes back; a client stalls with unread LISTs; a 20 KB hostile User-Agent arrives;
the config is reloaded; the replica is SIGKILLed and restarted in place (every kubelet
reconnects at once). Every SLO must hold; the SLO check itself is tested on made-up
failure lines. The Go stand-in for kube-apiserver, on which the day runs at thousands of
kubelets, is checked to have the day's fault switches, with curl.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
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
            "handshakes_before_kill": {},  # clients leaving reconnects break no SLO
            "handshakes_after_kill": {"tls-handshake-abandoned": 3, "tls-client-gone": 40}}

    def check(lines=(), back=4.0, processes=1, **changes):
        return cluster_bench.slo_violations(day, {**summary, **changes}, list(lines), seen, 2,
                                            back, processes)

    assert check() == []
    kill = day.kill
    assert check([{"t": kill + 2, "failure": "lease-update connection refused"}]) == []
    assert check([{"t": 3.0, "failure": "lease-update connection refused"}])  # not the kill's
    # cut mid-body before the ejection: allowed, up to THRESHOLD and the second reader's
    # request under way at the ejection
    cuts = [{"t": 17.0, "failure": "pod-list EOF"}] * (cluster_bench.THRESHOLD + 1)
    assert check(cuts) == []
    assert check([*cuts, {"t": 17.5, "failure": "pod-list EOF"}])
    assert check([{"t": 9.0, "failure": "pod-list 500"}])  # a read failing with a status
    # two ejection rounds in the 5 s of 500s, each THRESHOLD and the other writer's write
    # under way at the ejection
    writes = [{"t": 9.0, "failure": "create-pod 500"}] * (2 * (cluster_bench.THRESHOLD + 1))
    assert check(writes) == []
    assert check([*writes, {"t": 12.0, "failure": "create-pod 500"}])
    # each of --workers N ejects on its own failures: N times as many get through
    assert check([*writes, *writes], processes=2) == []
    assert check([*cuts, *cuts], processes=2) == []
    assert check([*writes, *writes, {"t": 12.0, "failure": "create-pod 500"}], processes=2)
    assert check([*cuts, *cuts, {"t": 17.5, "failure": "pod-list EOF"}], processes=2)
    assert check([{"t": 30.0, "failure": "create-pod 500"}])  # not in the 500s' window
    assert check([{"t": 7.9, "failure": "create-pod 500"}]) == []  # the fleet's clock lags
    assert check(retriable_writes={"bind 429": 1})
    assert "got 429 at 130.2-131.0 s" in check(
        [{"t": 130.2, "retriable": "bind 429"}, {"t": 131.0, "retriable": "bind 429"}],
        retriable_writes={"bind 429": 2})[0]
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


def test_the_go_stand_in_has_the_days_fault_switches(tmp_path):
    """The day with faults at thousands of kubelets runs on the Go stand-in
    (bench/cluster/apiserver): its fault switches, on the simulator's control API, seen
    by curl over HTTP/2: a status for every resource request, reads reset mid-body (a
    LIST cut after half its body, a watch after its first event: RST_STREAM), a group
    down (its watch reset, connections refused) and back."""
    need("go")
    curl = need("curl")
    pki = make_pki(tmp_path)
    binary = cluster_bench.build_fleet(tmp_path, "./apiserver", "apiserver")
    upstream = cluster_bench.GoUpstream(tmp_path, pki, binary=binary)
    upstream.start()
    port = upstream.ports["pod"]

    def get(path: str, *options: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(
            [curl, "-sS", "--http2", "--cacert", str(pki.ca), "--cert", str(pki.admin_cert),
             "--key", str(pki.admin_key), "-w", "\n%{http_code}", *options,
             f"https://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def faults(**values: object) -> object:
        return upstream.control_call("PUT", "/groups/pod/faults", values)

    try:
        pod = '{"metadata": {"name": "p1"}, "spec": {"nodeName": "node-1"}}'
        made = get("/api/v1/namespaces/default/pods", "-X", "POST", "-d", pod,
                   "-H", "Content-Type: application/json")  # fmt: skip
        assert made.stdout.endswith("\n201"), made

        assert faults(status_override=500) == {"status_override": 500, "reset_mid_body": False}
        answer = get("/api/v1/pods")
        assert answer.stdout.endswith("\n500") and '"reason":"InternalError"' in answer.stdout
        assert get("/readyz").stdout == "ok\n200"  # not a resource request: answered

        faults(status_override=0, reset_mid_body=True)
        cut = get("/api/v1/pods")
        assert cut.returncode == 92 and "INTERNAL_ERROR" in cut.stderr, cut  # RST_STREAM
        body = cut.stdout.rsplit("\n", 1)[0]  # (curl's status code line: the headers' 200)
        assert body.startswith('{"apiVersion":"v1","items":[') and not body.endswith("}")
        watch = get("/api/v1/pods?watch=1")
        assert watch.returncode == 92 and '"type":"ADDED"' in watch.stdout, watch
        with pytest.raises(urllib.error.HTTPError) as unknown:  # a switch it lacks: said
            faults(latency=1)
        assert unknown.value.code == 400

        faults(reset_mid_body=False)
        open_watch = subprocess.Popen(
            [curl, "-sSN", "--http2", "--cacert", str(pki.ca), "--cert", str(pki.admin_cert),
             "--key", str(pki.admin_key), f"https://127.0.0.1:{port}/api/v1/pods?watch=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            first = open_watch.stdout.readline()  # the watch is up
            assert '"type":"ADDED"' in first
            upstream.control_call("POST", "/groups/pod/down")
            open_watch.wait(10)
        finally:
            open_watch.kill()
        assert open_watch.returncode not in (0, None), open_watch.stderr.read()  # cut
        assert get("/api/v1/pods").returncode == 7  # connection refused
        groups = upstream.control_call("GET", "/groups")
        assert groups["pod"]["down"] and not groups["default"]["down"], groups

        upstream.control_call("POST", "/groups/pod/up")
        assert get("/api/v1/pods").stdout.endswith("\n200")
    finally:
        upstream.stop()


def test_the_gateways_own_counts_read_by_label():
    """What the bench reports of the gateway's own /metrics: unfinished handshakes and
    its own 429s, each by reason (summed over groups; zero counts left out)."""
    page = "\n".join([
        "# HELP kom_gateway_shed_requests_total Requests answered 429 ...",
        'kom_gateway_shed_requests_total{group="pod",reason="client-inflight"} 7.0',
        'kom_gateway_shed_requests_total{group="default",reason="client-inflight"} 2.0',
        'kom_gateway_shed_requests_total{group="pod",reason="inflight"} 0.0',
        'kom_gateway_shed_requests_created{group="pod",reason="inflight"} 1.7e9',
        'kom_gateway_client_connections_rejected_total{reason="tls-handshake-abandoned"} 3.0',
        'kom_gateway_client_connections_rejected_total{reason="tls-client-gone"} 4.0',
        'kom_gateway_client_connections_rejected_total{reason="per-address-limit"} 5.0',
    ])  # fmt: skip
    assert cluster_bench.shed_requests(page) == {"client-inflight": 9}
    assert cluster_bench.failed_handshakes(page) == {
        "tls-handshake-abandoned": 3, "tls-client-gone": 4}  # fmt: skip
