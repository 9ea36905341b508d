"""Request -> reply logic of a simulated apiserver group (no sockets).

Uses the gateway's own RequestInfo resolver, so the simulator and the gateway agree on
what every path means, exactly as kube-apiserver does.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import yaml

from kom_gateway.kube.requestinfo import RequestInfo, parse_request
from kom_gateway.kube.status import status_body
from kom_gateway.sim import resources
from kom_gateway.sim.auth import ANONYMOUS, UNAUTHENTICATED, UserInfo
from kom_gateway.sim.faults import Faults
from kom_gateway.sim.resources import ResourceType
from kom_gateway.sim.selectors import SelectorError, field_predicate, label_predicate
from kom_gateway.sim.store import ApiError, Obj, Store, not_found

JSON = "application/json"
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kom-sim",
    "gitCommit": "sim",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.22",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass
class SimRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names, first value
    body: bytes = b""
    remote_groups: list[str] = field(default_factory=list)  # every X-Remote-Group value
    user: UserInfo | None = None  # who the request authenticated as


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class WatchReply:
    rt: ResourceType
    namespace: str
    since_rv: int | None
    predicate: Any
    bookmarks: bool
    timeout: float | None
    as_table: bool
    send_initial_events: bool


@dataclass
class LogReply:
    pod: Obj
    follow: bool


@dataclass
class ExecReply:
    command: list[str]
    stdin: bool


PROBES = frozenset({"/healthz", "/livez", "/readyz"})


def is_probe(info: RequestInfo) -> bool:
    """A health probe, which kube-apiserver's APF exempts (the `probes` flow schema)."""
    return info.path.rstrip("/") in PROBES


def status_reply(code: int, reason: str, message: str, details: dict | None = None) -> Reply:
    return Reply(code, status_body(code, reason, message, details))


def _json(obj: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(obj).encode())


NO_FAULTS = Faults()


