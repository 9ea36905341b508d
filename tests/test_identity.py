"""Exactly the right identity reaches the apiserver (notes §7).

The simulated groups authenticate like kube-apiserver: request-header (front-proxy CA,
allowed name front-proxy-client), x509 (cluster CA), a static token file, anonymous; a
bad credential is 401. The gateway terminates TLS, verifies client certificates against
the cluster CA, strips every incoming X-Remote-* header and presents its front-proxy
certificate upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
import subprocess

import aiohttp
import pytest
from harness import GROUPS, Collector, config_text

from kom_gateway.config import ConfigHolder, load_config_text
from kom_gateway.http.client import ConnectError
from kom_gateway.http.h2.client import H2ClientConnection
from kom_gateway.http.settings import H2ClientSettings
from kom_gateway.kube.identity import CREDENTIAL_ID_KEY, identity_headers, peer_identity
from kom_gateway.proxy.gateway import Gateway
from kom_gateway.server.run import new_listener
from kom_gateway.server.tlsfiles import ServerTLSContext
from kom_gateway.sim.auth import SimSecurity, Unauthorized
from kom_gateway.sim.server import Simulator

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


SPOOFED = [(b"x-remote-user", b"system:admin"), (b"x-remote-group", b"system:masters"),
           (b"x-remote-extra-scopes", b"everything"), (b"X-Remote-Uid".lower(), b"0"),
           # what a proxy or server that treats "_" as "-" would read as identity
           (b"x_remote_user", b"system:admin"), (b"x-remote_group", b"system:masters"),
           (b"x_remote_extra_scopes", b"everything")]
CUTOVER = """cutover:
  - match: {userGroup: "system:nodes"}
    percent: {pod: 100, config: 100, event: 100}
