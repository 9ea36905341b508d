"""Resource claims (`resource[.group][/subresource]`) and the table that finds a home group.

Claims are written as kube-apiserver's `--watch-cache-sizes` and kubectl write resources:
the core group has no suffix (`pods`), other groups follow a dot
(`leases.coordination.k8s.io`), `*.group` claims a whole API group, and a `/subresource`
suffix claims one subresource. A request's home group is the most specific claim:
`resource/subresource`, then `resource`, then `*.group`; unclaimed means `default`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


class ResourceClaim(NamedTuple):
    """One entry of a group's `resources` list."""

    api_group: str  # "" is the core group
    resource: str  # "*" claims every resource of api_group
    subresource: str = ""  # "" claims the resource and all its subresources

    def __str__(self) -> str:
        text = self.resource + (f".{self.api_group}" if self.api_group else "")
        return f"{text}/{self.subresource}" if self.subresource else text


def parse_claim(text: str) -> ResourceClaim:
    """Parse one claim; ValueError says what is wrong in words an operator understands."""
    if not text:
        raise ValueError("empty resource")
    base, slash, subresource = text.partition("/")
    resource, dot, api_group = base.partition(".")
    if slash and not _LABEL.match(subresource):
        raise ValueError(
            f"bad subresource {subresource!r} in {text!r}: write resource[.group]/subresource, "
            "e.g. pods/log"
        )
    if resource == "*":
        if subresource:
            raise ValueError(f"{text!r}: a whole-group claim (*.group) takes no subresource")
    elif not _LABEL.match(resource):
        hint = f" (did you mean {resource.lower()!r}?)" if _LABEL.match(resource.lower()) else ""
        raise ValueError(
            f"bad resource {resource!r} in {text!r}: resources are lower-case plurals as "
            f"`kubectl api-resources` prints them{hint}"
        )
    if dot and not _SUBDOMAIN.match(api_group):
        raise ValueError(
            f"bad API group {api_group!r} in {text!r}: write resource.group without a version, "
            "e.g. leases.coordination.k8s.io"
        )
    return ResourceClaim(api_group, resource, subresource)


class ClaimTable:
    """Claim -> group lookup, most specific claim first. Built once per config."""

    __slots__ = ("_by_group", "_by_resource", "_by_subresource")

    def __init__(self, claims: Iterable[tuple[ResourceClaim, str]]) -> None:
        self._by_subresource: dict[tuple[str, str, str], str] = {}
        self._by_resource: dict[tuple[str, str], str] = {}
        self._by_group: dict[str, str] = {}
        for claim, group in claims:
            if claim.resource == "*":
                self._by_group[claim.api_group] = group
            elif claim.subresource:
                self._by_subresource[claim] = group  # a ResourceClaim is a 3-tuple
            else:
                self._by_resource[(claim.api_group, claim.resource)] = group

    def lookup(self, api_group: str, resource: str, subresource: str) -> str | None:
        """The claiming group, or None when nothing claims it (so: default)."""
        if subresource and self._by_subresource:
            group = self._by_subresource.get((api_group, resource, subresource))
            if group is not None:
                return group
        group = self._by_resource.get((api_group, resource))
        if group is not None:
            return group
        return self._by_group.get(api_group) if self._by_group else None
