"""The JSON access log: its record, sampling, config, and what a running proxy writes."""

from __future__ import annotations

import asyncio
import json

import pytest
from harness import FAST_HEALTH, Stack

from kom_gateway.config import ConfigError, load_config_text
from kom_gateway.config.model import AccessLogSettings
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.proxy.accesslog import access_record, wanted
from kom_gateway.proxy.outcome import Outcome
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import Decision

GROUPS = 'groups:\n  default: {endpoints: ["https://10.0.0.1:6443"]}\n'


def test_record_has_what_a_cut_over_plan_needs():
    client = Client("kubelet/v1.31.0 (linux/amd64)", "x509:CN=system:node:n1,O=system:nodes",
                    "10.1.2.3", "system:node:n1", ("system:nodes",))
    info = parse_request("GET", "/api/v1/namespaces/kube-system/pods/p1/log")
    outcome = Outcome(client, info, Decision("pod", "default", "not-cut-over"), "default", 200,
                      0.0123, "https://10.0.0.10:6443", 0, 512, None)
    record = access_record(1763812800.25, outcome)
    assert record == {
        "time": "2025-11-22T12:00:00.250Z",
        "client": "x509:CN=system:node:n1,O=system:nodes|kubelet",
        "userAgent": "kubelet/v1.31.0 (linux/amd64)",
        "user": "system:node:n1",
        "verb": "get",
        "apiGroup": "",
        "apiVersion": "v1",
        "resource": "pods",
        "subresource": "log",
        "namespace": "kube-system",
        "name": "p1",
        "path": None,
        "homeGroup": "pod",
        "chosenGroup": "default",
        "cutover": "not-cut-over",
        "answeredBy": "default",
        "endpoint": "https://10.0.0.10:6443",
        "status": 200,
        "durationMs": 12.3,
        "bytesIn": 0,
        "bytesOut": 512,
        "fallback": None,
    }
    json.dumps(record)


def test_sampling_keeps_errors():
    sampled = AccessLogSettings(enabled=True, sample_rate=0.1)
    assert wanted(sampled, 200, None, 0.05) and not wanted(sampled, 200, None, 0.5)
    assert wanted(sampled, 503, None, 0.99) and wanted(sampled, 429, None, 0.99)
    assert wanted(sampled, 200, "connect", 0.99)
    strict = AccessLogSettings(enabled=True, sample_rate=0.1, always_log_errors=False)
    assert not wanted(strict, 503, None, 0.99)
    assert not wanted(AccessLogSettings(), 503, "connect", 0.0)  # disabled


def test_access_log_config(tmp_path):
    config = load_config_text(GROUPS + "accessLog: {enabled: true, path: access.log, "
                              "sampleRate: 0.25}\n", "x", str(tmp_path))
    assert config.access_log == AccessLogSettings(True, str(tmp_path / "access.log"), 0.25, True)
    assert load_config_text(GROUPS).access_log.enabled is False
    for bad, message in (("{enabled: yes please}", "must be true or false"),
                         ("{sampleRate: 2}", "at most 1"), ("{format: text}", "unknown key")):
        with pytest.raises(ConfigError) as info:
            load_config_text(GROUPS + f"accessLog: {bad}\n")
        assert message in str(info.value)


async def test_the_proxy_logs_requests_sheds_and_fallbacks(tmp_path):
    path = tmp_path / "access.log"
    stack = await Stack().start(extra=FAST_HEALTH + f"accessLog: {{enabled: true, path: {path}}}\n"
                                "overload: {rateLimits: [{name: r, match: {verbs: [delete]}, "
                                "qps: 1, burst: 1}]}\n")
    try:
        client = await stack.client()
        assert (await client.request("GET", "/api/v1/namespaces/default/pods")).status == 200
        for _ in range(2):
            await client.request("DELETE", "/api/v1/namespaces/default/configmaps/x")
        await stack.sim.set_down("pod", True)
        assert (await client.request("GET", "/api/v1/nodes")).status == 200
        fell_back = await client.request("GET", "/api/v1/namespaces/default/pods/p")
        assert fell_back.group == "default"
        stack.gateway.access_log.flush()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        by = {(r["verb"], r["resource"], r["status"]): r for r in records}
        listed = by[("list", "pods", 200)]
        assert (listed["homeGroup"], listed["chosenGroup"], listed["answeredBy"]) == (
            "pod", "pod", "pod")
        assert listed["endpoint"].startswith("http://127.0.0.1:") and listed["bytesOut"] > 0
        assert listed["userAgent"] == "kubectl/v1.31.0" and listed["client"].endswith("|kubectl")
        shed = by[("delete", "configmaps", 429)]
        assert shed["answeredBy"] == "gateway" and shed["endpoint"] is None
        got = by[("get", "pods", 404)]
        assert (got["chosenGroup"], got["answeredBy"], got["fallback"]) == (
            "pod", "default", got["fallback"])
        assert got["fallback"] in ("connect-error", "no-healthy-endpoint")
    finally:
        await stack.close()


