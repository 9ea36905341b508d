"""The chart as Helm itself sees it: rendered by Helm's own engine (the helm-python-sdk
wheel bundles Helm's Go SDK), over a matrix of values; every object validates against the
Kubernetes JSON schemas of the versions we claim (kubernetes-validate, strict); the
rendered routing config is one `kom-gateway check` accepts; `helm lint --strict` is
clean; and values.schema.json refuses typos and out-of-range values at install time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kom_gateway.config import load_config_text

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as exc:  # CI installs the test extra: there, missing is a failure
    if os.environ.get("KOM_REQUIRE_CLIENTS") == "1":
        raise
    pytest.skip(f"needs the test extra ({exc.name})", allow_module_level=True)

CHART = Path(__file__).resolve().parent.parent / "charts" / "kom-gateway"
KUBE_VERSIONS = ("1.29.0", "1.33.0")  # the oldest and newest minor the chart claims
CRDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator kinds: not in the schemas
TLS = {
    "tls": {
        "servingSecretName": "gw-serving",
        "clientCASecretName": "cluster-ca",
        "upstreamCASecretName": "cluster-ca",
        "frontProxySecretName": "front-proxy-client",
        "sessionTickets": 1,
    },
    # a section of the chart's own (upstream.tls) merged with what the operator sets
    "config": {"upstream": {"tls": {"serverName": "kubernetes"}},
               "timeouts": {"requestSeconds": 30}},
}
MATRIX = {
    "defaults": {},
    "tls": TLS,
    "hpa": {"autoscaling": {"enabled": True}},
    "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "checksum-rollout": {"configReload": "checksum"},
    "shadow": {"config": {"cutover": [{"match": {"userAgent": "kubelet/*"}, "percent": {"pod": 5},
                                       "shadow": {"group": "pod", "percent": 5, "maxPerSecond": 50}}]}},
    "minimal": {"replicaCount": 1, "workers": 1, "podDisruptionBudget": {"enabled": False},
                "antiAffinity": "none", "service": {"type": "NodePort", "nodePort": 30443}},
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        manifests = chart.render(values, name="kg", namespace="kube-system", is_install=True)
    finally:
        chart.close()
    objects = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            objects += [o for o in yaml.safe_load_all(text) if o]
    return objects


@pytest.mark.parametrize("case", MATRIX)
def test_every_rendered_object_is_valid_kubernetes(case):
    objects = render(MATRIX[case])
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] in CRDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("case", MATRIX)
def test_the_rendered_routing_config_is_one_the_gateway_accepts(case, tmp_path):
    configmap = next(o for o in render(MATRIX[case]) if o["kind"] == "ConfigMap")
    config = load_config_text(configmap["data"]["config.yaml"], "configmap", str(tmp_path))
    plaintext = [w for w in config.warnings if "usually means TLS" in w.message]
    if case == "tls":
        assert config.listen_tls is not None and config.listen_tls.client_ca_file
        assert config.listen_tls.session_tickets == 1
        assert config.upstream_tls.cert_file and config.upstream_tls.ca_file
        assert config.upstream_tls.server_name == "kubernetes"  # no duplicate-key clash
        assert config.timeouts.request == 30
        assert not plaintext
    else:
        assert plaintext  # `check` says it: h2c on 0.0.0.0:8443


def test_optional_objects_follow_their_values():
    kinds = lambda values: sorted(o["kind"] for o in render(values))  # noqa: E731
    assert "HorizontalPodAutoscaler" not in kinds({})
    assert "HorizontalPodAutoscaler" in kinds(MATRIX["hpa"])
    hpa = next(o for o in render(MATRIX["hpa"]) if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds(MATRIX["monitoring"]))
    rule = next(o for o in render(MATRIX["monitoring"]) if o["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "KomGatewayDefaultGroupDown" in alerts  # the same file promtool tests
    deployment = next(o for o in render(MATRIX["checksum-rollout"]) if o["kind"] == "Deployment")
    assert any("checksum" in k for k in deployment["spec"]["template"]["metadata"]["annotations"])


def test_notes_warn_about_plaintext_behind_the_tls_port():
    chart = helm.Chart.load(CHART)
    try:
        plain = chart.render({}, name="kg", namespace="ns")["kom-gateway/templates/NOTES.txt"]
        tls = chart.render(TLS, name="kg", namespace="ns")["kom-gateway/templates/NOTES.txt"]
    finally:
        chart.close()
    assert "WARNING: tls.servingSecretName is empty" in plain
    assert "  http://kg-kom-gateway.ns.svc:443" in plain  # no https:// promised
    assert "WARNING" not in tls and "https://kg-kom-gateway.ns.svc:443" in tls


def test_helm_lint_strict_is_clean():
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, problems


@pytest.mark.parametrize(("values", "says"), [
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),  # a typo
    ({"config": {"cutover": [{"percent": {"pod": 150}}]}}, "maximum: got 150, want 100"),
    ({"config": {"cutover": [{"shadow": {"group": "pod", "sample": 1}}]}}, "'sample' not allowed"),
    ({"configReload": "sometimes"}, "/configReload"),
    ({"tls": {"sessionTickets": 17}}, "maximum: got 17, want 16"),
    ({"config": {"listen": {"address": "0.0.0.0:1"}}}, "/config"),  # the chart writes listen
    ({"config": {"upstream": {"tls": {"caFile": "/x"}}}}, "/config/upstream/tls"),  # and these
])
def test_values_schema_refuses_bad_values_at_install(values, says):
    with pytest.raises(helm.HelmValuesError, match=None) as refused:
        render(values)
    assert says in str(refused.value)
