"""The one store every simulated group shares: objects, the resourceVersion counter and
the event history watches resume from (the simulator's etcd).

Synchronous and socket-free. Watchers receive events through a callback; the serving
layer turns them into a stream.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from kom_gateway.sim.resources import BY_GROUP_RESOURCE, ResourceType, from_storage, to_storage

Obj = dict[str, Any]
GroupResource = tuple[str, str]
# kube-apiserver's cause for a read ahead of what it has seen (NewTooLargeResourceVersionError)
TOO_LARGE_CAUSE = {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class ApiError(Exception):
    """Becomes a Kubernetes Status response."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details


class WatchEvent:
    """One change, serialized once and shared by every watcher; with the object as it was
    before (`prev`), so reads at an older resourceVersion can undo it (etcd's MVCC)."""

    __slots__ = ("_line", "gr", "namespace", "obj", "prev", "rv", "type")

    def __init__(
        self, rv: int, gr: GroupResource, type_: str, obj: Obj, prev: Obj | None = None
    ) -> None:
        self.rv = rv
        self.gr = gr
        self.type = type_
        self.obj = obj
        self.prev = prev
        self.namespace = obj.get("metadata", {}).get("namespace", "")
        self._line: bytes | None = None

    @property
    def line(self) -> bytes:
        if self._line is None:
            self._line = json.dumps({"type": self.type, "object": self.obj}).encode() + b"\n"
        return self._line


class Watcher:
    def __init__(
        self,
        store: Store,
        gr: GroupResource,
        namespace: str,
        predicate: Callable[[Obj], bool],
        deliver: Callable[[WatchEvent], None],
    ) -> None:
        self.store = store
        self.gr = gr
        self.namespace = namespace
        self.predicate = predicate
        self.deliver = deliver

    def offer(self, event: WatchEvent) -> None:
        if event.gr != self.gr or (self.namespace and event.namespace != self.namespace):
            return
        if self.predicate(event.obj):
            self.deliver(event)

    def stop(self) -> None:
        self.store.watchers.discard(self)