"""


def decoded(cert_path):
    return ssl._ssl._test_decode_cert(str(cert_path))


def der(cert_path):
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


def fingerprint(cert_path) -> str:
    return "X509SHA256=" + hashlib.sha256(der(cert_path)).hexdigest()


# -- the pure part ---------------------------------------------------------------------
def test_identity_of_a_kubelet_certificate(pki):
    identity = peer_identity(decoded(pki.kubelet_cert), der(pki.kubelet_cert))
    assert identity.user == "system:node:node-1"
    assert identity.groups == ("system:nodes",)
    assert identity.credential_id == fingerprint(pki.kubelet_cert)
    assert identity.key == "x509:CN=system:node:node-1,O=system:nodes"
    assert identity.headers == [
        (b"x-remote-user", b"system:node:node-1"),
        (b"x-remote-group", b"system:nodes"),
        (b"x-remote-extra-authentication.kubernetes.io%2fcredential-id",
         fingerprint(pki.kubelet_cert).encode()),
    ]


def test_identity_headers_one_line_per_group_and_escaped_extra_keys():
    headers = identity_headers("jane", ("a,b", "c"), {"Example.org/Scopes": ["x", "y"]})
    assert headers == [(b"x-remote-user", b"jane"), (b"x-remote-group", b"a,b"),
                       (b"x-remote-group", b"c"), (b"x-remote-extra-example.org%2fscopes", b"x"),
                       (b"x-remote-extra-example.org%2fscopes", b"y")]
    # a control character would split the header: dropped; UTF-8 is kept as UTF-8
    assert identity_headers("j\r\nx-evil: 1", (), {})[0] == (b"x-remote-user", b"jx-evil: 1")
    assert identity_headers("zoë", (), {})[0][1] == "zoë".encode()


def test_no_identity_without_a_certificate_or_a_common_name(pki):
    assert peer_identity(None, None) is None
    assert peer_identity({}, b"") is None
    no_cn = {"subject": ((("organizationName", "system:masters"),),)}
    assert peer_identity(no_cn, b"der") is None  # kube-apiserver ignores such a cert too
    two_cns = {"subject": ((("commonName", "first"),), (("commonName", "last"),))}
    assert peer_identity(two_cns, b"der").user == "last"  # as Go's pkix.Name


# -- through the gateway ---------------------------------------------------------------
class TLSStack:
    def __init__(self, pki, files=None) -> None:
        self.pki = pki
        self.files = files or {}  # copies the rotation test replaces

    async def start(self, extra: str = "") -> TLSStack:
        pki = self.pki
        security = SimSecurity(str(pki.server_cert), str(pki.server_key), str(pki.ca),
                               str(pki.front_proxy_ca), ("front-proxy-client",), str(pki.tokens))
        self.sim = Simulator(bookmark_interval=0.2, ssl_context=security.ssl_context(),
                             authenticator=security.authenticator())
        for name in GROUPS:
            await self.sim.add_group(name, "127.0.0.1", 0)
        ports = {name: g.port for name, g in self.sim.groups.items()}
        fp_cert = self.files.get("fp_cert", pki.front_proxy_cert)
        fp_key = self.files.get("fp_key", pki.front_proxy_key)
        upstream = f"upstream: {{tls: {{caFile: {pki.ca}, certFile: {fp_cert}, keyFile: {fp_key}}}}}\n"
        text = config_text(ports, CUTOVER, upstream + extra).replace("http://", "https://")
        self.gateway = Gateway(ConfigHolder(load_config_text(text)))
        self.serving = ServerTLSContext(str(self.files.get("cert", pki.server_cert)),
                                        str(self.files.get("key", pki.server_key)),
                                        str(self.files.get("ca", pki.ca)))
        self.listener = new_listener(self.gateway, self.serving.listening)
        self.port = await self.listener.start("127.0.0.1", 0)
        return self

    def client_context(self, cert=None, key=None, alpn=None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        if alpn:
            context.set_alpn_protocols([alpn])
        return context

    async def h2(self, cert=None, key=None) -> H2ClientConnection:
        return await H2ClientConnection.connect(
            "127.0.0.1", self.port, H2ClientSettings(), self.client_context(cert, key, "h2"),
            "127.0.0.1")

    def last(self, fragment: str) -> dict:
        return [r for r in self.sim.requests if fragment in r["target"]][-1]

    async def close(self) -> None:
        await self.listener.close()
        self.gateway.abort_all()
        await self.gateway.close()
        await self.sim.close()


async def h2_get(conn: H2ClientConnection, path: str, headers=()) -> Collector:
    collector = Collector()
    hdrs = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"127.0.0.1"),
            (b":path", path.encode()), (b"user-agent", b"kubelet/v1.31.0 (linux/amd64)"),
            *headers]
    collector.stream = conn.open_stream(hdrs, True, collector)
    async with asyncio.timeout(10):
        await collector.done
    return collector


@pytest.fixture
async def stack(pki):
    s = await TLSStack(pki).start()
    yield s
    await s.close()


async def test_kubelet_certificate_reaches_the_apiserver_as_the_node(stack, pki):
    conn = await stack.h2(pki.kubelet_cert, pki.kubelet_key)
    try:
        got = await h2_get(conn, "/api/v1/namespaces/default/pods?fieldSelector=spec.nodeName%3Dnode-1",
                           SPOOFED)
    finally:
        conn.close()
    assert got.status == 200
    entry = stack.last("fieldSelector=spec.nodeName")
    assert entry["group"] == "pod"  # cut over by the certificate's group (system:nodes)
    assert entry["authenticator"] == "requestheader"
    assert entry["user"] == {
        "username": "system:node:node-1",
        "groups": ["system:nodes", "system:authenticated"],
        "extra": {CREDENTIAL_ID_KEY: [fingerprint(pki.kubelet_cert)]},
    }
    # on the wire: only what the gateway set; nothing the client claimed
    assert entry["remoteUser"] == "system:node:node-1"
    assert entry["remoteGroups"] == ["system:nodes"]
    assert set(entry["remoteExtra"]) == {"authentication.kubernetes.io%2fcredential-id"}
    remote = [n for n in entry["headerNames"] if n.replace("_", "-").startswith("x-remote-")]
    assert sorted(remote) == ["x-remote-extra-authentication.kubernetes.io%2fcredential-id",
                              "x-remote-group", "x-remote-user"]


async def test_bearer_token_passes_through_with_no_remote_user(stack, pki):
    headers = {"Authorization": "Bearer token-alice", "X-Remote-User": "system:admin",
               "X-Remote-Group": "system:masters", "X-Remote-Extra-Scopes": "all"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.client_context())) as session,
        session.get(f"https://127.0.0.1:{stack.port}/api/v1/configmaps", headers=headers) as r,
    ):
        assert r.status == 200
    entry = stack.last("/api/v1/configmaps")
    assert entry["authenticator"] == "token"
    assert entry["user"]["username"] == "alice"
    assert entry["user"]["groups"] == ["developers", "qa", "system:authenticated"]
    assert "remoteUser" not in entry and entry["remoteGroups"] == [] and "remoteExtra" not in entry
    assert entry["group"] == "default"  # alice is no node: not cut over


async def test_anonymous_and_bad_tokens_are_the_apiservers_to_refuse(stack):
    """No identity is invented. Through a front proxy kube-apiserver answers 401 to a
    request without X-Remote-User (the front-proxy cert fails its x509 authenticator),
    and to a bad token; the gateway relays that answer unchanged."""
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=stack.client_context())) as session:
        base = f"https://127.0.0.1:{stack.port}/api/v1/namespaces"
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            async with session.get(base, headers=headers) as r:
                assert r.status == 401
                body = await r.json()
                assert (body["kind"], body["reason"]) == ("Status", "Unauthorized")
    ours = [e for e in list(stack.sim.requests) if e["target"] == "/api/v1/namespaces"]
    assert len(ours) >= 2 and all(e.get("unauthorized") for e in ours[-2:])  # not probes


async def test_impersonation_headers_pass_through(stack, pki):
    conn = await stack.h2(pki.admin_cert, pki.admin_key)
    try:
        got = await h2_get(conn, "/api/v1/namespaces/default/secrets",
                           [(b"impersonate-user", b"bob"), (b"impersonate-group", b"dev")])
    finally:
        conn.close()
    assert got.status == 200
    entry = stack.last("/secrets")
    assert entry["user"]["username"] == "kubernetes-admin"
    assert entry["user"]["groups"] == ["kubeadm:cluster-admins", "system:masters",
                                       "system:authenticated"]
    assert entry["impersonate"] == {"impersonate-user": "bob", "impersonate-group": "dev"}


async def test_a_certificate_from_another_ca_is_refused(stack, pki):
    with pytest.raises(ConnectError):  # a TLS alert, or a reset, depending on timing
        await stack.h2(pki.foreign_cert, pki.foreign_key)
    def api_requests() -> int:  # the gateway's own /readyz probes aside
        return sum(1 for r in stack.sim.requests if r["target"] != "/readyz")

    before = api_requests()
    context = stack.client_context(pki.foreign_cert, pki.foreign_key)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.get(f"https://127.0.0.1:{stack.port}/api/v1/pods") as r,
        ):
            await r.read()
    assert api_requests() == before  # nothing reached an apiserver


async def test_exec_upgrade_carries_the_identity(stack, pki):
    context = stack.client_context(pki.admin_cert, pki.admin_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        base = f"https://127.0.0.1:{stack.port}/api/v1/namespaces/default/pods"
        pod = {"metadata": {"name": "who"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        async with session.post(base, json=pod) as r:
            assert r.status == 201
        async with session.ws_connect(
                f"{base}/who/exec?command=echo&command=hi&stdout=true",
                headers={"X-Remote-User": "system:admin"},
                protocols=("v5.channel.k8s.io",)) as ws:
            assert await ws.receive_bytes(timeout=10) == b"\x01hi\n"
    entry = stack.last("/exec?")
    assert entry["user"]["username"] == "kubernetes-admin"
    assert entry["remoteUser"] == "kubernetes-admin"


# -- rotation ----------------------------------------------------------------------------
def sign(pki, directory, name: str, subject: str, ca: str = "ca") -> tuple:
    """A fresh EC certificate from one of the test CAs."""
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True,  # noqa: E731
                                    cwd=directory)
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    run("x509", "-req", "-in", f"{name}.csr", "-CA", str(pki.file(f"{ca}.crt")), "-CAkey",
        str(pki.file(f"{ca}.key")), "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
        "-extfile", f"{name}.ext")
    return directory / f"{name}.crt", directory / f"{name}.key"


def served_certificate(conn: H2ClientConnection) -> bytes:
    return conn.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)


async def test_certificates_rotate_without_a_restart(pki, tmp_path):
    files = {}
    for name, src in (("cert", pki.server_cert), ("key", pki.server_key), ("ca", pki.ca),
                      ("fp_cert", pki.front_proxy_cert), ("fp_key", pki.front_proxy_key)):
        files[name] = tmp_path / src.name
        shutil.copy(src, files[name])
    s = await TLSStack(pki, files).start()
    try:
        old = await s.h2(pki.kubelet_cert, pki.kubelet_key)
        assert served_certificate(old) == der(pki.server_cert)
        assert s.serving.refresh() is None  # nothing changed

        # serving certificate and key replaced in place (cert-manager style)
        new_cert, new_key = sign(pki, tmp_path, "renewed", "/CN=kube-apiserver")
        shutil.copy(new_cert, files["cert"])
        shutil.copy(new_key, files["key"])
        assert s.serving.refresh() is True
        new = await s.h2(pki.kubelet_cert, pki.kubelet_key)
        assert served_certificate(new) == der(new_cert)
        assert (await h2_get(old, "/api/v1/nodes")).status == 200  # the old one keeps working
        new.close()

        # a half-written file is refused; the last good one keeps serving
        files["cert"].write_text("-----BEGIN CERTIFICATE-----\ntruncated")
        assert s.serving.refresh() is False
        again = await s.h2(pki.kubelet_cert, pki.kubelet_key)
        assert served_certificate(again) == der(new_cert)
        again.close()
        shutil.copy(new_cert, files["cert"])

        # the client CA rotates too: the foreign CA's client is now in, the node is out
        shutil.copy(pki.file("foreign-ca.crt"), files["ca"])
        assert s.serving.refresh() is True
        mallory = await s.h2(pki.foreign_cert, pki.foreign_key)
        mallory.close()
        with pytest.raises(ConnectError):
            await s.h2(pki.kubelet_cert, pki.kubelet_key)

        # upstream: the front-proxy certificate is re-read; new connections present it.
        # This one's CN is not an allowed front-proxy name, so the groups now refuse it.
        bad_cert, bad_key = sign(pki, tmp_path, "rogue", "/CN=not-the-front-proxy",
                                 ca="front-proxy-ca")
        shutil.copy(bad_cert, files["fp_cert"])
        shutil.copy(bad_key, files["fp_key"])
        assert s.gateway.upstreams.tls.refresh() is True
        for endpoint in s.gateway.upstreams.groups["pod"]:
            if endpoint._connecting is not None:  # a probe's connect begun with the old
                await asyncio.wait([endpoint._connecting])  # certificate: close it too
            for c in endpoint.connections:
                c.close()
        got = await h2_get(old, "/api/v1/namespaces/default/pods")
        assert got.status == 401
        assert s.last("/namespaces/default/pods")["unauthorized"]
        old.close()
    finally:
        await s.close()


def test_token_file_and_sim_security_flags(pki):
    """The simulator's kube-apiserver-style flags build what the tests above rely on."""
    security = SimSecurity(str(pki.server_cert), str(pki.server_key), str(pki.ca),
                           str(pki.front_proxy_ca), ("front-proxy-client",), str(pki.tokens))
    auth = security.authenticator()
    assert auth.tokens["token-ci"].username == "ci-bot"
    anonymous = auth.authenticate(None, None, [])
    assert (anonymous.username, anonymous.groups) == ("system:anonymous", ("system:unauthenticated",))
    # a front-proxy certificate whose CN is not allowed is an error, not anonymous
    rogue = {"subject": ((("commonName", "x"),),),
             "issuer": decoded(pki.front_proxy_ca)["subject"]}
    with pytest.raises(Unauthorized, match="not an allowed name"):
        auth.authenticate(rogue, b"der", [("x-remote-user", "admin")])
    assert json.loads(json.dumps(anonymous.as_json()))["username"] == "system:anonymous"


async def test_a_client_that_never_finishes_the_tls_handshake_is_dropped(pki):
    s = await TLSStack(pki).start("limits: {tlsHandshakeTimeoutSeconds: 0.3}\n")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        conn = await s.h2(pki.kubelet_cert, pki.kubelet_key)  # others still get in
        assert (await h2_get(conn, "/api/v1/nodes")).status == 200
        conn.close()
    finally:
        await s.close()


async def test_health_probes_pass_a_front_proxy_authenticating_apiserver(stack):
    """Sent bare with the front-proxy certificate, a probe would get kube-apiserver's 401
    and every endpoint would look down; it says it is anonymous instead."""
    for endpoint in stack.gateway.upstreams.groups["default"]:
        assert await endpoint.probe(5) is True
    entry = stack.last("/readyz")
    assert entry["authenticator"] == "requestheader"
    assert entry["user"] == {"username": "system:anonymous", "groups": ["system:unauthenticated"]}
