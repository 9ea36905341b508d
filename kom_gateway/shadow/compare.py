"""Asking a candidate group exactly what default answered, and judging its answer (pure).

The groups share one etcd, so a correct group answers a read as default did at the same
point of etcd history. A LIST is asked again at default's resourceVersion with
`resourceVersionMatch=Exact` (a continued page's token already pins it); a GET at
default's object resourceVersion ("not older than"), so the candidate may only answer
the same version or a newer one (the object changed in between: nothing to compare).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

from kom_gateway.shadow.summary import Summary

MATCH = "match"
MISMATCH = "mismatch"
ERROR = "error"
SKIPPED = "skipped"
RESULTS = (MATCH, MISMATCH, ERROR, SKIPPED)

# why a candidate's answer differs (the `reason` of a mismatch)
STATUS = "status"  # another status code
MISSING = "missing"  # objects default has and the candidate has not
EXTRA = "extra"  # objects the candidate has and default has not
CONTENT = "content"  # the same objects, different versions or bytes
TOO_OLD = "too-old"  # the candidate answered from before default's resourceVersion
MISMATCH_REASONS = (STATUS, MISSING, EXTRA, CONTENT, TOO_OLD)

_RV_PARAMS = ("resourceVersion=", "resourceVersionMatch=")


class Verdict(NamedTuple):
    result: str  # one of RESULTS
    reason: str  # a mismatch's reason, an error's or a skip's cause; "" for a match


def candidate_target(target: str, verb: str, default: Summary) -> str | Verdict:
    """The candidate's request target for what default answered; a skip when no exact
    question exists (a body whose resourceVersion cannot be read: another encoding)."""
    if default.status != 200:
        return target  # the same question: its status must be the same
    if not default.encoding:
        return Verdict(SKIPPED, "encoding")
    if default.unreadable or not default.resource_version:
        return Verdict(SKIPPED, "no-resource-version")
    path, _, query = target.partition("?")
    params = [p for p in query.split("&") if p]
    if verb == "list" and any(p.startswith("continue=") for p in params):
        return target
    kept = [p for p in params if not p.startswith(_RV_PARAMS)]
    kept.append(f"resourceVersion={quote(default.resource_version, safe='')}")
    if verb == "list":
        kept.append("resourceVersionMatch=Exact")
    return f"{path}?{'&'.join(kept)}"


def _newer(a: str, b: str) -> int | None:
    """-1, 0, 1 as resourceVersion a is older, equal, newer than b (etcd revisions are
    integers); None when they are not numbers and differ."""
    if a == b:
        return 0
    if a.isdigit() and b.isdigit():
        return -1 if int(a) < int(b) else 1
    return None


def judge(verb: str, default: Summary, candidate: Summary) -> Verdict:
    """The candidate's answer against default's, for a read asked as `candidate_target`."""
    d, c = default, candidate
    if c.too_large_rv:
        return Verdict(MISMATCH, TOO_OLD)  # it has not seen default's resourceVersion yet
    if c.status == 410 and d.status == 200:
        return Verdict(SKIPPED, "compacted")  # etcd compacted it in between
    if c.status == 429:
        return Verdict(ERROR, "throttled")
    if c.status >= 500:
        return Verdict(ERROR, "5xx")
    if c.status != d.status:
        if verb == "get" and d.status == 200 and c.status == 404:
            return Verdict(MISMATCH, MISSING)
        if verb == "get" and d.status == 404 and c.status == 200:
            return Verdict(MISMATCH, EXTRA)
        return Verdict(MISMATCH, STATUS)
    if d.status != 200:
        return Verdict(MATCH, "")
    if c.encoding != d.encoding or c.unreadable:
        return Verdict(MISMATCH, CONTENT)
    order = _newer(c.resource_version, d.resource_version)
    if order is None:
        return Verdict(MISMATCH, CONTENT)
    if order < 0:
        return Verdict(MISMATCH, TOO_OLD)
    if verb == "get":
        if order > 0:
            return Verdict(MATCH, "")  # changed since default read it
        if c.uid != d.uid or c.body_digest != d.body_digest:
            return Verdict(MISMATCH, CONTENT)
        return Verdict(MATCH, "")
    if order > 0:
        return Verdict(MISMATCH, CONTENT)  # asked Exact, answered another point in history
    if c.items < d.items:
        return Verdict(MISMATCH, MISSING)
    if c.items > d.items:
        return Verdict(MISMATCH, EXTRA)
    if c.item_keys != d.item_keys:
        return Verdict(MISMATCH, MISSING)  # as many items, not the same ones
    if c.item_versions != d.item_versions or c.body_digest != d.body_digest:
        return Verdict(MISMATCH, CONTENT)
    return Verdict(MATCH, "")
