"""The alerting rules, judged by Prometheus' own tool: promtool checks them and runs
their unit tests (input series -> expected alerts), every runbook link points at a
section of docs/operations.md, and every metric they use is one the gateway exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e import REQUIRE

from kom_gateway.proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "charts" / "kom-gateway" / "alerts" / "kom-gateway-alerts.yaml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if REQUIRE:
            pytest.fail("promtool is required (Debian package prometheus)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return found


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_of_the_alerts_pass():
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True,
                         text=True, timeout=60, cwd=RULE_TESTS.parent)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alerts()}  # every alert has a test


def test_every_alert_links_to_its_runbook_section():
    headings = {
        "runbook-" + re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^### Runbook: (.+)$", OPERATIONS.read_text(), re.M)
    }
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in headings, (rule["alert"], anchor, headings)


def test_every_metric_the_alerts_use_is_exported():
    exported = Metrics().registry
    names = {m.name for m in exported.collect()}
    names |= {n + "_total" for n in names}  # counters are exposed with _total
    used = {n for rule in alerts() for n in re.findall(r"\bkom_gateway_\w+", rule["expr"])}
    assert used <= names, used - names