async def test_sampling_in_the_proxy(tmp_path):
    path = tmp_path / "access.log"
    stack = await Stack().start(extra=FAST_HEALTH + f"accessLog: {{enabled: true, path: {path}, "
                                "sampleRate: 0}\n")
    try:
        client = await stack.client()
        await asyncio.gather(*(client.request("GET", "/api/v1/nodes") for _ in range(20)))
        stack.sim.groups["config"].faults.status_override = 503
        assert (await client.request("GET", "/api/v1/nodes")).status == 200  # default answered
        stack.sim.groups["default"].faults.status_override = 503
        assert (await client.request("DELETE", "/api/v1/nodes/n1")).status == 503
        stack.gateway.access_log.flush()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        # only the fallback and the error, sampling 0
        assert [(r["status"], r["answeredBy"], r["fallback"]) for r in records] == [
            (200, "default", "upstream-5xx"), (503, "config", None)]
    finally:
        await stack.close()


REPLAY_RULES = """cutover:
  - match: {userAgent: "kubelet/*"}
    percent: {pod: 100}
  - match: {userAgent: "kube-proxy/v1.31.0 (linux/amd64)"}
    percent: {pod: 100, config: 100}
  - match: {userAgent: "kube-proxy*"}
    percent: {config: 0}
  - match: {user: "system:serviceaccount:*"}
    percent: {pod: 100}
  - match: {userGroup: "system:nodes", userAgent: "python-*"}
    percent: {event: 100}
  - percent: {pod: 50, config: 50}
"""
REPLAY_CLIENTS = [  # User-Agent, extra headers: each a client key of its own
    ("kubelet/v1.31.0 (linux/amd64) kubernetes/abc", []),
    ("kubelet", []),  # the bare product: "kubelet/*" does not match it
    ("kube-proxy/v1.31.0 (linux/amd64)", []),
    ("kube-proxy/v1.30.2 (linux/amd64)", []),
    ("kubectl/v1.31.0", [(b"authorization", b"Bearer token-a")]),
    ("kubectl/v1.31.0", [(b"authorization", b"Bearer token-b")]),
    ("python-requests/2.32", []),
    ("", []),
]


async def test_route_decides_every_logged_request_as_the_data_plane_did(tmp_path, capsys):
    """Issue: `route --client KEY` answered "default" for a request the data plane had
    sent to `pod` (the key carries the program, rules match the whole User-Agent). Every
    line of a real access log, replayed with --log-line, gets the group that was logged;
    --client with the logged userAgent does too; --client alone refuses to guess."""
    from kom_gateway.cli import main

    path = tmp_path / "access.log"
    stack = await Stack().start(cutover=REPLAY_RULES, extra=FAST_HEALTH
                                + f"accessLog: {{enabled: true, path: {path}}}\n")  # fmt: skip
    try:
        client = await stack.client()
        for user_agent, headers in REPLAY_CLIENTS:
            for target in ("/api/v1/namespaces/default/pods", "/api/v1/nodes",
                           "/api/v1/namespaces/default/configmaps/c", "/version"):  # fmt: skip
                await client.request("GET", target, user_agent=user_agent, headers=headers)
        stack.gateway.access_log.flush()
        config = tmp_path / "gw.yaml"
        config.write_text(stack.config_text)
    finally:
        await stack.close()
    lines = path.read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert len(lines) == 4 * len(REPLAY_CLIENTS)
    assert {r["chosenGroup"] for r in logged} == {"pod", "config", "default"}
    # one key, two decisions: kube-proxy v1.31.0 and v1.30.2 share `addr:...|kube-proxy`
    # but only one matches the exact rule (why a key alone cannot be routed)
    by_key: dict[tuple[str, str], set[str]] = {}
    for r in logged:
        by_key.setdefault((r["client"], r["resource"]), set()).add(r["chosenGroup"])
    assert len({key for key, _ in by_key}) == 6
    assert by_key[("addr:127.0.0.1|kube-proxy", "nodes")] == {"config", "default"}
    capsys.readouterr()

    def route(*args: str) -> tuple[int, str]:
        code = main(["route", "--config", str(config), *args])
        out = capsys.readouterr()
        return code, out.out + out.err

    for line, record in zip(lines, logged, strict=True):
        code, out = route("--log-line", line)
        assert code == 0, out
        assert json.loads(out)["chosenGroup"] == record["chosenGroup"], line
        url = record["path"] or "/api/v1/" + "/".join(
            p for p in ("namespaces", record["namespace"]) if record["namespace"]
        ) + f"/{record['resource']}" + (f"/{record['name']}" if record["name"] else "")
        if record["path"] is None and record["namespace"] is None:
            url = f"/api/v1/{record['resource']}"
        code, out = route("--client", record["client"], "--user-agent", record["userAgent"],
                          "GET", url)  # fmt: skip
        assert code == 0 and json.loads(out)["chosenGroup"] == record["chosenGroup"], (url, out)
        if "|" in record["client"] and not record["client"].endswith("|"):
            code, out = route("--client", record["client"], "GET", url)
            assert code == 2 and "--user-agent" in out and "--log-line" in out
