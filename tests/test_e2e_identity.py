"""kubectl over TLS through the gateway, with a client-certificate kubeconfig and with a
token one: `kubectl auth whoami` (a SelfSubjectReview, answered by the simulated
apiserver with whoever it authenticated) shows exactly the client's identity."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import fields

import pytest
from e2e import Cluster, need, sample
from pki import PKI
from test_identity import sign


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, pki):
    user = f"{{client-certificate: {pki.admin_cert}, client-key: {pki.admin_key}}}"
    c = Cluster(tmp_path_factory.mktemp("e2e-tls"), pki, user)
    yield c
    c.stop()


def test_kubectl_with_a_client_certificate(tls_cluster, pki):
    review = json.loads(tls_cluster.kubectl("auth", "whoami", "-o", "json"))
    der = ssl.PEM_cert_to_DER_cert(pki.admin_cert.read_text())
    assert review["status"]["userInfo"] == {
        "username": "kubernetes-admin",
        "groups": ["kubeadm:cluster-admins", "system:masters", "system:authenticated"],
        "extra": {"authentication.kubernetes.io/credential-id":
                  ["X509SHA256=" + hashlib.sha256(der).hexdigest()]},
    }
    seq = tls_cluster.last_seq()
    tls_cluster.kubectl("run", "whoami-pod", "--image=busybox")
    assert "whoami-pod" in tls_cluster.kubectl("get", "pods", "-A")
    assert tls_cluster.kubectl("exec", "whoami-pod", "--", "echo", "over", "tls") == "over tls\n"
    seen = [r for r in tls_cluster.requests_since(seq) if "readyz" not in r["target"]]
    assert seen and all(r["user"]["username"] == "kubernetes-admin" for r in seen)
    assert {r["authenticator"] for r in seen} == {"requestheader"}
    assert any("/exec?" in r["target"] for r in seen)


def test_failed_handshakes_are_counted_by_the_running_gateway(tls_cluster, pki, tmp_path):
    """kubectl with a certificate from another CA fails its TLS handshake; the gateway
    (uvloop, which says nothing of a failed handshake) counts it, and it holds no
    connection in a handshake afterwards."""
    def refused() -> float:
        return sample(tls_cluster.metrics(), "kom_gateway_client_connections_rejected_total",
                      reason="tls-handshake")

    before = refused()
    user = f"{{client-certificate: {pki.foreign_cert}, client-key: {pki.foreign_key}}}"
    mallory = tls_cluster.write_kubeconfig(tmp_path / "foreign.kubeconfig", user)
    proc = subprocess.run([need("kubectl"), "--kubeconfig", str(mallory), "get", "pods"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while (after := refused()) == before:
        assert time.monotonic() < deadline, "the failed handshake was not counted"
        time.sleep(0.1)
    assert after > before
    metrics = tls_cluster.metrics()
    assert 'kom_gateway_client_connections{protocol="tls-handshake"}' in metrics
    assert sample(metrics, "kom_gateway_client_connections", protocol="tls-handshake") == 0


def test_kubectl_with_a_token(tls_cluster, tmp_path):
    kubeconfig = tls_cluster.write_kubeconfig(tmp_path / "token.kubeconfig", "{token: token-ci}")
    review = json.loads(tls_cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig))
    assert review["status"]["userInfo"]["username"] == "ci-bot"
    assert review["status"]["userInfo"]["groups"] == ["system:authenticated"]
    bad = tls_cluster.write_kubeconfig(tmp_path / "bad.kubeconfig", "{token: wrong}")
    proc = subprocess.run([need("kubectl"), "--kubeconfig", str(bad), "get", "pods"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "must be logged in" in proc.stderr  # the apiserver's 401


def test_a_running_gateway_picks_up_a_rotated_serving_certificate(tmp_path, pki):
    copy = tmp_path / "pki"
    shutil.copytree(pki.dir, copy)
    moved = PKI(**{f.name: copy / getattr(pki, f.name).name for f in fields(PKI) if f.name != "dir"},
                dir=copy)
    cluster = Cluster(tmp_path, moved, "{token: token-ci}", gateway_args=("--watch-interval", "0.2"))
    try:
        def served() -> bytes:
            context = ssl.create_default_context(cafile=str(pki.ca))
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.getpeercert(binary_form=True)

        assert served() == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
        new_cert, new_key = sign(pki, tmp_path, "rotated", "/CN=kube-apiserver")
        shutil.copy(new_key, moved.server_key)
        shutil.copy(new_cert, moved.server_cert)
        expected = ssl.PEM_cert_to_DER_cert(new_cert.read_text())
        deadline = time.monotonic() + 15
        while served() != expected:
            assert time.monotonic() < deadline, "the rotated certificate was never served"
            time.sleep(0.1)
        assert json.loads(cluster.kubectl("auth", "whoami", "-o", "json"))[
            "status"]["userInfo"]["username"] == "ci-bot"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin}/metrics",
                                         timeout=10).read().decode()
        assert 'kom_gateway_tls_reloads_total{result="applied",side="listen"}' in metrics
    finally:
        cluster.stop()
