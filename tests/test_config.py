"""Routing YAML: schema, errors with path and line, the shipped examples, atomic reload."""

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kom_gateway.config import (
    Address,
    ConfigError,
    ConfigHolder,
    Endpoint,
    load_config_file,
    load_config_text,
)
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.routing import Client

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
groups:
  default: {endpoints: ["https://10.0.0.10:6443"]}
"""


def load(text: str):
    return load_config_text(textwrap.dedent(text), "test.yaml")


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return [str(issue) for issue in info.value.issues]


def test_minimal_config_and_defaults():
    config = load(MINIMAL)
    assert config.listen == Address("127.0.0.1", 8443)
    assert config.admin == Address("127.0.0.1", 9090)
    assert config.listen_tls is None
    assert config.groups["default"].endpoints == (Endpoint("https", "10.0.0.10", 6443),)
    assert config.cutover == ()
    assert config.warnings == ()


def test_full_schema():
    config = load(
        """\
        listen:
          address: "[::]:8443"
          tls: {certFile: tls.crt, keyFile: tls.key, clientCAFile: /pki/ca.crt, sessionTickets: 2}
        admin: {address: "0.0.0.0:9091"}
        upstream:
          tls: {caFile: ca.crt, certFile: fp.crt, keyFile: fp.key, serverName: kubernetes}
        groups:
          default: {endpoints: ["https://a:6443", "http://127.0.0.1:16443"]}
          pod: {endpoints: ["https://[fd00::1]"], resources: [pods, pods/log, bindings]}
        cutover:
          - match: {userAgent: "kubelet/*", user: "system:node:*", userGroup: system:nodes}
            percent: {pod: 12.5}
          - match: {}
          - percent: {pod: 0}
        """
    )
    assert config.listen == Address("::", 8443)
    assert str(config.listen) == "[::]:8443"
    assert config.listen_tls.cert_file == os.path.abspath("tls.crt")
    assert config.listen_tls.client_ca_file == "/pki/ca.crt"
    assert config.listen_tls.session_tickets == 2
    assert config.upstream_tls.server_name == "kubernetes"
    assert config.groups["pod"].endpoints == (Endpoint("https", "fd00::1", 443),)
    assert str(config.groups["default"].endpoints[1]) == "http://127.0.0.1:16443"
    assert [str(c) for c in config.groups["pod"].resources] == ["pods", "pods/log", "bindings"]
    assert config.cutover[0].percent == {"pod": 12.5}
    assert config.cutover[0].line == 11
    assert config.cutover[1].percent == {}  # no percent: matching clients stay on default
    assert [str(w) for w in config.warnings] == [
        "line 14: cutover[2].match: same match as cutover[1]; this rule is never used "
        "(first match wins)"
    ]


def test_relative_tls_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "gw.yaml").write_text(MINIMAL + "upstream: {tls: {caFile: pki/ca.crt}}\n")
    config = load_config_file(str(tmp_path / "gw.yaml"))
    assert config.upstream_tls.ca_file == str(tmp_path / "pki" / "ca.crt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["the document is empty"]),
        ("groups: [", ["line 2: (top level): invalid YAML"]),  # where the input ended
        ("a: 1\n---\nb: 2\n", ["line 2: (top level): invalid YAML: but found another document"]),
        ("- 1\n", ["(top level): must be a mapping, got a list"]),
        ("groups: {}\n", ["line 1: groups: must be a non-empty mapping of group names, got a mapping"]),
        (
            "groups:\n  pod: {endpoints: [https://a]}\n",
            ["line 1: groups: a 'default' group is required"],
        ),
        (
            MINIMAL + "listen: {address: 8443}\n",
            ["line 3: listen.address: must be a string, got a number"],
        ),
        (
            MINIMAL + "listen: {address: 'localhost'}\n",
            ["line 3: listen.address: address 'localhost' must be host:port"],
        ),
        (MINIMAL + "listen: {address: ':8443'}\n", ["must be host:port"]),
        (MINIMAL + "listen: {address: 'a:99999'}\n", ["bad port in 'a:99999'"]),
        (MINIMAL + "listen: {address: '::1:8443'}\n", ["write IPv6 hosts in brackets"]),
        (MINIMAL + "listen: {tls: {certFile: a}}\n", ["line 3: listen.tls: missing required key 'keyFile'"]),
        (
            MINIMAL + "listen: {tls: {certFile: a, keyFile: b, sessionTickets: 1.5}}\n",
            ["listen.tls.sessionTickets: must be a positive whole number or 0 (off), got a number"],
        ),
        (
            MINIMAL + "listen: {tls: {certFile: a, keyFile: b, sessionTickets: 17}}\n",
            ["listen.tls.sessionTickets: must be at most 16, got 17"],
        ),
        (MINIMAL + "upstream: {tls: {certFile: a}}\n", ["certFile and keyFile go together"]),
        (MINIMAL + "upstream: {tls: {caFile: ''}}\n", ["line 3: upstream.tls.caFile: must not be empty"]),
        (MINIMAL + "tracing: true\n", ["line 3: tracing: unknown key (allowed: listen, admin"]),
        (
            "groups:\n  default:\n    endpoints: [https://a]\n    resource: [pods]\n",
            ["line 4: groups.default.resource: unknown key (allowed: endpoints, resources)"],
        ),
        ("groups:\n  default: {endpoints: []}\n", ["line 2: groups.default.endpoints: needs at least one endpoint"]),
        ("groups:\n  default: {}\n", ["line 2: groups.default: missing required key 'endpoints'"]),
        ("groups:\n  default: {endpoints: https://a}\n", ["must be a list, got a string"]),
        ("groups:\n  default: {endpoints: [a.b:6443]}\n", ["must start with https://"]),
        ("groups:\n  default: {endpoints: ['https://a:0']}\n", ["bad port in endpoint"]),
        ("groups:\n  default: {endpoints: ['https://a:x']}\n", ["bad port in endpoint"]),
        ("groups:\n  default: {endpoints: ['https://a/api']}\n", ["no path"]),
        ("groups:\n  default: {endpoints: ['https://u:p@a']}\n", ["credentials"]),
        ("groups:\n  default: {endpoints: ['https://']}\n", ["has no host"]),
        (
            MINIMAL + "  Pod: {endpoints: [https://b], resources: [pods]}\n",
            ["line 3: groups.Pod: group names are lower-case DNS labels"],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [Pods]}\n",
            ["line 3: groups.pod.resources[0]: bad resource 'Pods'", "did you mean 'pods'"],
        ),
        (
            MINIMAL
            + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            + "  other:\n    endpoints: [https://c]\n    resources:\n      - nodes\n      - pods\n",
            [
                "line 8: groups.other.resources[1]: pods is already claimed by group 'pod' "
                "(groups.pod.resources[0], line 3); a resource belongs to one group"
            ],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods, pods]}\n",
            ["pods is already claimed earlier in this group"],
        ),
        (
            "groups:\n  default: {endpoints: [https://a]}\n  default: {endpoints: [https://b]}\n",
            ["line 3: groups.default: duplicate key 'default'"],
        ),
        (MINIMAL + "cutover: {userAgent: x}\n", ["line 3: cutover: must be a list of rules, got a mapping"]),
        (MINIMAL + "cutover:\n  - match: {userAgent: 'kubelet['}\n", ["line 4: cutover[0].match.userAgent: bad glob 'kubelet['"]),
        (MINIMAL + "cutover:\n  - match: {userAgent: ''}\n", ["cutover[0].match.userAgent: must not be empty"]),
        (MINIMAL + "cutover:\n  - match: {ua: x}\n", ["cutover[0].match.ua: unknown key (allowed: userAgent, user, userGroup)"]),
        (MINIMAL + "cutover:\n  - match: {}\n    percnt: {}\n", ["line 5: cutover[0].percnt: unknown key"]),
        (MINIMAL + "cutover:\n  - percent: {pod: 10}\n", ["line 4: cutover[0].percent.pod: no group named 'pod' (groups: none)"]),
        (MINIMAL + "cutover:\n  - percent: {default: 10}\n", ["cutover[0].percent.default: default gets whatever"]),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            "cutover:\n  - percent: {pod: 101}\n",
            ["line 5: cutover[0].percent.pod: percent must be from 0 to 100, got 101"],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            "cutover:\n  - percent: {pod: -1}\n",
            ["percent must be from 0 to 100, got -1"],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            "cutover:\n  - percent: {pod: '50%'}\n",
            ["percent must be a number from 0 to 100, got a string"],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            "cutover:\n  - percent: {pod: yes}\n",
            ["percent must be a number from 0 to 100, got a boolean"],
        ),
        (
            MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n"
            "cutover:\n  - percent: {pod: .nan}\n",
            ["percent must be from 0 to 100, got nan"],
        ),
        (MINIMAL + "cutover:\n  - !!python/object:os.system {}\n", ["unsupported YAML tag"]),
        ("groups: &a [*a]\n", ["recursive alias"]),
        ("groups: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
        ("groups: " + "[" * 80 + "]" * 80 + "\n", ["nested deeper than 64 levels"]),
    ],
)
def test_errors_name_path_and_line(text, expected):
    rendered = "\n".join(errors_of(text))
    for fragment in expected:
        assert fragment in rendered


def test_all_errors_reported_at_once():
    errors = errors_of(
        """\
        listen: {address: nope}
        groups:
          pod: {endpoints: [ftp://x], resources: [Pods]}
        cutover:
          - match: {userAgent: "["}
            percent: {pod: 500}
        """
    )
    assert len(errors) == 6, errors


def test_error_render_prefixes_source():
    with pytest.raises(ConfigError) as info:
        load_config_text("groups: {}\n", "/etc/gw.yaml")
    assert info.value.render().startswith("/etc/gw.yaml: line 1: groups:")


def test_billion_laughs_is_bounded():
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 8):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1 if i > 1 else ''}"] * 10) + "]\n"
    text = text.replace("*a0", "*a")
    text += "groups: {default: {endpoints: [https://a]}}\n"
    with pytest.raises(ConfigError, match="too large"):
        load_config_text(text)


def test_warnings_for_groups_without_claims():
    config = load(MINIMAL + "  spare: {endpoints: [https://b]}\ncutover:\n  - percent: {spare: 5}\n")
    assert [str(w) for w in config.warnings] == [
        "line 3: groups.spare: claims no resources, so it never receives traffic",
        "line 5: cutover[0].percent.spare: group 'spare' claims no resources; this percent has no effect",
    ]


def test_unreadable_and_oversized_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(str(tmp_path / "missing.yaml"))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (4 * 1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config_file(str(big))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(str(binary))


@pytest.mark.parametrize("name", ["example.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config_file(str(ROOT / "config" / name))
    assert {"default", "pod", "config", "event"} <= set(config.groups)
    assert config.warnings == ()


def test_example_config_routes_the_usual_split():
    router = load_config_file(str(ROOT / "config" / "example.yaml")).router()
    homes = {
        "/api/v1/namespaces/a/pods/p/exec": "pod",
        "/api/v1/nodes/n1": "config",
        "/api/v1/namespaces/a/secrets/s": "config",
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1": "config",
        "/apis/discovery.k8s.io/v1/endpointslices": "config",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles": "config",
        "/apis/storage.k8s.io/v1/csinodes/n1": "config",
        "/api/v1/namespaces/a/events": "event",
        "/apis/events.k8s.io/v1/events": "event",
        "/apis/apps/v1/deployments": "default",
        "/apis/batch/v1/jobs": "default",
        "/version": "default",
    }
    for path, home in homes.items():
        assert router.decide(parse_request("GET", path), Client()).home == home, path


# -- the holder, through the reload production runs ------------------------------------
async def test_reload_swaps_valid_and_keeps_last_good_on_invalid(tmp_path):
    from kom_gateway.proxy.gateway import Gateway

    path = tmp_path / "gw.yaml"
    path.write_text(MINIMAL)
    gateway = Gateway(ConfigHolder(load_config_file(str(path))))
    try:
        first = gateway.holder.current
        assert first.generation == 1
        pods = parse_request("GET", "/api/v1/pods")
        assert first.router.decide(pods, Client()).home == "default"

        path.write_text(MINIMAL + "  pod: {endpoints: [https://b], resources: [pods]}\n")
        result = await gateway.reload(str(path))
        assert result.applied and result.generation == 2
        second = gateway.holder.current
        assert second.router.decide(pods, Client()).home == "pod"
        # a snapshot taken before the swap is untouched (in-flight requests keep theirs)
        assert first.router.decide(pods, Client()).home == "default"

        path.write_text("groups: {pod: {endpoints: []}}\n")
        bad = await gateway.reload(str(path))
        assert not bad.applied and bad.generation == 2
        assert "a 'default' group is required" in bad.error.render()
        assert gateway.holder.current is second

        path.write_text("{{{{")
        garbage = await gateway.reload(str(path))
        assert not garbage.applied and gateway.holder.current is second

        missing = await gateway.reload(str(tmp_path / "nope.yaml"))
        assert not missing.applied and "cannot read" in missing.error.render()
        assert gateway.metrics.config_reloads.labels("rejected")._value.get() == 3
        assert gateway.metrics.config_generation._value.get() == 2
    finally:
        await gateway.close()


@given(st.text(max_size=300))
def test_fuzz_config_text_never_raises_anything_but_config_error(text):
    try:
        load_config_text(text)
    except ConfigError as exc:
        assert exc.issues


YAMLISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.text(max_size=10),
              st.sampled_from(["pods", "https://a:1", "kubelet/*", "default", "pod"])),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(["groups", "default", "pod", "endpoints", "resources", "cutover",
                             "match", "percent", "userAgent", "listen", "address", "tls", "x"]),
            children, max_size=4),
    ),
    max_leaves=20,
)


@given(YAMLISH)
def test_fuzz_config_structure_never_raises_anything_but_config_error(data):
    import yaml

    try:
        load_config_text(yaml.safe_dump(data))
    except ConfigError as exc:
        assert exc.issues


def test_describe_changes_in_plain_words():
    from kom_gateway.config.diff import describe_changes

    text = (ROOT / "config" / "example.yaml").read_text()
    before = load_config_file(str(ROOT / "config" / "example.yaml"))
    edited = (text.replace("percent: {pod: 25, config: 100, event: 100}",
                           "percent: {pod: 50, config: 100, event: 100}")
              .replace("maxInflight: 300", "maxInflight: 200")
              .replace('"https://10.0.3.11:6443"', '"https://10.0.3.12:6443"')
              .replace("      - events.events.k8s.io\n", "")
              .replace("  - match: {userAgent: \"kube-controller-manager/*\"}\n"
                       "    percent: {event: 100}\n", "")
              .replace("idleTimeoutSeconds: 90", "idleTimeoutSeconds: 60")
              .replace('address: "0.0.0.0:8443"', 'address: "0.0.0.0:9443"')
              + "timeouts: {requestSeconds: 30}\nhealth: {consecutiveFailures: 3}\n")
    after = load_config_text(edited, "x", str(ROOT / "config"))
    assert describe_changes(before, after) == [
        "group event endpoints: +https://10.0.3.12:6443, -https://10.0.3.11:6443",
        "group event no longer claims events.events.k8s.io",
        "cutover userAgent=kubelet/* userGroup=system:nodes: pod 25% -> 50%",
        "cutover userAgent=kube-controller-manager/* removed (was event 100%): "
        "its clients go back to default",
        "overload.groups.event.maxInflight: 300 -> 200",
        "limits.idleTimeoutSeconds: 90 -> 60",
        "timeouts.requestSeconds: 60 -> 30",  # named as the YAML names them
        "health.consecutiveFailures: 5 -> 3",
        "listen.address: 0.0.0.0:8443 -> 0.0.0.0:9443 (takes effect on restart)",
    ]
    assert describe_changes(before, before) == ["no changes"]
    flagged = describe_changes(before, after, {"listen.address": "--listen"})
    assert flagged[-1] == "listen.address: 0.0.0.0:8443 -> 0.0.0.0:9443 (not applied: --listen overrides it)"


@pytest.mark.parametrize("name", ["kube-apiserver-static-pod.yaml", "operator-sidecar.yaml"])
def test_sidecar_examples_embed_valid_configs(name):
    import yaml

    documents = list(yaml.safe_load_all((ROOT / "config" / "sidecar" / name).read_text()))
    embedded = [d["data"]["config.yaml"] for d in documents
                if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    assert embedded
    for text in embedded:
        config = load_config_text(text, name)
        assert "default" in config.groups and config.warnings == ()
    kinds = {d["kind"] for d in documents}
    assert kinds & {"Pod", "Deployment"}


def test_transport_defaults_have_one_source():
    """An empty config gives exactly the HTTP layer's own defaults on both sides: the
    YAML's defaults are those, translated in one place."""
    from kom_gateway.http.settings import ConnectionLimits, H2ClientSettings, H2ServerSettings
    from kom_gateway.proxy.settings import listener_settings, upstream_settings

    config = load(MINIMAL)
    assert listener_settings(config) == (ConnectionLimits(), H2ServerSettings())
    assert upstream_settings(config) == H2ClientSettings()


def test_debug_answered_by_header():
    assert load(MINIMAL).answered_by_header == ""
    assert load(MINIMAL + "debug: {answeredByHeader: X-Kom-Answered-By}\n").answered_by_header == (
        "x-kom-answered-by")
    for bad in ("Content-Length", "x kom", "''"):
        with pytest.raises(ConfigError, match=r"debug\.answeredByHeader"):
            load(MINIMAL + f"debug: {{answeredByHeader: {bad}}}\n")


def test_each_connection_setting_has_one_default_the_http_layers():
    """The YAML sections' defaults are the HTTP layer's own (http/settings.py): an
    empty config translates into exactly the settings an engine starts with."""
    from kom_gateway.config.model import Config
    from kom_gateway.http.settings import ConnectionLimits, H2ClientSettings, H2ServerSettings
    from kom_gateway.proxy.settings import listener_settings, upstream_settings

    config = Config(groups={})
    assert listener_settings(config) == (ConnectionLimits(), H2ServerSettings())
    assert upstream_settings(config) == H2ClientSettings()


def _changed_number(field, default):
    """A valid value for a numeric key other than its default."""
    if not default:
        return field.minimum * 2 if field.minimum else (1 if field.whole else 0.01)
    value = default * 2
    if field.maximum is not None and value > field.maximum:
        value = (default + (field.minimum or 0)) / 2 if not field.whole else default - 1
    return value


def _every_key_and_a_change() -> list[tuple[str, dict]]:
    """(YAML key path, a config fragment changing it) for every key the schema accepts
    outside groups, cut-over rules and overload rules (whose own lines are tested above)."""
    import dataclasses

    from kom_gateway.config import keys as schema
    from kom_gateway.config.model import (
        Health,
        Http2Downstream,
        Http2Upstream,
        Limits,
        Timeouts,
    )
    from kom_gateway.overload.load import GoawayPolicy
    from kom_gateway.overload.policy import ClientLimits, GroupLimits

    tables = [
        (("limits",), schema.LIMIT_KEYS, Limits()),
        (("timeouts",), schema.TIMEOUT_KEYS, Timeouts()),
        (("health",), schema.HEALTH_KEYS, Health()),
        (("http2", "downstream"), schema.HTTP2_DOWNSTREAM_KEYS, Http2Downstream()),
        (("http2", "upstream"), schema.HTTP2_UPSTREAM_KEYS, Http2Upstream()),
        (("goaway",), schema.GOAWAY_KEYS, GoawayPolicy()),
        (("overload", "perClient"), schema.PER_CLIENT_KEYS, ClientLimits()),
        (("overload",), schema.OVERLOAD_GROUP_KEYS, GroupLimits()),
    ]
    cases = []
    for path, table, defaults in tables:
        assert {f.attr for f in table.values()} <= {f.name for f in dataclasses.fields(defaults)}
        for key, field in table.items():
            fragment: dict = {}
            node = fragment
            for part in path:
                node = node.setdefault(part, {})
            node[key] = _changed_number(field, getattr(defaults, field.attr))
            cases.append((".".join((*path, key)), fragment))
    for key, value in {"enabled": True, "path": "other.log", "sampleRate": 0.5,
                       "alwaysLogErrors": False}.items():  # fmt: skip
        assert key in schema.ACCESS_LOG_KEYS
        cases.append((f"accessLog.{key}", {"accessLog": {key: value}}))
    cases += [
        ("debug.answeredByHeader", {"debug": {"answeredByHeader": "X-Answered-By"}}),
        ("upstream.tls.serverName", {"upstream": {"tls": {"serverName": "apiserver"}}}),
        ("listen.address", {"listen": {"address": "127.0.0.1:9443"}}),
        ("admin.address", {"admin": {"address": "127.0.0.1:9444"}}),
        ("http2.engine", {"http2": {"engine": "h2"}}),
        ("overload.reservedPercent", {"overload": {"reservedPercent": 20}}),
        ("overload.retryAfter", {"overload": {"retryAfter": {"minSeconds": 2, "maxSeconds": 9}}}),
    ]
    return cases


@pytest.mark.parametrize(("key", "fragment"), _every_key_and_a_change(), ids=lambda c: str(c)[:60])
def test_every_schema_key_change_is_named_in_the_reload_log(key, fragment):
    """Issue: turning accessLog.enabled on and adding debug.answeredByHeader took effect
    but the reload log said "no changes". Each key's change is named by its YAML path."""
    import yaml

    from kom_gateway.config.diff import describe_changes

    base = {"groups": {"default": {"endpoints": ["https://10.0.0.1:6443"]}}}
    before = load_config_text(yaml.safe_dump(base))
    after = load_config_text(yaml.safe_dump({**base, **fragment}))
    lines = describe_changes(before, after)
    assert lines != ["no changes"]
    if key.startswith("overload.") and key.count(".") == 1 and key != "overload.reservedPercent" \
            and key != "overload.retryAfter":  # a default for every group: named per group
        key = key.replace("overload.", "overload.groups.default.")
    assert any(line.startswith((f"{key}:", f"{key} ")) for line in lines), lines


def test_the_reload_log_names_every_section_of_the_config():
    import dataclasses

    from kom_gateway.config.diff import YAML_SECTIONS
    from kom_gateway.config.model import Config

    fields = {f.name for f in dataclasses.fields(Config)} - {"warnings", "source"}
    assert set(YAML_SECTIONS) == fields