class SimAPI:
    def __init__(self, store: Store, bookmark_interval: float = 1.0) -> None:
        self.store = store
        self.bookmark_interval = bookmark_interval

    def handle(
        self, req: SimRequest, info: RequestInfo | None = None, faults: Faults | None = None
    ) -> Reply | WatchReply | LogReply | ExecReply:
        """`info`: the request already resolved by the caller, if it did; `faults`: the
        serving group's, for the ones that change what a read returns."""
        if info is None:
            info = parse_request(req.method, req.target)
        try:
            if not info.is_resource_request:
                return self._non_resource(info)
            return self._resource(info, req, faults or NO_FAULTS)
        except ApiError as exc:
            return status_reply(exc.code, exc.reason, exc.message, exc.details)

    # -- non-resource --------------------------------------------------------------------
    def _non_resource(self, info: RequestInfo) -> Reply:
        path = info.path.rstrip("/") or "/"
        if info.malformed:
            return status_reply(400, "BadRequest", info.malformed)
        if is_probe(info):
            return Reply(200, b"ok", "text/plain; charset=utf-8")
        if path == "/version":
            return _json(VERSION)
        if path == "/api":
            return _json(resources.api_versions())
        if path == "/apis":
            return _json(resources.api_group_list())
        if path == "/openapi/v3":
            return _json(resources.openapi_v3_root())
        if path.startswith("/openapi/v3/"):
            doc = resources.openapi_v3_document(path[len("/openapi/v3/") :])
            if doc is not None:
                return _json(doc)
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            found = resources.api_resource_list("", parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            found = resources.api_resource_list(parts[1], parts[2])
        else:
            found = None
        if found is None:
            return status_reply(404, "NotFound", "the server could not find the requested resource")
        return _json(found)

    # -- resources -----------------------------------------------------------------------
    def _resource(
        self, info: RequestInfo, req: SimRequest, faults: Faults
    ) -> Reply | WatchReply | LogReply | ExecReply:
        rt = resources.BY_GROUP_RESOURCE.get((info.api_group, info.resource))
        lacking = faults.lacks_resource
        if lacking and lacking in (info.resource, f"{info.resource}.{info.api_group}"):
            rt = None  # a group that does not serve this API
        if rt is None or rt.version != info.api_version:
            return status_reply(404, "NotFound", "the server could not find the requested resource")
        if info.subresource and info.subresource not in rt.subresources:
            return status_reply(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and info.namespace == "" and info.verb not in ("list", "watch"):
            return status_reply(404, "NotFound", "the server could not find the requested resource")
        if rt.verbs and info.verb not in rt.verbs:
            return status_reply(405, "MethodNotAllowed", f"{info.verb} is not supported")
        if rt.resource == "selfsubjectreviews":
            return self._self_subject_review(req)
        namespace = info.namespace if rt.namespaced else ""
        if rt.resource == "namespaces":
            namespace = ""
        query = _query(req.target)
        verb = info.verb
        if verb in ("list", "watch"):
            return self._list_or_watch(rt, namespace, info, query, req, faults)
        if verb == "get":
            served = self._served(faults)
            rv_text = query.get("resourceVersion") or ""
            if rv_text not in ("", "0"):  # "not older than": a lagging reader cannot
                self.store.check_rv(_rv(rv_text), served)
            if served is None:
                obj = self.store.get(rt, namespace, info.name)
            else:
                obj = self.store.get_at(rt, namespace, info.name, served)
            if faults.diverge:
                found = _diverge([obj], faults.diverge, one_object=True)
                if not found:
                    raise not_found(rt, info.name)
                obj = found[0]
            if info.subresource == "log":
                return LogReply(obj, query.get("follow") == "true")
            if info.subresource == "exec":
                return ExecReply(query.get_all("command"), query.get("stdin") in ("true", "1"))
            if info.subresource == "scale":
                return _json(_scale(obj))
            return self._render(obj, req)
        if verb == "create":
            if info.subresource == "exec":
                obj = self.store.get(rt, namespace, info.name)
                return ExecReply(query.get_all("command"), query.get("stdin") in ("true", "1"))
            body = self._body(req)
            if info.subresource == "binding":
                return self._bind(rt, namespace, info.name, body)
            if body.get("kind") == "DeleteOptions":
                return status_reply(400, "BadRequest", "unexpected DeleteOptions")
            if _dry_run(query):
                return _json(body, 201)
            return _json(self.store.create(rt, namespace, body), 201)
        if verb in ("update", "patch"):
            if verb == "update":
                body = self._body(req)
            else:
                current = self.store.get(rt, namespace, info.name)
                body = _apply_patch(current, req)
            if info.subresource == "scale":
                current = self.store.get(rt, namespace, info.name)
                new = copy.deepcopy(current)
                new.setdefault("spec", {})["replicas"] = body.get("spec", {}).get("replicas", 1)
                new["metadata"].pop("resourceVersion", None)
                return _json(_scale(self.store.update(rt, namespace, info.name, new)))
            return _json(self.store.update(rt, namespace, info.name, body, info.subresource))
        if verb == "delete":
            return _json(self.store.delete(rt, namespace, info.name))
        if verb == "deletecollection":
            predicate = _predicate(query)
            deleted = [
                self.store.delete(rt, o["metadata"].get("namespace", ""), o["metadata"]["name"])
                for o in self.store.list(rt, namespace)
                if predicate(o)
            ]
            return _json(_list_object(rt, deleted, self.store.rv))
        return status_reply(405, "MethodNotAllowed", f"{verb} is not supported")

    def _self_subject_review(self, req: SimRequest) -> Reply:
        user = req.user or UserInfo(ANONYMOUS, (UNAUTHENTICATED,))
        review = {
            "kind": "SelfSubjectReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "status": {"userInfo": user.as_json()},
        }
        return _json(review, 201)

    def _served(self, faults: Faults) -> int | None:
        """The newest resourceVersion a lagging group's reads see (None: the store's)."""
        if not faults.stale_by:
            return None
        return max(self.store.oldest_rv() - 1, self.store.rv - faults.stale_by)

    def _list_or_watch(
        self,
        rt: ResourceType,
        namespace: str,
        info: RequestInfo,
        query: _Query,
        req: SimRequest,
        faults: Faults,
    ) -> Reply | WatchReply:
        try:
            predicate = _predicate(query)
        except SelectorError as exc:
            return status_reply(400, "BadRequest", str(exc))
        problem = _list_options_problem(query, info.verb == "watch")
        if problem:
            return status_reply(422, "Invalid", f'ListOptions.meta.k8s.io "" is invalid: {problem}')
        as_table = "as=Table" in req.headers.get("accept", "")
        if info.verb == "watch":
            rv_text = query.get("resourceVersion")
            since: int | None = None
            if rv_text not in (None, "", "0"):
                try:
                    since = int(rv_text)
                except ValueError:
                    return status_reply(400, "BadRequest", f"invalid resourceVersion {rv_text!r}")
            timeout = query.get("timeoutSeconds")
            return WatchReply(
                rt,
                namespace,
                since,
                predicate,
                query.get("allowWatchBookmarks") == "true",
                float(timeout) if timeout and timeout.isdigit() else None,
                as_table,
                query.get("sendInitialEvents") == "true",
            )
        # `limit` is ignored (no continue tokens): what kube-apiserver's watch cache does
        # for resourceVersion=0, and always correct for clients, which then see everything.
        served = self._served(faults)
        at = self.store.rv if served is None else served
        rv_text = query.get("resourceVersion") or ""
        if rv_text not in ("", "0"):
            rv = _rv(rv_text)
            self.store.check_rv(rv, served)
            if query.get("resourceVersionMatch") == "Exact":
                at = rv  # etcd's snapshot at that revision
        items = [o for o in self.store.list_at(rt, namespace, at) if predicate(o)]
        if faults.diverge:
            items = _diverge(items, faults.diverge)
        if as_table:
            return _json(table(items, at))
        return _json(_list_object(rt, items, at))

    def _render(self, obj: Obj, req: SimRequest) -> Reply:
        if "as=Table" in req.headers.get("accept", ""):
            return _json(table([obj], int(obj["metadata"]["resourceVersion"])))
        return _json(obj)

    def _body(self, req: SimRequest) -> Obj:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body must be a JSON object")
        return body

    def _bind(self, rt: ResourceType, namespace: str, name: str, body: Obj) -> Reply:
        pod = copy.deepcopy(self.store.get(rt, namespace, name))
        node = body.get("target", {}).get("name", "")
        if pod.get("spec", {}).get("nodeName"):
            raise ApiError(
                409,
                "Conflict",
                f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        pod.setdefault("spec", {})["nodeName"] = node
        pod["metadata"].pop("resourceVersion", None)
        self.store.update(rt, namespace, name, pod)
        return _json(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "code": 201,
            },
            201,
        )

    def watch_event_line(self, event_type: str, obj: Obj, as_table: bool) -> bytes:
        if as_table:
            obj = table([obj], int(obj["metadata"].get("resourceVersion", 0)))
        return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"

    def bookmark(self, rt: ResourceType, initial_events_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return (
            json.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
                }
            ).encode()
            + b"\n"
        )

    @staticmethod
    def expired_line(message: str) -> bytes:
        status = json.loads(status_reply(410, "Expired", message).body)
        return json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"


# -- helpers ---------------------------------------------------------------------------
class _Query:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.pairs if k == key), None)

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


