"""The rollout spec: which rule's percent to drive for which group, through which steps,
held how long, judged by which guards, and where the routing config lives.

Parsing is pure and reports every problem at once, each with its key, as `check` does
for the routing config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from kom_gateway.routing.cutover import SHADOW_MAX_PER_SECOND, Match, format_percent
from kom_gateway.routing.glob import Glob
from kom_gateway.routing.router import DEFAULT_GROUP

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MATCH_KEYS = ("userAgent", "user", "userGroup")


class SpecError(Exception):
    """Every problem of a spec, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        return "\n".join(f"{head}{p}" for p in self.problems)


@dataclass(frozen=True)
class FileTarget:
    path: str


@dataclass(frozen=True)
class ConfigMapTarget:
    namespace: str
    name: str
    key: str = "config.yaml"
    kubeconfig: str | None = None  # None: $KUBECONFIG / ~/.kube/config, else in-cluster
    context: str | None = None

    def describe(self) -> str:
        return f"configmap {self.namespace}/{self.name} key {self.key}"


@dataclass(frozen=True)
class Guards:
    gateways: tuple[str, ...] = ()  # admin base URLs, scraped and summed
    prometheus: str | None = None  # a Prometheus base URL, queried with PromQL
    window: float = 120.0
    min_requests: int = 20  # fewer moved requests in a window: hold, never promote
    max_error_ratio: float = 0.01
    max_fallback_ratio: float = 0.01
    max_p99_seconds: float = 1.0


@dataclass(frozen=True)
class ShadowPhase:
    """The optional first phase: shadow reads on, held, judged, before anyone moves."""

    percent: float
    hold: float
    max_mismatch_ratio: float = 0.001  # (mismatches + errors) / compared
    max_p99_seconds: float = 1.0  # the candidate's, on the compared reads
    max_per_second: float = SHADOW_MAX_PER_SECOND


@dataclass(frozen=True)
class RolloutSpec:
    target: FileTarget | ConfigMapTarget
    rule: dict[str, str]  # the cut-over rule's `match`, as written in the routing config
    group: str
    steps: tuple[float, ...]
    hold: float
    guards: Guards
    on_failure: str = "rollback"  # or "pause"
    rollback_to: str = "previous"  # or "0"
    interval: float = 10.0  # seconds between guard readings
    shadow: ShadowPhase | None = None

    @property
    def match(self) -> Match:
        return Match(*(Glob(self.rule[k]) if k in self.rule else None for k in MATCH_KEYS))

    @property
    def label(self) -> str:
        """The rule as the gateway's metrics name it (`CutoverRule.label`)."""
        return self.match.describe()

    def describe(self) -> str:
        steps = ", ".join(format_percent(s) for s in self.steps)
        return f"{self.label} -> {self.group} through [{steps}]"


