"""The routing YAML's schema and validation: YAML in, a `model.Config` out.

Every problem is collected (not just the first) and names its YAML path and line, so an
operator fixes a broken file in one pass. Validation is pure: file paths in the config
are resolved but not opened here; the data plane reports unreadable files when it loads
them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from kom_gateway.config.keys import (
    ACCESS_LOG_KEYS,
    GOAWAY_KEYS,
    HEALTH_KEYS,
    HTTP2_DOWNSTREAM_KEYS,
    HTTP2_UPSTREAM_KEYS,
    LIMIT_KEYS,
    TIMEOUT_KEYS,
    Field,
)
from kom_gateway.config.model import (
    DEFAULT_ADMIN,
    DEFAULT_LISTEN,
    DEFAULT_SESSION_TICKETS,
    MAX_SESSION_TICKETS,
    AccessLogSettings,
    Address,
    Config,
    ConfigError,
    ConfigIssue,
    Endpoint,
    Group,
    Health,
    Http2Downstream,
    Http2Upstream,
    Limits,
    ServerTLS,
    Timeouts,
    UpstreamTLS,
)
from kom_gateway.config.overload_schema import OverloadSections
from kom_gateway.config.yamldoc import YamlDocument, YamlPath, kind_of
from kom_gateway.http.settings import HTTP2_ENGINES
from kom_gateway.overload.load import GoawayPolicy
from kom_gateway.routing.claims import ResourceClaim, parse_claim
from kom_gateway.routing.cutover import (
    SHADOW_MAX_PER_SECOND,
    SHADOW_PERCENT,
    CutoverRule,
    Match,
    ShadowSpec,
)
from kom_gateway.routing.glob import Glob
from kom_gateway.routing.router import DEFAULT_GROUP

_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "connection", "transfer-encoding"})
_TLS_PORTS = frozenset({443, 6443, 8443})  # kube-apiserver's, and the chart's


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


_GROUP_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def build_config(doc: YamlDocument, source: str = "", base_dir: str = ".") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    return _Builder(doc, base_dir).build(source)


def format_path(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Builder(OverloadSections):
    def __init__(self, doc: YamlDocument, base_dir: str) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    # -- reporting -------------------------------------------------------------------
    def _issue(self, path: YamlPath, message: str) -> ConfigIssue:
        line = 0
        for depth in range(len(path), -1, -1):  # nearest ancestor with a known line
            line = self.doc.lines.get(path[:depth], 0)
            if line:
                break
        return ConfigIssue(format_path(path), line, message)

    def error(self, path: YamlPath, message: str) -> None:
        self.errors.append(self._issue(path, message))

    def warn(self, path: YamlPath, message: str) -> None:
        self.warnings.append(self._issue(path, message))

    # -- typed accessors -------------------------------------------------------------
    def mapping(
        self,
        value: Any,
        path: YamlPath,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, Any] | None:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {kind_of(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error((*path, key), f"unknown key (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.error(path, f"missing required key {key!r}")
        return value

    def string(self, value: Any, path: YamlPath) -> str | None:
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {kind_of(value)}")
            return None
        if not value:
            self.error(path, "must not be empty")
            return None
        return value

    def string_list(self, value: Any, path: YamlPath) -> list[tuple[YamlPath, str]]:
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {kind_of(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            text = self.string(item, (*path, i))
            if text is not None:
                out.append(((*path, i), text))
        return out

    def file_path(self, value: Any, path: YamlPath) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        return os.path.abspath(os.path.join(self.base_dir, text))

    def number(
        self,
        section: dict[str, Any],
        path: YamlPath,
        key: str,
        default: float,
        whole: bool = False,
        zero: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        """A positive number (a positive integer when `whole`; 0 too when `zero`), within
        [minimum, maximum] unless 0, or the default."""
        value = section.get(key)
        if value is None:
            return default
        kind = "a positive whole number" if whole else "a positive number"
        if zero:
            kind += " or 0 (off)"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (whole and not isinstance(value, int))
        ):
            self.error((*path, key), f"must be {kind}, got {kind_of(value)}")
            return default
        if not (math.isfinite(value) and (value > 0 or (zero and value == 0))):
            self.error((*path, key), f"must be {kind}, got {value}")
            return default
        if value != 0 and (
            (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
        ):
            if minimum is not None and maximum is not None:
                bounds = f"from {_plain(minimum)} to {_plain(maximum)}"
            elif minimum is not None:
                bounds = f"at least {_plain(minimum)}"
            else:
                bounds = f"at most {_plain(maximum)}"
            self.error((*path, key), f"must be {bounds}, got {value}")
            return default
        return value

    def fields(self, value: Any, path: YamlPath, table: dict[str, Field], cls: type) -> Any:
        """An instance of dataclass `cls` from the numeric keys of `table` (defaults for
        the keys not given)."""
        section = self.mapping(value, path, tuple(table)) or {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values: dict[str, float] = {}
        for key, f in table.items():
            got = self.number(
                section, path, key, defaults[f.attr], f.whole, f.zero, f.minimum, f.maximum
            )
            values[f.attr] = int(got) if f.whole else got
        return cls(**values)

    def address(self, value: Any, path: YamlPath, default: Address) -> Address:
        text = None if value is None else self.string(value, path)
        if text is None:
            return default
        try:
            return _parse_address(text)
        except ValueError as exc:
            self.error(path, str(exc))
            return default

    # -- sections --------------------------------------------------------------------
    def build(self, source: str) -> Config:
        top = self.mapping(
            self.doc.data,
            (),
            (
                "listen",
                "admin",
                "upstream",
                "groups",
                "cutover",
                "timeouts",
                "health",
                "limits",
                "http2",
                "overload",
                "goaway",
                "accessLog",
                "debug",
            ),
            ("groups",),
        )
        if top is None:
            raise ConfigError(self.errors, source)
        listen, listen_tls = self.listen(top.get("listen"))
        if listen_tls is None and listen.port in _TLS_PORTS and not _loopback(listen.host):
            self.warn(
                ("listen", "address"),
                f"port {listen.port} usually means TLS, but listen.tls is not set: clients "
                "get plaintext HTTP/2 (h2c), and those that expect TLS fail",
            )
        admin_section = self.mapping(top.get("admin"), ("admin",), ("address",)) or {}
        admin = self.address(admin_section.get("address"), ("admin", "address"), DEFAULT_ADMIN)
        upstream_tls = self.upstream(top.get("upstream"))
        groups = self.groups(top.get("groups"))
        rules = self.cutover(top.get("cutover"), groups) if groups is not None else ()
        timeouts = self.fields(top.get("timeouts"), ("timeouts",), TIMEOUT_KEYS, Timeouts)
        health = self.fields(top.get("health"), ("health",), HEALTH_KEYS, Health)
        if health.max_ejection < health.base_ejection:
            self.error(
                ("health", "maxEjectionSeconds"),
                f"must be at least baseEjectionSeconds ({health.base_ejection:g})",
            )
        limits = self.fields(top.get("limits"), ("limits",), LIMIT_KEYS, Limits)
        h2 = self.mapping(top.get("http2"), ("http2",), ("engine", "downstream", "upstream")) or {}
        http2_engine = h2.get("engine", "auto")
        if http2_engine not in HTTP2_ENGINES:
            self.error(
                ("http2", "engine"),
                f"must be one of {', '.join(HTTP2_ENGINES)}, got {http2_engine!r}",
            )
        http2_downstream = self.fields(
            h2.get("downstream"), ("http2", "downstream"), HTTP2_DOWNSTREAM_KEYS, Http2Downstream
        )
        http2_upstream = self.fields(
            h2.get("upstream"), ("http2", "upstream"), HTTP2_UPSTREAM_KEYS, Http2Upstream
        )
        overload = self.overload(top.get("overload"), groups or {})
        goaway = self.goaway(top.get("goaway"))
        access_log = self.access_log(top.get("accessLog"))
        answered_by_header = self.debug(top.get("debug"))
        if self.errors:
            raise ConfigError(self.errors, source)
        assert groups is not None
        return Config(
            groups=groups,
            cutover=rules,
            listen=listen,
            listen_tls=listen_tls,
            admin=admin,
            upstream_tls=upstream_tls,
            timeouts=timeouts,
            health=health,
            limits=limits,
            http2_downstream=http2_downstream,
            http2_upstream=http2_upstream,
            http2_engine=http2_engine,
            overload=overload,
            goaway=goaway,
            access_log=access_log,
            answered_by_header=answered_by_header,
            warnings=tuple(self.warnings),
            source=source,
        )

    def goaway(self, value: Any) -> GoawayPolicy:
        path: YamlPath = ("goaway",)
        policy = self.fields(value, path, GOAWAY_KEYS, GoawayPolicy)
        if policy.chance > policy.max_chance:
            self.error(path, f"chance ({policy.chance}) is above maxChance ({policy.max_chance})")
        if policy.max_chance > 0.02:
            self.warn(
                (*path, "maxChance"),
                "above 0.02, kube-apiserver's own cap for --goaway-chance: clients reconnect "
                "very often",
            )
        return policy

    def access_log(self, value: Any) -> AccessLogSettings:
        path: YamlPath = ("accessLog",)
        a = self.mapping(value, path, tuple(ACCESS_LOG_KEYS)) or {}
        flags = {}
        for key in ("enabled", "alwaysLogErrors"):
            flag = a.get(key, key == "alwaysLogErrors")
            if not isinstance(flag, bool):
                self.error((*path, key), f"must be true or false, got {kind_of(flag)}")
            flags[key] = flag is True
        file = "-"
        if a.get("path") not in (None, "-"):
            file = self.file_path(a["path"], (*path, "path")) or "-"
        rate = self.number(a, path, "sampleRate", 1.0, zero=True, maximum=1.0)
        return AccessLogSettings(flags["enabled"], file, rate, flags["alwaysLogErrors"])

    def debug(self, value: Any) -> str:
        """`debug.answeredByHeader`: a response header naming who answered (off: "")."""
        d = self.mapping(value, ("debug",), ("answeredByHeader",)) or {}
        if d.get("answeredByHeader") is None:
            return ""
        path: YamlPath = ("debug", "answeredByHeader")
        name = self.string(d["answeredByHeader"], path)
        if name is None:
            return ""
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            self.error(path, f"{name!r} is not a header name the gateway may set: X-Kom-Group")
            return ""
        return name.lower()

    def listen(self, value: Any) -> tuple[Address, ServerTLS | None]:
        section = self.mapping(value, ("listen",), ("address", "tls")) or {}
        address = self.address(section.get("address"), ("listen", "address"), DEFAULT_LISTEN)
        tls = None
        if section.get("tls") is not None:
            path: YamlPath = ("listen", "tls")
            t = self.mapping(
                section["tls"],
                path,
                ("certFile", "keyFile", "clientCAFile", "sessionTickets"),
                ("certFile", "keyFile"),
            )
            if t is not None and "certFile" in t and "keyFile" in t:
                cert = self.file_path(t["certFile"], (*path, "certFile"))
                key = self.file_path(t["keyFile"], (*path, "keyFile"))
                ca = None
                if t.get("clientCAFile") is not None:
                    ca = self.file_path(t["clientCAFile"], (*path, "clientCAFile"))
                tickets = self.number(
                    t,
                    path,
                    "sessionTickets",
                    DEFAULT_SESSION_TICKETS,
                    whole=True,
                    zero=True,
                    maximum=MAX_SESSION_TICKETS,
                )
                if cert and key:
                    tls = ServerTLS(cert, key, ca, int(tickets))
        return address, tls

    def upstream(self, value: Any) -> UpstreamTLS:
        section = self.mapping(value, ("upstream",), ("tls",)) or {}
        path: YamlPath = ("upstream", "tls")
        t = self.mapping(section.get("tls"), path, ("caFile", "certFile", "keyFile", "serverName"))
        if not t:
            return UpstreamTLS()
        files = {
            key: self.file_path(t[key], (*path, key))
            for key in ("caFile", "certFile", "keyFile")
            if t.get(key) is not None
        }
        if ("certFile" in t) != ("keyFile" in t):
            self.error(path, "certFile and keyFile go together (the front-proxy client cert)")
        server_name = (
            self.string(t["serverName"], (*path, "serverName")) if "serverName" in t else None
        )
        return UpstreamTLS(
            files.get("caFile"), files.get("certFile"), files.get("keyFile"), server_name
        )

    def groups(self, value: Any) -> dict[str, Group] | None:
        if not isinstance(value, dict) or not value:
            self.error(
                ("groups",), f"must be a non-empty mapping of group names, got {kind_of(value)}"
            )
            return None
        groups: dict[str, Group] = {}
        claimed_at: dict[ResourceClaim, tuple[str, YamlPath]] = {}
        for name, spec in value.items():
            path: YamlPath = ("groups", name)
            if not _GROUP_NAME.match(name):
                self.error(path, "group names are lower-case DNS labels (a-z, 0-9, '-')")
            g = self.mapping(spec, path, ("endpoints", "resources"), ("endpoints",))
            if g is None:
                continue
            endpoints = []
            if "endpoints" in g:
                items = self.string_list(g["endpoints"], (*path, "endpoints"))
                if not items and isinstance(g["endpoints"], list):
                    self.error((*path, "endpoints"), "needs at least one endpoint")
                for item_path, text in items:
                    try:
                        endpoints.append(_parse_endpoint(text))
                    except ValueError as exc:
                        self.error(item_path, str(exc))
            claims = []
            for item_path, text in self.string_list(g.get("resources", []), (*path, "resources")):
                try:
                    claim = parse_claim(text)
                except ValueError as exc:
                    self.error(item_path, str(exc))
                    continue
                if claim in claimed_at:
                    other, other_path = claimed_at[claim]
                    where = "earlier in this group" if other == name else f"by group {other!r}"
                    line = self._issue(other_path, "").line
                    self.error(
                        item_path,
                        f"{claim} is already claimed {where} ({format_path(other_path)}, "
                        f"line {line}); a resource belongs to one group",
                    )
                    continue
                claimed_at[claim] = (name, item_path)
                claims.append(claim)
            if name != DEFAULT_GROUP and not claims:
                self.warn(path, "claims no resources, so it never receives traffic")
            groups[name] = Group(name, tuple(endpoints), tuple(claims))
        if DEFAULT_GROUP not in value:
            self.error(("groups",), "a 'default' group is required: it serves everything unclaimed")
        return groups

    def cutover(self, value: Any, groups: Mapping[str, Group]) -> tuple[CutoverRule, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error(("cutover",), f"must be a list of rules, got {kind_of(value)}")
            return ()
        rules: list[CutoverRule] = []
        seen: dict[Match, int] = {}
        for index, item in enumerate(value):
            path: YamlPath = ("cutover", index)
            r = self.mapping(item, path, ("match", "percent", "shadow"))
            if r is None:
                continue
            match = self.match(r.get("match"), (*path, "match"))
            percent = self.percent(r.get("percent"), (*path, "percent"), groups)
            shadow = self.shadow(r.get("shadow"), (*path, "shadow"), groups, percent)
            if match is None or percent is None or shadow is False:
                continue
            if match in seen:
                self.warn(
                    (*path, "match"),
                    f"same match as cutover[{seen[match]}]; this rule is never used "
                    "(first match wins)",
                )
            else:
                seen[match] = index
            line = self.doc.lines.get(path, 0)
            rules.append(CutoverRule(index, match, percent, line, shadow or None))
        return tuple(rules)

    def shadow(
        self,
        value: Any,
        path: YamlPath,
        groups: Mapping[str, Group],
        percent: dict[str, float] | None,
    ) -> ShadowSpec | bool | None:
        """The rule's `shadow` (docs/configuration.md#shadow); False when it is wrong."""
        if value is None:
            return None
        s = self.mapping(value, path, ("group", "percent", "maxPerSecond"))
        if s is None:
            return False
        group = self.string(s.get("group"), (*path, "group"))
        if group is None:
            return False
        if group == DEFAULT_GROUP or group not in groups:
            known = ", ".join(g for g in groups if g != DEFAULT_GROUP) or "none"
            self.error(
                (*path, "group"),
                f"must name the candidate group, one other than default (groups: {known}), "
                f"got {group!r}",
            )
            return False
        if not groups[group].resources:
            self.warn((*path, "group"), f"group {group!r} claims no resources: nothing to shadow")
        if percent is not None and percent.get(group, 0.0) >= 100:
            self.warn(
                (*path, "group"),
                f"the rule moves all its clients to {group!r}: none of their reads stay on "
                "default to shadow",
            )
        share = self.number(s, path, "percent", SHADOW_PERCENT, maximum=100)
        rate = self.number(s, path, "maxPerSecond", SHADOW_MAX_PER_SECOND)
        return ShadowSpec(group, float(share), float(rate))

    def match(self, value: Any, path: YamlPath) -> Match | None:
        m = self.mapping(value, path, ("userAgent", "user", "userGroup"))
        if m is None:
            return None
        globs: dict[str, Glob] = {}
        ok = True
        for key in ("userAgent", "user", "userGroup"):
            if m.get(key) is None:
                continue
            text = self.string(m[key], (*path, key))
            if text is None:
                ok = False
                continue
            try:
                globs[key] = Glob(text)
            except ValueError as exc:
                self.error((*path, key), f"bad glob {text!r}: {exc}")
                ok = False
        if not ok:
            return None
        return Match(globs.get("userAgent"), globs.get("user"), globs.get("userGroup"))

    def percent(
        self, value: Any, path: YamlPath, groups: Mapping[str, Group]
    ) -> dict[str, float] | None:
        if value is None:
            return {}  # a rule without percent pins its clients to default
        if not isinstance(value, dict):
            self.error(path, f"must map group names to percents, got {kind_of(value)}")
            return None
        out: dict[str, float] = {}
        for group, amount in value.items():
            item_path = (*path, group)
            if group == DEFAULT_GROUP:
                self.error(
                    item_path,
                    "default gets whatever is not cut over; give percents "
                    "for the other groups only",
                )
            elif group not in groups:
                known = ", ".join(g for g in groups if g != DEFAULT_GROUP) or "none"
                self.error(item_path, f"no group named {group!r} (groups: {known})")
            elif not groups[group].resources:
                self.warn(
                    item_path, f"group {group!r} claims no resources; this percent has no effect"
                )
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                self.error(
                    item_path, f"percent must be a number from 0 to 100, got {kind_of(amount)}"
                )
            elif not (math.isfinite(amount) and 0 <= amount <= 100):
                self.error(item_path, f"percent must be from 0 to 100, got {amount}")
            else:
                out[group] = float(amount)
        return out


def _parse_address(text: str) -> Address:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {text!r} must be host:port, e.g. 127.0.0.1:8443 or [::]:8443")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {text!r}: write IPv6 hosts in brackets, e.g. [::1]:8443")
    return Address(host, _parse_port(port_text, text))


def _parse_port(port_text: str, whole: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {whole!r}: must be 1-65535")
    return int(port_text)


def _parse_endpoint(text: str) -> Endpoint:
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"endpoint {text!r} must start with https:// (or http:// for h2c)")
    if not parts.hostname:
        raise ValueError(f"endpoint {text!r} has no host")
    if parts.username or parts.password:
        raise ValueError(f"endpoint {text!r}: credentials do not belong in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"endpoint {text!r}: give scheme://host:port only, no path")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in endpoint {text!r}: must be 1-65535") from None
    if port == 0:
        raise ValueError(f"bad port in endpoint {text!r}: must be 1-65535")
    return Endpoint(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def _plain(number: float | None) -> str:
    return str(int(number)) if number is not None and float(number).is_integer() else f"{number}"
