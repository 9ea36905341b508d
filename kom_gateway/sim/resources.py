"""The resource types the simulator serves, and the discovery documents describing them."""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    resource: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()  # empty: the usual eight (VERBS)
    # (group, resource) whose storage it shares, as kube-apiserver serves
    # events.k8s.io/v1 Events from the core Events' storage (converted both ways)
    stored_as: tuple[str, str] | None = None

    @property
    def storage(self) -> tuple[str, str]:
        return self.stored_as or (self.group, self.resource)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "pods", "Pod", True, ("po",), ("status", "log", "exec", "binding")),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    ResourceType("", "v1", "secrets", "Secret", True),
    ResourceType("", "v1", "nodes", "Node", False, ("no",), ("status",)),
    ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",), ("status", "finalize")),
    ResourceType("", "v1", "events", "Event", True, ("ev",)),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, ("ev",), stored_as=("", "events")),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status", "scale")),
    # `kubectl auth whoami`: answers with the user the request authenticated as
    ResourceType(
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "SelfSubjectReview",
        False,
        verbs=("create",),
    ),
)

BY_GROUP_RESOURCE = {(t.group, t.resource): t for t in TYPES}

# events.k8s.io/v1 Event field <- core/v1 Event field (kube-apiserver's conversion)
_EVENT_FIELDS = (
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("reportingInstance", "reportingInstance"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("eventTime", "eventTime"),
    ("series", "series"),
    ("action", "action"),
    ("reason", "reason"),
    ("related", "related"),
    ("type", "type"),
)


def to_storage(rt: ResourceType, obj: dict) -> dict:
    """An object of `rt` as its storage keeps it (itself, unless `rt` shares another's)."""
    if rt.stored_as is None:
        return obj
    stored = BY_GROUP_RESOURCE[rt.stored_as]
    out = {
        "apiVersion": stored.api_version,
        "kind": stored.kind,
        "metadata": obj.get("metadata", {}),
    }
    for ours, theirs in _EVENT_FIELDS:
        if ours in obj:
            out[theirs] = obj[ours]
    return out


def from_storage(rt: ResourceType, obj: dict) -> dict:
    """A stored object as `rt` shows it (a converted copy when `rt` shares a storage)."""
    if rt.stored_as is None:
        return obj
    out = {"apiVersion": rt.api_version, "kind": rt.kind,
           "metadata": copy.deepcopy(obj.get("metadata", {}))}  # fmt: skip
    for ours, theirs in _EVENT_FIELDS:
        if theirs in obj:
            out[ours] = obj[theirs]
    return out


GROUP_VERSIONS = {t.group: t.version for t in TYPES}


def api_versions() -> dict:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}


def api_group_list() -> dict:
    groups = []
    for group in sorted({t.group for t in TYPES if t.group}):
        gv = {"groupVersion": f"{group}/{GROUP_VERSIONS[group]}", "version": GROUP_VERSIONS[group]}
        groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_resource_list(group: str, version: str) -> dict | None:
    types = [t for t in TYPES if t.group == group and t.version == version]
    if not types:
        return None
    resources = []
    for t in types:
        resources.append(
            {
                "name": t.resource,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": list(t.verbs) or VERBS,
                "shortNames": list(t.short_names),
            }
        )
        for sub in t.subresources:
            verbs = {"log": ["get"], "exec": ["create", "get"], "binding": ["create"]}.get(
                sub, ["get", "patch", "update"]
            )
            kind = {
                "log": "Pod",
                "exec": "PodExecOptions",
                "binding": "Binding",
                "scale": "Scale",
            }.get(sub, t.kind)
            resources.append(
                {
                    "name": f"{t.resource}/{sub}",
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
            )
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_root() -> dict:
    """`GET /openapi/v3`: where each group-version's document lives."""
    paths = {}
    for group, version in sorted({(t.group, t.version) for t in TYPES}):
        gv = _gv_path(group, version)
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash=kom-sim"}
    return {"paths": paths}


def openapi_v3_document(gv_path: str) -> dict | None:
    """A group-version's OpenAPI v3 document, enough for kubectl: each kind's PATCH
    operation carries its GVK and the `fieldValidation` query parameter, so kubectl
    leaves validation to the server (as with a real apiserver)."""
    types = [t for t in TYPES if _gv_path(t.group, t.version) == gv_path]
    if not types:
        return None
    field_validation = {
        "name": "fieldValidation",
        "in": "query",
        "schema": {"type": "string"},
        "uniqueItems": True,
    }
    paths = {}
    for t in types:
        if t.verbs and "patch" not in t.verbs:
            continue
        scope = "/namespaces/{namespace}" if t.namespaced else ""
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        paths[f"/{gv_path}{scope}/{t.resource}/{{name}}"] = {
            "patch": {
                "operationId": f"patch{t.kind}",
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [field_validation],
                "responses": {},
            },
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kom-gateway sim)", "version": "v1.31.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }
