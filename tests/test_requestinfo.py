"""RequestInfo resolution: kube-apiserver's table (notes §1-2) plus edge cases."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kom_gateway.kube.requestinfo import RequestInfo, parse_request

# (method, target, verb, group, namespace, resource, subresource, name) — notes §1, verbatim.
NOTES_TABLE = [
    ("GET", "/api/v1/namespaces", "list", "", "", "namespaces", "", ""),
    ("GET", "/api/v1/namespaces/other", "get", "", "other", "namespaces", "", "other"),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "", "other", "namespaces", "finalize", "other"),
    ("GET", "/api/v1/namespaces/other/pods", "list", "", "other", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=1", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "", "other", "pods", "status", "foo"),
    ("GET", "/api/v1/namespaces/other/pods/foo/log?follow=true", "get", "", "other", "pods", "log", "foo"),
    ("POST", "/api/v1/namespaces/other/pods/foo/exec?command=sh", "create", "", "other", "pods", "exec", "foo"),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/x", "proxy", "", "other", "pods", "", "foo"),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "", "other", "pods", "", ""),
    ("GET", "/apis/g/v/r?fieldSelector=metadata.name=n1", "list", "g", "", "r", "", "n1"),
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale", "get", "apps", "ns", "deployments", "scale", "d"),
    ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1", "update", "coordination.k8s.io", "kube-node-lease", "leases", "", "n1"),
    ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events", "create", "events.k8s.io", "ns", "events", "", ""),
]

MORE_CASES = [
    # legacy /watch/ paths, cluster-wide and named
    ("GET", "/api/v1/watch/pods", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/watch/namespaces/ns/pods/p1", "watch", "", "ns", "pods", "", "p1"),
    ("GET", "/apis/apps/v1/watch/deployments", "watch", "apps", "", "deployments", "", ""),
    ("GET", "/api/v1/watch/namespaces", "watch", "", "", "namespaces", "", ""),
    ("GET", "/api/v1/watch/namespaces/ns", "watch", "", "ns", "namespaces", "", "ns"),
    # watch query values: first value wins; 0/false (any case) is list, anything else watch
    ("GET", "/api/v1/pods?watch=0", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=false", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=FALSE", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=true", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=yes", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=0&watch=1", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=1;x=2", "list", "", "", "pods", "", ""),  # ';' drops the pair
    ("GET", "/api/v1/pods?w%61tch=1", "watch", "", "", "pods", "", ""),  # escaped key
    ("GET", "/api/v1/pods?watch=%zz", "list", "", "", "pods", "", ""),  # bad escape drops pair
    ("HEAD", "/api/v1/pods", "list", "", "", "pods", "", ""),
    # named get ignores the watch parameter
    ("GET", "/api/v1/namespaces/ns/pods/p?watch=1", "get", "", "ns", "pods", "", "p"),
    # fieldSelector=metadata.name: name set, verb kept
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3Dp1&watch=1", "watch", "", "ns", "pods", "", "p1"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name==p1", "list", "", "", "pods", "", "p1"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name!=p1", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=spec.nodeName=n,metadata.name=p2", "list", "", "", "pods", "", "p2"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a%2Fb", "list", "", "", "pods", "", ""),  # not a path segment
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=..", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a=b", "list", "", "", "pods", "", ""),  # unparsable
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=a%5C%2Cb", "list", "", "", "pods", "", "a,b"),
    ("GET", "/api/v1/pods?fieldSelector=bogus&watch=1", "watch", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=x", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=500", "list", "", "", "pods", "", "p"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&timeoutSeconds=-1", "list", "", "", "pods", "", "p"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&timeoutSeconds=99999999999999999999", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p+q", "list", "", "", "pods", "", "p q"),
    # a client's 5,000 digits: not an int64 (and never int()-converted whole)
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=" + "9" * 5000, "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=-" + "0" * 5000 + "7", "list", "", "", "pods", "", "p"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=%2B0009223372036854775807", "list", "", "", "pods", "", "p"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=9223372036854775808", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=-9223372036854775808", "list", "", "", "pods", "", "p"),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name=p&limit=%2B", "list", "", "", "pods", "", ""),
    # namespace subresources
    ("PUT", "/api/v1/namespaces/ns/status", "update", "", "ns", "namespaces", "status", "ns"),
    ("GET", "/api/v1/namespaces/ns/status", "get", "", "ns", "namespaces", "status", "ns"),
    ("DELETE", "/api/v1/namespaces/ns", "delete", "", "ns", "namespaces", "", "ns"),
    ("DELETE", "/api/v1/namespaces", "deletecollection", "", "", "namespaces", "", ""),
    # proxy: verb proxy, never a subresource; pods/proxy subresource is different
    ("GET", "/api/v1/proxy/nodes/n1/stats", "proxy", "", "", "nodes", "", "n1"),
    ("GET", "/api/v1/namespaces/ns/pods/p/proxy/metrics", "get", "", "ns", "pods", "proxy", "p"),
    ("GET", "/api/v1/nodes/n1/proxy/stats/summary", "get", "", "", "nodes", "proxy", "n1"),
    # other verbs and subresources
    ("PATCH", "/api/v1/nodes/n1/status", "patch", "", "", "nodes", "status", "n1"),
    ("POST", "/api/v1/namespaces/ns/pods/p/eviction", "create", "", "ns", "pods", "eviction", "p"),
    ("POST", "/api/v1/namespaces/ns/bindings", "create", "", "ns", "bindings", "", ""),
    ("POST", "/api/v1/namespaces/ns/serviceaccounts/sa/token", "create", "", "ns", "serviceaccounts", "token", "sa"),
    ("GET", "/api/v1/namespaces/ns/pods/p/portforward", "get", "", "ns", "pods", "portforward", "p"),
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale/extra/stuff", "get", "apps", "ns", "deployments", "scale", "d"),
    ("OPTIONS", "/api/v1/pods", "", "", "", "pods", "", ""),
    # trailing slashes and empty segments behave as in Go (Trim, then Split)
    ("GET", "/api/v1/namespaces/ns/pods/", "list", "", "ns", "pods", "", ""),
    ("GET", "//api/v1/pods//", "list", "", "", "pods", "", ""),
    ("GET", "/api/v1/namespaces//pods", "list", "", "", "pods", "", ""),  # ns "" then shifted
    # percent-encoding is decoded before splitting (Go's URL.Path)
    ("GET", "/api/v1/namespaces/ns/pods/a%2Fb", "get", "", "ns", "pods", "b", "a"),
    ("GET", "/api/v1/namespaces/n%73/pods", "list", "", "ns", "pods", "", ""),
    ("GET", "/api/v1/namespaces/ns/configmaps/caf%C3%A9", "get", "", "ns", "configmaps", "", "café"),
    # absolute-form target
    ("GET", "https://10.0.0.1:6443/api/v1/pods?watch=1", "watch", "", "", "pods", "", ""),
    # CRDs
    ("GET", "/apis/example.com/v1alpha1/namespaces/ns/widgets/w/status", "get", "example.com", "ns", "widgets", "status", "w"),
]


@pytest.mark.parametrize(("method", "target", "verb", "group", "ns", "resource", "sub", "name"), NOTES_TABLE + MORE_CASES)
def test_resource_requests(method, target, verb, group, ns, resource, sub, name):
    info = parse_request(method, target)
    assert info.is_resource_request
    assert (info.verb, info.api_group, info.namespace, info.resource, info.subresource, info.name) == (
        verb, group, ns, resource, sub, name,
    )
    assert not info.malformed


@pytest.mark.parametrize(
    ("method", "target", "verb"),
    [
        ("GET", "/", "get"),
        ("GET", "", "get"),
        ("GET", "/healthz", "get"),
        ("GET", "/livez", "get"),
        ("GET", "/readyz?verbose", "get"),
        ("GET", "/version", "get"),
        ("GET", "/metrics", "get"),
        ("GET", "/openapi/v2", "get"),
        ("GET", "/openapi/v3/apis/apps/v1?hash=abc", "get"),
        ("GET", "/api", "get"),
        ("GET", "/api/v1", "get"),
        ("GET", "/apis", "get"),
        ("GET", "/apis/apps", "get"),
        ("GET", "/apis/apps/v1", "get"),
        ("GET", "/apis/apps/v1/", "get"),
        ("POST", "/apis/g/v", "post"),
        ("GET", "/other/v1/pods", "get"),
        ("GET", "/API/v1/pods", "get"),
        ("DELETE", "/logs/x", "delete"),
    ],
)
def test_non_resource_requests(method, target, verb):
    info = parse_request(method, target)
    assert not info.is_resource_request
    assert info.verb == verb
    assert (info.api_group, info.resource, info.name) == ("", "", "")
    assert not info.is_long_running


def test_discovery_keeps_version_and_group_empty():
    info = parse_request("GET", "/apis/apps/v1")
    assert info == RequestInfo("get", "/apis/apps/v1", False)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/api/v1/watch", "nothing after"),
        ("/apis/apps/v1/proxy", "nothing after"),
        ("/api/v1/pods/%zz", "percent-escape"),
        ("/api/v1/pods/%4", "percent-escape"),
        ("/api/v1/namespaces/%ff%fe/pods", "UTF-8"),
        ("/api/v1/pods\x00", "control character"),
        ("/api/v1/pods?x=\x7f", "control character"),
    ],
)
def test_malformed_targets_are_non_resource_with_a_reason(target, why):
    info = parse_request("GET", target)
    assert not info.is_resource_request
    assert why in info.malformed


@pytest.mark.parametrize(
    ("method", "target", "long_running"),
    [
        ("GET", "/api/v1/pods?watch=true", True),
        ("GET", "/api/v1/watch/pods", True),
        ("GET", "/api/v1/proxy/nodes/n1/x", True),
        ("GET", "/api/v1/namespaces/ns/pods/p/log", True),
        ("GET", "/api/v1/namespaces/ns/pods/p/log?follow=true", True),
        ("POST", "/api/v1/namespaces/ns/pods/p/exec?command=sh", True),
        ("GET", "/api/v1/namespaces/ns/pods/p/exec?command=sh", True),
        ("POST", "/api/v1/namespaces/ns/pods/p/attach", True),
        ("POST", "/api/v1/namespaces/ns/pods/p/portforward", True),
        ("GET", "/api/v1/namespaces/ns/services/s/proxy/x", True),
        ("GET", "/debug/pprof/profile", True),
        ("GET", "/api/v1/pods", False),
        ("GET", "/api/v1/pods?watch=0", False),
        ("GET", "/api/v1/namespaces/ns/pods/p", False),
        ("GET", "/api/v1/namespaces/ns/pods/p/status", False),
        ("POST", "/api/v1/namespaces/ns/pods", False),
        ("GET", "/healthz", False),
        ("GET", "/debug/pprof", False),
    ],
)
def test_long_running(method, target, long_running):
    assert parse_request(method, target).is_long_running is long_running


def test_as_json_is_camel_case_and_complete():
    data = parse_request("GET", "/api/v1/namespaces/ns/pods/p/log").as_json()
    assert data["isLongRunning"] is True
    assert data["apiVersion"] == "v1"
    assert set(data) == {
        "verb", "path", "isResourceRequest", "apiPrefix", "apiGroup", "apiVersion",
        "namespace", "resource", "subresource", "name", "isLongRunning", "malformed",
    }


METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "", "WATCH"])
SEGMENT = st.one_of(
    st.sampled_from(["api", "apis", "v1", "namespaces", "watch", "proxy", "status", "finalize",
                     "pods", "log", "", "%", "%2F", "%zz", "%ff", "..", "apps"]),
    st.text(max_size=12),
)


@given(METHODS, st.lists(SEGMENT, max_size=9), st.text(max_size=40))
def test_fuzz_structured_never_raises(method, segments, query):
    info = parse_request(method, "/" + "/".join(segments) + ("?" + query if query else ""))
    assert isinstance(info, RequestInfo)
    if info.is_resource_request:
        assert info.api_prefix in ("api", "apis")
        assert not info.malformed


@given(st.text(max_size=200), st.text(max_size=8))
def test_fuzz_arbitrary_target_never_raises(target, method):
    info = parse_request(method, target)
    assert isinstance(info, RequestInfo)
    assert info.is_long_running in (True, False)



def test_the_parse_cache_gives_what_parse_request_gives_and_stays_bounded():
    from kom_gateway.kube.requestinfo import ParseCache

    cache = ParseCache(size=3, longest=40)
    first = cache.parse("GET", "/api/v1/namespaces/a/pods/p")
    assert first == parse_request("GET", "/api/v1/namespaces/a/pods/p")
    assert cache.parse("GET", "/api/v1/namespaces/a/pods/p") is first
    assert cache.parse("DELETE", "/api/v1/namespaces/a/pods/p").verb == "delete"  # method is key
    long = "/api/v1/pods?labelSelector=" + "a" * 40
    assert cache.parse("GET", long) == parse_request("GET", long) and len(cache) == 2
    cache.parse("GET", "/api/v1/nodes")
    cache.parse("GET", "/api/v1/nodes/n1")  # full: cleared, then kept
    assert len(cache) == 1
