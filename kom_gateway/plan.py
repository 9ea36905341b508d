"""`kom-gateway plan`: what a cut-over would move, from observed traffic (pure).

From the gateway's access log (its JSON lines), per program (User-Agent product) and home
group: requests/s by verb, watches opened/s, and for candidate percents how much of that
a rule `userAgent: "<program>/*"` would move off default. The same per-client buckets the
gateway uses decide which clients move, so the estimate is what would happen, not an
average. With a routing config, also the kube-apiserver flags that make each group's
watch cache match its claims.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from kom_gateway.config.model import Config
from kom_gateway.routing.cutover import bucket_of, user_agent_product
from kom_gateway.routing.router import DEFAULT_GROUP

PERCENTS = (1, 5, 25, 50, 100)
# What every apiserver of a cluster watches for itself whatever its group claims (the Node
# authorizer's graph, admission, the service IP and node port allocators): a group that
# does not cache these still lists them from etcd.
ALWAYS_NEEDED = (
    "pods",
    "nodes",
    "persistentvolumes",
    "persistentvolumeclaims",
    "secrets",
    "configmaps",
    "serviceaccounts",
    "services",
    "namespaces",
    "volumeattachments.storage.k8s.io",
)


NOT_WATCHED = frozenset({"bindings", "tokenreviews", "subjectaccessreviews"})  # no watch cache


class Traffic(NamedTuple):
    program: str
    home_group: str
    seconds: float
    by_verb: dict[str, int]
    watches: int
    moves: dict[int, tuple[int, int]]  # percent -> (requests, watches) that would move

    @property
    def requests(self) -> int:
        return sum(self.by_verb.values())

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "program": self.program,
            "homeGroup": self.home_group,
            "requestsPerSecond": round(self.rate(self.requests), 3),
            "watchesPerSecond": round(self.rate(self.watches), 3),
            "byVerb": {v: round(self.rate(n), 3) for v, n in sorted(self.by_verb.items())},
            "wouldMove": {
                f"{p}%": {
                    "requestsPerSecond": round(self.rate(r), 3),
                    "watchesPerSecond": round(self.rate(w), 3),
                }
                for p, (r, w) in sorted(self.moves.items())
            },
        }


def read_access_log(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """The records of an access log, and how many lines were not records."""
    records, skipped = [], 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and "homeGroup" in record and "verb" in record:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _seconds(records: list[dict[str, Any]]) -> float:
    times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
             for r in records if r.get("time")]  # fmt: skip
    return max(times) - min(times) if len(times) > 1 else 0.0


def plan(records: list[dict[str, Any]], percents: Iterable[int] = PERCENTS) -> list[Traffic]:
    """Per (program, home group) traffic and what each percent would move off default:
    requests of its clients whose bucket is under the percent and that default answers
    today (those already cut over are not counted again)."""
    seconds = _seconds(records)
    verbs: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    watches: Counter[tuple[str, str]] = Counter()
    # (program, home) -> client key -> (requests, watches) still on default
    on_default: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    watches_on_default: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in records:
        home = r.get("homeGroup") or DEFAULT_GROUP
        key = (user_agent_product(r.get("userAgent") or ""), home)
        verbs[key][r["verb"]] += 1
        if r["verb"] == "watch":
            watches[key] += 1
        if home != DEFAULT_GROUP and r.get("chosenGroup") == DEFAULT_GROUP:
            on_default[key][r.get("client", "")] += 1
            if r["verb"] == "watch":
                watches_on_default[key][r.get("client", "")] += 1
    out = []
    for key in sorted(verbs, key=lambda k: -sum(verbs[k].values())):
        moves = {}
        for percent in percents:
            moved = [c for c in on_default[key] if bucket_of(c) < percent]
            moves[percent] = (
                sum(on_default[key][c] for c in moved),
                sum(watches_on_default[key][c] for c in moved),
            )
        out.append(Traffic(key[0], key[1], seconds, dict(verbs[key]), watches[key], moves))
    return out


def render_plan(traffic: list[Traffic], skipped: int = 0) -> str:
    """The table `kom-gateway plan` prints."""
    percents = sorted(traffic[0].moves) if traffic else list(PERCENTS)
    head = ["program", "home group", "req/s", "watches/s", "top verbs"]
    head += [f"moves at {p}%" for p in percents]
    rows = [head]
    for t in traffic:
        top = ", ".join(f"{v} {t.rate(n):.1f}" for v, n in Counter(t.by_verb).most_common(3))
        moves = [
            "-" if t.home_group == DEFAULT_GROUP else f"{t.rate(r):.1f} req/s, {t.rate(w):.2f} w/s"
            for r, w in (t.moves[p] for p in percents)
        ]
        rows.append([t.program or "(none)", t.home_group, f"{t.rate(t.requests):.1f}",
                     f"{t.rate(t.watches):.2f}", top, *moves])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    if traffic:
        lines.append(
            f"\nover {traffic[0].seconds:.0f} s of access log; 'moves' is what a rule "
            '`userAgent: "<program>/*"` at that percent would take off default'
        )
    if skipped:
        lines.append(f"({skipped} lines were not access-log records)")
    return "\n".join(lines)


class ApiserverFlags(NamedTuple):
    flags: list[str]
    uncached: list[str]  # resources every apiserver needs that this group does not cache


def apiserver_flags(config: Config) -> dict[str, ApiserverFlags]:
    """Per group, the kube-apiserver flags that make its watch cache match its claims:
    default caches everything (kube-apiserver's own default); another group caches what it
    claims and nothing else, and is told what it will then list from etcd for itself."""
    out: dict[str, ApiserverFlags] = {}
    for name, group in config.groups.items():
        if name == DEFAULT_GROUP:
            out[name] = ApiserverFlags([], [])
            continue
        cached: list[str] = []
        for claim in group.resources:
            resource = claim.resource + (f".{claim.api_group}" if claim.api_group else "")
            if claim.subresource or claim.resource in NOT_WATCHED or claim.resource == "*":
                continue  # subresources share their resource's cache
            if resource not in cached:
                cached.append(resource)
        flags = ["--default-watch-cache-size=0"]
        if cached:
            flags.append("--watch-cache-sizes=" + ",".join(f"{r}#1000" for r in cached))
        out[name] = ApiserverFlags(flags, [r for r in ALWAYS_NEEDED if r not in cached])
    return out


def render_apiserver_flags(flags: dict[str, ApiserverFlags]) -> str:
    lines = []
    for name, f in flags.items():
        shown = " ".join(f.flags) or "(kube-apiserver's defaults: every resource cached)"
        lines.append(f"{name}: {shown}")
        if f.uncached:
            lines.append(
                f"  warning: this group's apiservers still watch {', '.join(f.uncached)} for "
                "themselves (Node authorizer, admission, allocators) and list them from etcd "
                "at start: cache the ones that are large in your cluster too"
            )
    return "\n".join(lines)