class Store:
    def __init__(self, history: int = 10000) -> None:
        self.rv = 100
        self.objects: dict[GroupResource, dict[tuple[str, str], Obj]] = {}
        self.history: deque[WatchEvent] = deque(maxlen=history)
        self.watchers: set[Watcher] = set()
        for name in SYSTEM_NAMESPACES:
            self._put(("", "namespaces"), "", name, "ADDED", _namespace(name))

    # -- reads ---------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.objects.get(rt.storage, {}).get((namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return from_storage(rt, obj)

    def list(self, rt: ResourceType, namespace: str) -> list[Obj]:
        return [from_storage(rt, o) for o in self._stored(rt, namespace)]

    def _stored(self, rt: ResourceType, namespace: str, at: int | None = None) -> list[Obj]:
        objects = self.objects.get(rt.storage, {})
        if at is not None and at < self.rv:
            objects = self._as_of(rt.storage, objects, at)
        items = [o for (ns, _), o in objects.items() if not namespace or ns == namespace]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def oldest_rv(self) -> int:
        return self.history[0].rv if self.history else self.rv

    # -- reads at a resourceVersion (etcd's MVCC, within the kept history) ---------------
    def check_rv(self, rv: int, served: int | None = None) -> None:
        """Raise what kube-apiserver answers for a read at `rv` that it cannot serve:
        410 Expired below the kept history (compacted), 504 "Too large resource version"
        above what it has seen (`served`: a lagging reader's own newest)."""
        newest = self.rv if served is None else served
        if rv > newest:
            raise ApiError(
                504,
                "Timeout",
                f"Too large resource version: {rv}, current: {newest}",
                {
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
            )
        if rv < self.oldest_rv() - 1:
            raise ApiError(
                410,
                "Expired",
                f"The resourceVersion for the provided list is too old: {rv} "
                f"(oldest kept {self.oldest_rv() - 1})",
            )

    def list_at(self, rt: ResourceType, namespace: str, rv: int) -> list[Obj]:
        """The objects as they were at `rv` (call check_rv first)."""
        return [from_storage(rt, o) for o in self._stored(rt, namespace, rv)]

    def get_at(self, rt: ResourceType, namespace: str, name: str, rv: int) -> Obj:
        objects = self._as_of(rt.storage, self.objects.get(rt.storage, {}), rv)
        obj = objects.get((namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return from_storage(rt, obj)

    def _as_of(
        self, gr: GroupResource, objects: dict[tuple[str, str], Obj], rv: int
    ) -> dict[tuple[str, str], Obj]:
        """`objects` (current) with every change after `rv` undone, newest first."""
        out = dict(objects)
        for event in reversed(self.history):
            if event.rv <= rv:
                break
            if event.gr != gr:
                continue
            meta = event.obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if event.prev is None:
                out.pop(key, None)
            else:
                out[key] = event.prev
        return out

    # -- writes --------------------------------------------------------------------------
    def create(self, rt: ResourceType, namespace: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            else:
                raise ApiError(
                    422, "Invalid", f'{rt.kind} "" is invalid: metadata.name: Required value'
                )
        name = meta["name"]
        if rt.namespaced:
            self._require_namespace(namespace)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if (namespace, name) in self.objects.get(rt.storage, {}):
            raise ApiError(
                409,
                "AlreadyExists",
                f'{_gr_text(rt)} "{name}" already exists',
                {"name": name, "group": rt.group, "kind": rt.resource},
            )
        obj = to_storage(rt, obj)
        stored = BY_GROUP_RESOURCE[rt.storage]
        obj["apiVersion"] = stored.api_version
        obj["kind"] = stored.kind
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["generation"] = 1
        meta.pop("resourceVersion", None)
        if rt.resource == "namespaces":
            obj.setdefault("status", {"phase": "Active"})
        return from_storage(rt, self._put(rt.storage, namespace, name, "ADDED", obj))

    def update(
        self, rt: ResourceType, namespace: str, name: str, obj: Obj, subresource: str = ""
    ) -> Obj:
        current = self.objects.get(rt.storage, {}).get((namespace, name))
        if current is None:
            raise not_found(rt, name)
        obj = to_storage(rt, obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {_gr_text(rt)} "
                f'"{name}": the object has been modified; please apply your changes '
                "to the latest version and try again",
            )
        new = copy.deepcopy(current)
        if subresource == "status":
            new["status"] = obj.get("status", {})
        else:
            for key, value in obj.items():
                if key not in ("metadata", "status", "apiVersion", "kind"):
                    new[key] = value
            for key in ("labels", "annotations", "finalizers", "ownerReferences"):
                if key in meta:
                    new["metadata"][key] = meta[key]
                elif key in new["metadata"] and subresource == "" and "metadata" in obj:
                    new["metadata"].pop(key)
            if new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        return from_storage(rt, self._put(rt.storage, namespace, name, "MODIFIED", new))

    def delete(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        self.get(rt, namespace, name)  # (404 if it is not there)
        current = self.objects[rt.storage].pop((namespace, name))
        gone = copy.deepcopy(current)
        self.rv += 1
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._publish(WatchEvent(self.rv, rt.storage, "DELETED", gone, current))
        return from_storage(rt, gone)

    # -- watch ---------------------------------------------------------------------------
    def watch(
        self,
        rt: ResourceType,
        namespace: str,
        since_rv: int | None,
        predicate: Callable[[Obj], bool],
        deliver: Callable[[WatchEvent], None],
    ) -> Watcher:
        """Replay events after `since_rv` (None: current state as ADDED), then follow.

        Raises ApiError 410 Expired when `since_rv` is older than the kept history.
        """
        gr = rt.storage
        if rt.stored_as is not None:  # each event shown as this type shows it
            shown = deliver

            def deliver(event: WatchEvent) -> None:
                shown(WatchEvent(event.rv, event.gr, event.type, from_storage(rt, event.obj)))

        watcher = Watcher(self, gr, namespace, predicate, deliver)
        if since_rv is None:
            for obj in self._stored(rt, namespace):
                watcher.offer(WatchEvent(int(obj["metadata"]["resourceVersion"]), gr, "ADDED", obj))
        else:
            if since_rv < self.oldest_rv() - 1:
                raise ApiError(
                    410, "Expired", f"too old resource version: {since_rv} ({self.oldest_rv() - 1})"
                )
            for event in list(self.history):
                if event.rv > since_rv:
                    watcher.offer(event)
        self.watchers.add(watcher)
        return watcher

    # -- internals -----------------------------------------------------------------------
    def _put(self, gr: GroupResource, namespace: str, name: str, type_: str, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        stored = self.objects.setdefault(gr, {})
        prev = stored.get((namespace, name))
        stored[(namespace, name)] = obj
        self._publish(WatchEvent(self.rv, gr, type_, obj, prev))
        return obj

    def _publish(self, event: WatchEvent) -> None:
        self.history.append(event)
        for watcher in list(self.watchers):
            watcher.offer(event)

    def _require_namespace(self, namespace: str) -> None:
        if ("", namespace) not in self.objects.get(("", "namespaces"), {}):
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{_gr_text(rt)} "{name}" not found',
        {"name": name, "group": rt.group, "kind": rt.resource},
    )


def _gr_text(rt: ResourceType) -> str:
    return f"{rt.resource}.{rt.group}" if rt.group else rt.resource


def _namespace(name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": str(uuid.uuid4()),
            "labels": {"kubernetes.io/metadata.name": name},
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }
