"""A kubeadm-shaped PKI for tests, made with the openssl CLI (EC keys: fast).

cluster CA: serving certs and end-user client certs (kubelet, admin);
front-proxy CA: only the gateway's front-proxy client certificate;
a foreign CA: a client nobody should trust.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

TOKENS = 'token-alice,alice,uid-alice,"developers,qa"\ntoken-ci,ci-bot,uid-ci\n'


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path  # cluster CA (kubeadm ca.crt)
    front_proxy_ca: Path
    server_cert: Path  # 127.0.0.1 / localhost, signed by the cluster CA
    server_key: Path
    front_proxy_cert: Path  # CN=front-proxy-client
    front_proxy_key: Path
    kubelet_cert: Path  # CN=system:node:node-1, O=system:nodes
    kubelet_key: Path
    admin_cert: Path  # CN=kubernetes-admin, O=kubeadm:cluster-admins, O=system:masters
    admin_key: Path
    foreign_cert: Path  # CN=mallory, from a CA nobody trusts
    foreign_key: Path
    tokens: Path  # --token-auth-file

    def file(self, name: str) -> Path:
        return self.dir / name


def make_pki(directory: Path) -> PKI:
    if shutil.which("openssl") is None:
        if os.environ.get("KOM_REQUIRE_CLIENTS") == "1":
            pytest.fail("openssl is required (KOM_REQUIRE_CLIENTS=1) but not installed")
        pytest.skip("openssl not installed")
    d = directory

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    def ca(name: str, cn: str) -> None:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN={cn}")

    def leaf(name: str, subject: str, issuer: str, ext: str) -> None:
        (d / f"{name}.ext").write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt", "-CAkey",
            f"{issuer}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
            "-extfile", f"{name}.ext")

    client = "extendedKeyUsage=clientAuth\n"
    ca("ca", "kubernetes")
    ca("front-proxy-ca", "front-proxy-ca")
    ca("foreign-ca", "kubernetes")  # same CN as the real one: only the key differs
    leaf("server", "/CN=kube-apiserver", "ca",
         "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    leaf("front-proxy-client", "/CN=front-proxy-client", "front-proxy-ca", client)
    leaf("kubelet", "/O=system:nodes/CN=system:node:node-1", "ca", client)
    leaf("admin", "/O=kubeadm:cluster-admins/O=system:masters/CN=kubernetes-admin", "ca", client)
    leaf("foreign", "/O=system:masters/CN=mallory", "foreign-ca", client)
    (d / "tokens.csv").write_text(TOKENS)
    return PKI(
        d, d / "ca.crt", d / "front-proxy-ca.crt", d / "server.crt", d / "server.key",
        d / "front-proxy-client.crt", d / "front-proxy-client.key", d / "kubelet.crt",
        d / "kubelet.key", d / "admin.crt", d / "admin.key", d / "foreign.crt",
        d / "foreign.key", d / "tokens.csv",
    )
