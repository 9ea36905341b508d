"""The simulator's store (its etcd): resources kube-apiserver serves from one storage
share it here too, each shown in its own version's fields."""

from __future__ import annotations

from kom_gateway.sim.resources import BY_GROUP_RESOURCE
from kom_gateway.sim.store import Store

CORE = BY_GROUP_RESOURCE[("", "events")]
EVENTS_V1 = BY_GROUP_RESOURCE[("events.k8s.io", "events")]


def test_core_and_events_k8s_io_events_are_one_storage():
    """Issue: `kubectl get events.events.k8s.io` listed nothing although a core event
    existed (kube-apiserver serves both from one storage, converting)."""
    store = Store()
    store.create(CORE, "default", {
        "metadata": {"name": "p1.1"}, "involvedObject": {"kind": "Pod", "name": "p1"},
        "reason": "Scheduled", "message": "assigned to n1", "type": "Normal",
        "source": {"component": "default-scheduler"}, "count": 1,
    })  # fmt: skip
    [event] = store.list(EVENTS_V1, "default")
    assert event["apiVersion"] == "events.k8s.io/v1" and event["kind"] == "Event"
    assert event["regarding"] == {"kind": "Pod", "name": "p1"}
    assert (event["note"], event["reason"], event["deprecatedCount"]) == (
        "assigned to n1", "Scheduled", 1)
    assert "message" not in event and "involvedObject" not in event

    seen = []
    store.watch(EVENTS_V1, "", None, lambda _: True, seen.append)
    created = store.create(EVENTS_V1, "default", {
        "metadata": {"name": "p2.1"}, "regarding": {"kind": "Pod", "name": "p2"},
        "note": "pulled", "reason": "Pulled", "type": "Normal",
        "reportingController": "kubelet", "reportingInstance": "n1",
    })  # fmt: skip
    assert created["note"] == "pulled" and created["apiVersion"] == "events.k8s.io/v1"
    core = store.get(CORE, "default", "p2.1")
    assert (core["apiVersion"], core["message"], core["reportingComponent"]) == (
        "v1", "pulled", "kubelet")
    assert core["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    # a watch on either version sees the other's writes, in its own fields
    assert [e.obj["note"] for e in seen] == ["assigned to n1", "pulled"]
    store.update(CORE, "default", "p2.1", {**core, "message": "pulled again"})
    assert seen[-1].type == "MODIFIED" and seen[-1].obj["note"] == "pulled again"
    store.delete(EVENTS_V1, "default", "p1.1")
    assert [o["metadata"]["name"] for o in store.list(CORE, "default")] == ["p2.1"]
    assert seen[-1].type == "DELETED" and seen[-1].obj["regarding"]["name"] == "p1"
    # what a reader got is its own copy: changing it changes nothing stored
    got = store.get(EVENTS_V1, "default", "p2.1")
    got["metadata"]["labels"] = {"x": "y"}
    assert "labels" not in store.get(CORE, "default", "p2.1")["metadata"]
