"""Fair share per client (pure): requests in flight and response bytes held."""

from kom_gateway.config import load_config_text
from kom_gateway.overload.admission import Admission, Rejection, Ticket
from kom_gateway.overload.clientshare import ClientBuffers
from kom_gateway.overload.policy import ClientLimits, OverloadPolicy
from kom_gateway.requestinfo import parse_request
from kom_gateway.routing.cutover import Client

KUBELET = Client("kubelet/v1.31.0", "x509:CN=system:node:n1,O=system:nodes", "10.0.0.1",
                 "system:node:n1", ("system:nodes",))  # fmt: skip
OPERATOR = Client("my-operator/v2", "token:abc", "10.0.0.2")
ADMIN = Client("kubectl/v1.31", "x509:CN=admin,O=system:masters", "10.0.0.3", "admin",
               ("system:masters",))  # fmt: skip
LIST_PODS = parse_request("GET", "/api/v1/pods")
WATCH_PODS = parse_request("GET", "/api/v1/pods?watch=1")
LEASE_UPDATE = parse_request(
    "PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1")


def test_one_client_cannot_take_more_than_its_requests_in_flight():
    admission = Admission(OverloadPolicy(per_client=ClientLimits(max_inflight=3)))
    tickets = [admission.admit(LIST_PODS, KUBELET, "pod", 0.0) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert isinstance(refused, Rejection) and refused.reason == "client-inflight"
    assert "3 requests in flight" in refused.message and refused.retry_after >= 1
    # others keep their share; the client's own exemptions hold
    assert isinstance(admission.admit(LIST_PODS, OPERATOR, "pod", 0.0), Ticket)
    assert isinstance(admission.admit(LEASE_UPDATE, KUBELET, "config", 0.0), Ticket)  # protected
    assert isinstance(admission.admit(WATCH_PODS, KUBELET, "pod", 0.0), Ticket)  # long-running
    assert all(isinstance(admission.admit(LIST_PODS, ADMIN, "pod", 0.0), Ticket)
               for _ in range(10))  # system:masters
    tickets[0].release()
    tickets[0].release()  # once only
    assert isinstance(admission.admit(LIST_PODS, KUBELET, "pod", 0.0), Ticket)
    for t in tickets[1:]:
        t.release()
    assert admission.client_inflight == {KUBELET.key: 1, OPERATOR.key: 1}


def test_a_client_over_its_byte_budget_gets_no_new_request_until_it_reads():
    admission = Admission(OverloadPolicy(per_client=ClientLimits(max_buffered_bytes=1000)))
    ticket = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert ticket.client == KUBELET.key
    admission.buffers.hold(KUBELET.key, 1000)
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert isinstance(refused, Rejection) and refused.reason == "client-buffer"
    assert isinstance(admission.admit(LIST_PODS, OPERATOR, "pod", 0.0), Ticket)
    assert isinstance(admission.admit(LEASE_UPDATE, KUBELET, "config", 0.0), Ticket)
    assert admission.admit(LIST_PODS, ADMIN, "pod", 0.0).client == ""  # exempt: not held


def test_credit_is_held_back_past_the_budget_and_returned_once_under_it():
    buffers = ClientBuffers(max_buffered=100)
    credited: list[str] = []
    for _ in range(3):
        buffers.hold("k", 60)
    assert buffers.over_budget("k") and buffers.total == 180
    buffers.release("k", 60, lambda: credited.append("a"))  # 120 left: over budget
    assert credited == []
    buffers.release("k", 60, lambda: credited.append("b"))  # 60 left: under it
    assert credited == ["b", "a"]
    buffers.release("k", 60, lambda: credited.append("c"))
    assert credited == ["b", "a", "c"] and buffers.buffered == {} and buffers.total == 0
    buffers.hold("k", 0)  # an empty DATA frame (END_STREAM) holds nothing
    buffers.release("k", 0, lambda: credited.append("d"))
    assert credited[-1] == "d" and buffers.buffered == {}


def test_no_budget_means_credit_at_once():
    buffers = ClientBuffers(max_buffered=0)
    buffers.hold("k", 10**9)
    assert not buffers.over_budget("k")
    done = []
    buffers.release("k", 10**9, lambda: done.append(1))
    assert done == [1]


def test_per_client_limits_from_yaml():
    config = load_config_text(
        'groups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n'
        "overload: {perClient: {maxInflight: 20, maxBufferedBytes: 0}}\n")
    assert config.overload.per_client == ClientLimits(20, 0)
    default = load_config_text('groups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n')
    assert default.overload.per_client == ClientLimits()
