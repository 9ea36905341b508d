"""The Helm chart without helm (no binary on these machines): every template's Go-template
syntax is well formed, uses only functions Helm has, includes only templates it defines,
reads only values that exist in values.yaml; and the routing config the default values
render is one the gateway accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kom_gateway.config import load_config_text

CHART = Path(__file__).resolve().parent.parent / "charts" / "kom-gateway"
TEMPLATES = sorted((CHART / "templates").iterdir())
ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
# Go text/template builtins and the Sprig/Helm functions the chart may use
FUNCTIONS = {
    "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index", "print", "printf",
    "include", "toYaml", "nindent", "indent", "quote", "default", "sha256sum", "trunc",
    "trimSuffix", "contains", "replace", "add", "required", "tpl", "toString", "int",
}
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "nil"}
OPENERS = {"if", "range", "with", "define", "block"}


def actions(text: str) -> list[str]:
    """The inside of every {{ }} action; fails on braces outside actions."""
    outside = ACTION.sub("", text)
    assert "{{" not in outside and "}}" not in outside, "unbalanced {{ }}"
    return [m.group(2).strip() for m in ACTION.finditer(text)]


def words(action: str) -> list[str]:
    """Identifiers of an action, outside string literals."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', action)
    assert without_strings.count('"') % 2 == 0, f"unterminated string in {action!r}"
    assert without_strings.count("(") == without_strings.count(")"), action
    return re.findall(r"(?<![.$\w])[A-Za-z_]\w*", without_strings)


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_syntax(template):
    stack: list[str] = []
    for action in actions(template.read_text()):
        if action.startswith("/*"):
            assert action.endswith("*/"), f"unclosed comment in {template.name}"
            continue
        first = action.split()[0] if action.split() else ""
        if first in OPENERS:
            stack.append(first)
        elif first == "else":
            assert stack and stack[-1] in ("if", "with", "range"), f"stray else: {action!r}"
        elif first == "end":
            assert stack, f"{template.name}: end without an opener"
            stack.pop()
        for word in words(action):
            assert word in FUNCTIONS or word in KEYWORDS, (
                f"{template.name}: unknown function {word!r} in {{{{ {action} }}}}")
    assert not stack, f"{template.name}: unclosed {stack}"


def test_every_value_read_exists_and_every_include_is_defined():
    defined, included = set(), set()
    have = values()
    for template in TEMPLATES:
        text = template.read_text()
        defined |= set(re.findall(r'define "([^"]+)"', text))
        included |= set(re.findall(r'include "([^"]+)"', text))
        for path in re.findall(r"\$?\.Values((?:\.\w+)+)", text):
            node = have
            for key in path.strip(".").split("."):
                assert isinstance(node, dict) and key in node, (
                    f"{template.name} reads .Values{path}, not in values.yaml")
                node = node[key]
    assert included <= defined, included - defined


def test_values_are_documented_and_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kom-gateway" and chart["version"]
    text = (CHART / "values.yaml").read_text()
    for key in values():  # every top-level value has a comment above or beside it
        block = text.split(f"\n{key}:")[0].rstrip().splitlines()[-1]
        line = next(x for x in text.splitlines() if x.startswith(f"{key}:"))
        assert block.startswith("#") or "#" in line, f"values.yaml: {key} is undocumented"


def test_default_values_render_a_config_the_gateway_accepts():
    v = values()
    # what the kom-gateway.config template writes around .Values.config
    document = {
        "listen": {"address": f"0.0.0.0:{v['service']['targetPort']}"},
        "admin": {"address": f"0.0.0.0:{v['admin']['port']}"},
        **v["config"],
    }
    config = load_config_text(yaml.safe_dump(document), "chart values")
    assert set(config.groups) == {"default", "pod", "config", "event"}
    assert config.listen.port == 8443 and config.admin.port == 9090
    template = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'address: "0.0.0.0:{{ .Values.service.targetPort }}"' in template
    assert "{{ toYaml .Values.config }}" in template
    for key in ("listen", "admin"):
        assert key not in v["config"], f"values.config.{key} is the chart's to set"


def test_probes_and_security_defaults():
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "path: /readyz, port: admin" in deployment and "path: /healthz, port: admin" in deployment
    v = values()
    assert v["securityContext"]["readOnlyRootFilesystem"] is True
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    assert v["configReload"] in ("live", "checksum")