def _query(target: str) -> _Query:
    return _Query(parse_qsl(target.partition("?")[2], keep_blank_values=True))


def _rv(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid resourceVersion {text!r}") from None


def _list_options_problem(query: _Query, watch: bool) -> str:
    """apimachinery's ValidateListOptions on resourceVersionMatch and sendInitialEvents
    (the first problem; 422 when not "")."""
    rv = query.get("resourceVersion") or ""
    match = query.get("resourceVersionMatch") or ""
    initial = query.get("sendInitialEvents")
    token = query.get("continue") or ""
    forbidden = "resourceVersionMatch: Forbidden:"
    if watch:
        if initial is not None and match != "NotOlderThan":
            return (
                f"{forbidden} sendInitialEvents requires setting resourceVersionMatch to "
                "NotOlderThan"
            )
        if match and initial is None:
            return (
                f"{forbidden} resourceVersionMatch is forbidden for watch unless "
                "sendInitialEvents is provided"
            )
        if match and match != "NotOlderThan":
            return (
                f'resourceVersionMatch: Unsupported value: "{match}": supported values: '
                '"NotOlderThan"'
            )
    else:
        if initial is not None:
            return "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list"
        if match and not rv:
            return (
                f"{forbidden} resourceVersionMatch is forbidden unless resourceVersion is provided"
            )
        if match not in ("", "Exact", "NotOlderThan"):
            return (
                f'resourceVersionMatch: Unsupported value: "{match}": supported values: '
                '"Exact", "NotOlderThan", ""'
            )
        if match == "Exact" and rv == "0":
            return f'{forbidden} resourceVersionMatch "exact" is forbidden for resourceVersion "0"'
    if match and token:
        return f"{forbidden} resourceVersionMatch is forbidden when continue is provided"
    return ""


DIVERGED_LABEL = "sim.kom-gateway.io/diverged"


def _diverge(items: list[Obj], how: str, one_object: bool = False) -> list[Obj]:
    """What a diverging group serves (the `diverge` fault): every object with a label
    default's has not, one item fewer, or (a list) one made-up item more."""
    if how == "content":
        out = []
        for obj in items:
            obj = copy.deepcopy(obj)
            obj["metadata"].setdefault("labels", {})[DIVERGED_LABEL] = "true"
            out.append(obj)
        return out
    if how == "missing":
        return items[:-1]
    if how == "extra" and items and not one_object:
        extra = copy.deepcopy(items[-1])
        extra["metadata"]["name"] += "-extra"
        extra["metadata"]["uid"] = "00000000-0000-0000-0000-00000000e7a0"
        return [*items, extra]
    return items


def _predicate(query: _Query) -> Any:
    labels = label_predicate(query.get("labelSelector") or "")
    fields = field_predicate(query.get("fieldSelector") or "")
    return lambda obj: labels(obj) and fields(obj)


def _dry_run(query: _Query) -> bool:
    return query.get("dryRun") == "All"


def _list_object(rt: ResourceType, items: list[Obj], rv: int) -> Obj:
    return {
        "kind": f"{rt.kind}List",
        "apiVersion": rt.api_version,
        "metadata": {"resourceVersion": str(rv)},
        "items": items,
    }


def _scale(obj: Obj) -> Obj:
    replicas = obj.get("spec", {}).get("replicas", 1)
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            k: obj["metadata"][k]
            for k in ("name", "namespace", "resourceVersion")
            if k in obj["metadata"]
        },
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas},
    }


