"""The fallback-to-default decision table and header rewriting (pure)."""

import json

import pytest

from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.kube.status import status_body
from kom_gateway.proxy.fallback import (
    GOAWAY_RETRIES,
    Failure,
    after_failure,
    falls_back_on_status,
)
from kom_gateway.proxy.headers import (
    downstream_response_headers,
    status_headers,
    upstream_request_headers,
)

GET_PODS = ("GET", parse_request("GET", "/api/v1/pods"))
WATCH = ("GET", parse_request("GET", "/api/v1/pods?watch=1"))
CREATE = ("POST", parse_request("POST", "/api/v1/namespaces/a/pods"))
DELETE = ("DELETE", parse_request("DELETE", "/api/v1/namespaces/a/pods/p"))
EXEC_POST = ("POST", parse_request("POST", "/api/v1/namespaces/a/pods/p/exec"))


def test_goaway_retries_the_same_group_a_few_times_then_default():
    method, info = CREATE
    for goaways in range(1, GOAWAY_RETRIES + 1):
        assert after_failure(Failure.GOAWAY, info, method, "pod", True, goaways).retry_group == "pod"
    assert after_failure(Failure.GOAWAY, info, method, "pod", True, GOAWAY_RETRIES + 1).retry_group == "default"


@pytest.mark.parametrize(
    "failure", [Failure.NO_HEALTHY_ENDPOINT, Failure.CONNECT, Failure.REFUSED, Failure.GOAWAY])
@pytest.mark.parametrize("request_", [GET_PODS, WATCH, CREATE, DELETE])
def test_unsent_requests_of_any_verb_go_to_default(failure, request_):
    method, info = request_
    assert after_failure(failure, info, method, "pod", True, 9).retry_group == "default"
    # on default itself: another default endpoint if there is one, else 503
    assert after_failure(failure, info, method, "default", True, 9).retry_group == "default"
    last = after_failure(failure, info, method, "default", False, 9)
    assert (last.retry_group, last.status, last.retry_after) == (None, 503, 1)


@pytest.mark.parametrize("request_", [GET_PODS, WATCH])
def test_sent_reads_are_retried_on_default(request_):
    method, info = request_
    assert after_failure(Failure.RESET_BEFORE_HEADERS, info, method, "pod", False).retry_group == "default"


@pytest.mark.parametrize("request_", [CREATE, DELETE, EXEC_POST])
def test_sent_writes_get_503_with_retry_after(request_):
    method, info = request_
    step = after_failure(Failure.RESET_BEFORE_HEADERS, info, method, "pod", True)
    assert (step.retry_group, step.status, step.reason, step.retry_after) == (
        None, 503, "ServiceUnavailable", 1)
    assert "may or may not have been applied" in step.message


LIST_CMS = ("GET", parse_request("GET", "/api/v1/namespaces/a/configmaps"))
PATCH = ("PATCH", parse_request("PATCH", "/api/v1/namespaces/a/configmaps/c"))


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("request_", [GET_PODS, WATCH, LIST_CMS])
def test_a_groups_5xx_to_a_read_goes_to_default(status, request_):
    method, info = request_
    assert falls_back_on_status(status, info, method, "pod")
    assert after_failure(Failure.UPSTREAM_5XX, info, method, "pod", True).retry_group == "default"
    assert not falls_back_on_status(status, info, method, "default")  # default's answer stands


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("request_", [CREATE, DELETE, PATCH, EXEC_POST])
def test_a_5xx_to_a_write_is_its_answer(status, request_):
    method, info = request_
    assert not falls_back_on_status(status, info, method, "pod")


@pytest.mark.parametrize("status", [200, 201, 400, 401, 403, 404, 409, 410, 422, 429, 501, 505])
def test_other_statuses_are_the_apiservers_answer(status):
    method, info = GET_PODS
    assert not falls_back_on_status(status, info, method, "pod")


def test_upstream_headers_drop_hop_by_hop_and_spoofed_identity():
    headers = [
        (b"user-agent", b"kubectl/v1.31"), (b"authorization", b"Bearer abc"),
        (b"accept", b"application/json"), (b"connection", b"keep-alive, x-private"),
        (b"keep-alive", b"timeout=5"), (b"x-private", b"1"), (b"transfer-encoding", b"chunked"),
        (b"host", b"gw"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
        (b"x-remote-user", b"system:admin"), (b"x-remote-group", b"system:masters"),
        (b"x-remote-extra-scopes", b"x"), (b"impersonate-user", b"bob"),
        (b"x_remote_user", b"system:admin"), (b"x-remote_group", b"system:masters"),
        (b"x_remote-extra-scopes", b"x"), (b"x_request_id", b"kept"),
        (b"content-encoding", b"gzip"),
    ]
    out = upstream_request_headers("GET", "https", "10.0.0.1:6443", "/api/v1/pods?watch=1", headers)
    assert out[:4] == [(b":method", b"GET"), (b":scheme", b"https"),
                       (b":authority", b"10.0.0.1:6443"), (b":path", b"/api/v1/pods?watch=1")]
    assert dict(out[4:]) == {
        b"user-agent": b"kubectl/v1.31", b"authorization": b"Bearer abc",
        b"accept": b"application/json", b"impersonate-user": b"bob", b"content-encoding": b"gzip",
        b"x_request_id": b"kept",
    }
    # decisions per name are memoised: the second time gives the same answer
    again = upstream_request_headers("GET", "https", "10.0.0.1:6443", "/api/v1/pods", headers)
    assert again[4:] == out[4:]


def test_header_drop_memo_stays_bounded_and_right_under_a_flood_of_names():
    """Header names are the client's to choose: a flood of new ones clears the memo
    instead of growing it, and spoofed identity is still dropped after every clear."""
    from kom_gateway.proxy import headers as h

    spoofed = [(b"x-remote-user", b"system:admin"), (b"x_remote_group", b"system:masters")]
    for i in range(3 * h.DROPPED_CACHE_SIZE):
        out = upstream_request_headers("GET", "https", "a", "/", [(b"x-n%d" % i, b"1"), *spoofed])
        assert out[4:] == [(b"x-n%d" % i, b"1")]
        assert len(h._DROPPED) <= h.DROPPED_CACHE_SIZE


def test_downstream_headers_and_status_body():
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"x-kom-sim-group", b"pod"), (b"transfer-encoding", b"chunked")]
    assert downstream_response_headers(headers) == [
        (b"content-type", b"application/json"), (b"x-kom-sim-group", b"pod")]
    body = status_body(503, "ServiceUnavailable", "down")
    assert json.loads(body) == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "message": "down",
                                "reason": "ServiceUnavailable", "code": 503}
    assert (b"retry-after", b"1") in status_headers(body, 1)
    assert (b"content-length", str(len(body)).encode()) in status_headers(body)
