"""What Helm does not judge about the chart (Helm's own engine renders, lints and
schema-checks it in test_chart_helm.py): every value a template reads exists in
values.yaml, every value is documented there, and the security defaults hold."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "kom-gateway"
TEMPLATES = sorted((CHART / "templates").iterdir())


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_every_value_read_exists():
    """Helm renders a missing value as nothing, silently: every `.Values` path a template
    reads must be in values.yaml (and so documented there)."""
    have = values()
    for template in TEMPLATES:
        text = template.read_text()
        for path in re.findall(r"\$?\.Values((?:\.\w+)+)", text):
            node = have
            for key in path.strip(".").split("."):
                assert isinstance(node, dict) and key in node, (
                    f"{template.name} reads .Values{path}, not in values.yaml")
                node = node[key]


def test_values_are_documented_and_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kom-gateway" and chart["version"]
    text = (CHART / "values.yaml").read_text()
    for key in values():  # every top-level value has a comment above or beside it
        block = text.split(f"\n{key}:")[0].rstrip().splitlines()[-1]
        line = next(x for x in text.splitlines() if x.startswith(f"{key}:"))
        assert block.startswith("#") or "#" in line, f"values.yaml: {key} is undocumented"


def test_probes_and_security_defaults():
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "path: /readyz, port: admin" in deployment and "path: /healthz, port: admin" in deployment
    v = values()
    assert v["securityContext"]["readOnlyRootFilesystem"] is True
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    assert v["configReload"] in ("live", "checksum")


def _values_leaves(values: dict, prefix: str = ""):
    """Dotted keys of values.yaml as the chart README's table lists them (objects whose
    fields go together, such as resources, as one row)."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        whole = path in ("config", "resources", "podSecurityContext", "securityContext")
        if isinstance(value, dict) and value and not whole:
            yield from _values_leaves(value, path + ".")
        else:
            yield path, value


def test_the_chart_readme_lists_every_value_with_its_default():
    """helm-docs' convention: a Values table, kept equal to values.yaml by this test."""
    import json

    import yaml

    chart = Path(__file__).resolve().parent.parent / "charts" / "kom-gateway"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    rows = {}
    for line in (chart / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            key, default = (cell.strip() for cell in line.split("|")[1:3])
            rows[key.strip("`")] = default.strip("`")
    expected = dict(_values_leaves(values))
    assert set(rows) == set(expected)
    for key, value in expected.items():
        if key != "config":
            assert json.loads(rows[key]) == value, key