def _age(timestamp: str) -> str:
    try:
        created = time.mktime(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except (ValueError, TypeError):
        return "<unknown>"
    seconds = max(0, int(time.time() - created))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _column(name: str, kind: str = "string", fmt: str = "") -> Obj:
    return {"name": name, "type": kind, "format": fmt, "description": name, "priority": 0}


_NAME_AGE = [_column("Name", fmt="name"), _column("Age")]
# kube-apiserver's pod printer (the columns `kubectl get pods` shows)
_POD_COLUMNS = [
    _column("Name", fmt="name"),
    _column("Ready"),
    _column("Status"),
    _column("Restarts", "string"),
    _column("Age"),
]


def _pod_cells(pod: Obj) -> list[Any]:
    """Ready, status and restarts as kube-apiserver prints them. A simulated pod runs as
    soon as it exists (exec works on it), unless its status says otherwise."""
    containers = pod.get("spec", {}).get("containers", [])
    status = pod.get("status", {})
    phase = status.get("phase", "Running")
    statuses = status.get("containerStatuses")
    if statuses is None:
        ready = len(containers) if phase == "Running" else 0
        restarts = 0
    else:
        ready = sum(1 for c in statuses if c.get("ready"))
        restarts = sum(c.get("restartCount", 0) for c in statuses)
    return [f"{ready}/{len(containers)}", phase, str(restarts)]


# kube-apiserver's event printer (the columns `kubectl get events` shows)
_EVENT_COLUMNS = [
    _column("Last Seen"),
    _column("Type"),
    _column("Reason"),
    _column("Object"),
    _column("Message"),
]


def _event_cells(event: Obj) -> list[Any]:
    """A core/v1 or an events.k8s.io/v1 Event (one storage, two sets of field names)."""
    involved = event.get("involvedObject") or event.get("regarding") or {}
    seen = (
        event.get("lastTimestamp")
        or event.get("deprecatedLastTimestamp")
        or event.get("eventTime")
        or ""
    )
    obj = f"{involved.get('kind', '').lower()}/{involved.get('name', '')}"
    return [
        _age(seen),
        event.get("type", ""),
        event.get("reason", ""),
        obj,
        event.get("message", event.get("note", "")),
    ]


def table(items: list[Obj], rv: int) -> Obj:
    """meta.k8s.io/v1 Table, as kubectl asks for (`Accept: ...;as=Table`)."""
    kinds = {obj.get("kind") for obj in items}
    if kinds == {"Event"}:
        return _table(items, rv, _EVENT_COLUMNS, _event_cells)
    if kinds == {"Pod"}:
        return _table(items, rv, _POD_COLUMNS, lambda o: [_name(o), *_pod_cells(o), _created(o)])
    return _table(items, rv, _NAME_AGE, lambda o: [_name(o), _created(o)])


def _name(obj: Obj) -> str:
    return obj.get("metadata", {}).get("name", "")


def _created(obj: Obj) -> str:
    return _age(obj.get("metadata", {}).get("creationTimestamp", ""))


def _table(items: list[Obj], rv: int, columns: list[Obj], cells: Any) -> Obj:
    rows = [
        {
            "cells": cells(obj),
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            },
        }
        for obj in items
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(rv)},
        "columnDefinitions": columns,
        "rows": rows,
    }


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _json_patch(target: Obj, ops: list[dict]) -> Obj:
    result = copy.deepcopy(target)
    for op in ops:
        path = [p.replace("~1", "/").replace("~0", "~") for p in op.get("path", "").split("/")[1:]]
        parent: Any = result
        for part in path[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = path[-1] if path else ""
        kind = op.get("op")
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, op.get("value"))
                else:
                    parent[index] = op.get("value")
            else:
                parent[last] = op.get("value")
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        elif kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"test operation failed at {op.get('path')}")
        else:
            raise ApiError(400, "BadRequest", f"unsupported JSON patch op {kind!r}")
    return result