def parse_duration(value: Any) -> float:
    """`10m`, `90s`, `1h30m`, `500ms` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value.strip()) == "":
        parts = _DURATION_PART.findall(value.strip())
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"{value!r} is not a duration (like 30s, 10m, 1h30m)")
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def load_spec_file(path: str) -> RolloutSpec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(256 * 1024)
    except OSError as exc:
        raise SpecError(path, [f"cannot read: {exc.strerror}"]) from None
    return parse_spec(text, path)


def parse_spec(text: str, source: str = "") -> RolloutSpec:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"not YAML: {exc}"]) from None
    return _SpecBuilder(source).build(doc)


class _SpecBuilder:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def mapping(self, value: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(key, f"must be a mapping, got {type(value).__name__}")
            return {}
        for k in value:
            if k not in known:
                self.error(
                    f"{key}.{k}" if key else str(k), f"unknown key (known: {', '.join(known)})"
                )
        return value

    def duration(self, value: Any, key: str, default: float) -> float:
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def ratio(self, value: Any, key: str, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            self.error(key, f"must be a ratio from 0 to 1 (0.01 is 1%), got {value!r}")
            return default
        return float(value)

    def build(self, doc: Any) -> RolloutSpec:
        top = self.mapping(
            doc,
            "",
            (
                "target",
                "rule",
                "group",
                "steps",
                "hold",
                "interval",
                "guards",
                "onFailure",
                "shadow",
            ),
        )
        if doc is None or not top:
            self.problems.append("empty spec: target, rule, group and steps are required")
            raise SpecError(self.source, self.problems)
        target = self.target(top.get("target"))
        rule = self.rule(top.get("rule"))
        group = top.get("group")
        if not isinstance(group, str) or not group:
            self.error("group", "required: the group the rule moves clients to (e.g. pod)")
            group = ""
        elif group == DEFAULT_GROUP:
            self.error("group", "default is where clients come from; name the group they go to")
        steps = self.steps(top.get("steps"))
        hold = self.duration(top.get("hold"), "hold", 600.0)
        guards = self.guards(top.get("guards"))
        on_failure, to = self.on_failure(top.get("onFailure"))
        interval = self.duration(top.get("interval"), "interval", min(10.0, guards.window / 4))
        if interval > guards.window / 2:
            self.error(
                "interval",
                f"{format_duration(interval)} leaves fewer than 2 readings per guard window "
                f"({format_duration(guards.window)})",
            )
        shadow = self.shadow(top.get("shadow"), guards)
        if self.problems or target is None:
            raise SpecError(self.source, self.problems)
        return RolloutSpec(
            target, rule, group, steps, hold, guards, on_failure, to, interval, shadow
        )

    def shadow(self, value: Any, guards: Guards) -> ShadowPhase | None:
        if value is None:
            return None
        keys = ("percent", "hold", "maxMismatchRatio", "maxP99Seconds", "maxPerSecond")
        s = self.mapping(value, "shadow", keys)
        percent = s.get("percent", 5)
        if (
            isinstance(percent, bool)
            or not isinstance(percent, int | float)
            or not (0 < percent <= 100)
        ):
            self.error(
                "shadow.percent", f"must be a percent above 0 and at most 100, got {percent!r}"
            )
            percent = 5
        numbers = {}
        for key, default in (("maxP99Seconds", guards.max_p99_seconds),
                             ("maxPerSecond", SHADOW_MAX_PER_SECOND)):  # fmt: skip
            v = s.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                self.error(f"shadow.{key}", f"must be a number above 0, got {v!r}")
                v = default
            numbers[key] = float(v)
        return ShadowPhase(
            float(percent),
            self.duration(s.get("hold"), "shadow.hold", 600.0),
            self.ratio(s.get("maxMismatchRatio"), "shadow.maxMismatchRatio", 0.001),
            numbers["maxP99Seconds"],
            numbers["maxPerSecond"],
        )

    def target(self, value: Any) -> FileTarget | ConfigMapTarget | None:
        t = self.mapping(value, "target", ("file", "configMap", "kubeconfig", "context"))
        if ("file" in t) == ("configMap" in t):
            self.error("target", "exactly one of file or configMap is required")
            return None
        if "file" in t:
            if not isinstance(t["file"], str) or not t["file"]:
                self.error("target.file", "must be the path of the routing config")
                return None
            return FileTarget(t["file"])
        cm = self.mapping(t["configMap"], "target.configMap", ("namespace", "name", "key"))
        values = {}
        for k, default in (("namespace", "kube-system"), ("name", None), ("key", "config.yaml")):
            v = cm.get(k, default)
            if not isinstance(v, str) or not v:
                self.error(f"target.configMap.{k}", "required, a string")
                return None
            values[k] = v
        kubeconfig = t.get("kubeconfig")
        if kubeconfig is not None and not isinstance(kubeconfig, str):
            self.error("target.kubeconfig", "must be a path")
            kubeconfig = None
        return ConfigMapTarget(
            values["namespace"],
            values["name"],
            values["key"],
            os.path.expanduser(kubeconfig) if kubeconfig else None,
            t.get("context"),
        )

    def rule(self, value: Any) -> dict[str, str]:
        r = self.mapping(value, "rule", MATCH_KEYS)
        if not r:
            self.error("rule", "required: the cut-over rule's match, e.g. {userAgent: 'kubelet/*'}")
        out = {}
        for k, v in r.items():
            if not isinstance(v, str):
                self.error(f"rule.{k}", "must be a glob string")
                continue
            try:
                Glob(v)
            except ValueError as exc:
                self.error(f"rule.{k}", f"bad glob {v!r}: {exc}")
                continue
            out[k] = v
        return out

    def steps(self, value: Any) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            self.error("steps", "required: the percents to reach in turn, e.g. [1, 5, 25, 50, 100]")
            return ()
        steps: list[float] = []
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 100:
                self.error(f"steps[{i}]", f"must be a percent above 0 and at most 100, got {v!r}")
                continue
            if steps and v <= steps[-1]:
                self.error(f"steps[{i}]", "steps must rise: percent only moves forward along them")
                continue
            steps.append(float(v))
        return tuple(steps)

    def guards(self, value: Any) -> Guards:
        g = self.mapping(
            value,
            "guards",
            (
                "source",
                "window",
                "minRequests",
                "maxErrorRatio",
                "maxFallbackRatio",
                "maxP99Seconds",
            ),
        )
        source = self.mapping(g.get("source"), "guards.source", ("gateways", "prometheus"))
        gateways: tuple[str, ...] = ()
        prometheus = None
        if ("gateways" in source) == ("prometheus" in source):
            self.error("guards.source", "exactly one of gateways or prometheus is required")
        elif "gateways" in source:
            urls = source["gateways"]
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                self.error(
                    "guards.source.gateways", "a list of admin URLs, e.g. [http://10.0.0.5:9090]"
                )
            else:
                gateways = tuple(u.rstrip("/") for u in urls)
        else:
            p = source["prometheus"]
            url = p.get("url") if isinstance(p, dict) else p
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                self.error("guards.source.prometheus", "{url: http://prometheus:9090}")
            else:
                prometheus = url.rstrip("/")
        min_requests = g.get("minRequests", 20)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
            self.error("guards.minRequests", f"must be a whole number, got {min_requests!r}")
            min_requests = 20
        p99 = g.get("maxP99Seconds", 1.0)
        if isinstance(p99, bool) or not isinstance(p99, int | float) or p99 <= 0:
            self.error("guards.maxP99Seconds", f"must be seconds above 0, got {p99!r}")
            p99 = 1.0
        return Guards(
            gateways,
            prometheus,
            self.duration(g.get("window"), "guards.window", 120.0),
            min_requests,
            self.ratio(g.get("maxErrorRatio"), "guards.maxErrorRatio", 0.01),
            self.ratio(g.get("maxFallbackRatio"), "guards.maxFallbackRatio", 0.01),
            float(p99),
        )

    def on_failure(self, value: Any) -> tuple[str, str]:
        if value is None:
            return "rollback", "previous"
        if isinstance(value, str):
            value = {"action": value}
        f = self.mapping(value, "onFailure", ("action", "to"))
        action = f.get("action", "rollback")
        if action not in ("rollback", "pause"):
            self.error("onFailure", f"rollback or pause, got {action!r}")
            action = "rollback"
        to = f.get("to", "previous")
        if to not in ("previous", 0):
            self.error("onFailure.to", f"previous (the step before) or 0, got {to!r}")
            to = "previous"
        if action == "pause" and "to" in f:
            self.error("onFailure.to", "only with action: rollback")
        return action, str(to)