def _apply_patch(current: Obj, req: SimRequest) -> Obj:
    """Merge and strategic-merge (approximated as merge: lists are replaced) and JSON patch."""
    content_type = req.headers.get("content-type", "").split(";")[0].strip()
    try:
        if content_type == "application/apply-patch+yaml":
            patch = yaml.safe_load(req.body or b"{}")
        else:
            patch = json.loads(req.body or b"{}")
    except (ValueError, yaml.YAMLError) as exc:
        raise ApiError(400, "BadRequest", f"invalid patch: {exc}") from None
    wanted_rv = (
        patch.get("metadata", {}).get("resourceVersion") if isinstance(patch, dict) else None
    )
    if wanted_rv and wanted_rv != current["metadata"].get("resourceVersion"):
        # kube-apiserver: a resourceVersion in a merge patch is a precondition
        raise ApiError(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your "
            "changes to the latest version and try again",
        )
    if content_type == "application/json-patch+json":
        if not isinstance(patch, list):
            raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
        new = _json_patch(current, patch)
    elif content_type in (
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ):
        new = _merge_patch(current, patch)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types "
            f"include: application/json-patch+json, application/merge-patch+json, "
            f"application/apply-patch+yaml (got {content_type!r})",
        )
    new.setdefault("metadata", {}).pop("resourceVersion", None)
    return new
