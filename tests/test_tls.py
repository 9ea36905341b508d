"""TLS on both sides: clients reach the gateway over TLS (ALPN picks h2 or http/1.1), and
the gateway reaches TLS apiservers, verifying them against the configured CA, for
HTTP/2 requests and for Upgrade (exec) connections alike."""

import asyncio
import json
import shutil
import ssl
import subprocess

import aiohttp
import pytest
from harness import GROUPS, config_text

from kom_gateway.config import ConfigHolder, load_config_text
from kom_gateway.http.listener import Listener
from kom_gateway.proxy.gateway import Gateway
from kom_gateway.server.tlsfiles import server_ssl_context
from kom_gateway.sim.server import Simulator

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


CUTOVER = "cutover:\n  - percent: {pod: 100, config: 100, event: 100}\n"


async def test_tls_downstream_and_upstream(tmp_path, pki):
    ca, cert, key = pki.ca, pki.server_cert, pki.server_key
    sim = Simulator(ssl_context=server_ssl_context(str(cert), str(key), None))
    for name in GROUPS:
        await sim.add_group(name, "127.0.0.1", 0)
    ports = {name: g.port for name, g in sim.groups.items()}
    text = config_text(ports, CUTOVER, f"upstream: {{tls: {{caFile: {ca}}}}}\n")
    config = load_config_text(text.replace("http://", "https://"))
    gateway = Gateway(ConfigHolder(config))
    listener = Listener(gateway.intake.handle, None,
                        ssl_context=server_ssl_context(str(cert), str(key), None))
    port = await listener.start("127.0.0.1", 0)
    try:
        # HTTP/2 over TLS (ALPN h2), routed to the pod group over TLS upstream
        curl = shutil.which("curl")
        if curl:
            out = await asyncio.to_thread(subprocess.run, [
                curl, "-s", "--http2", "--cacert", str(ca), "-w", "\\n%{http_version}", "-D", "-",
                f"https://127.0.0.1:{port}/api/v1/namespaces/default/pods"],
                capture_output=True, text=True, timeout=30, check=True)
            assert out.stdout.rstrip().endswith("\n2")
            assert "x-kom-sim-group: pod" in out.stdout
        # HTTP/1.1 over TLS (ALPN http/1.1) and a WebSocket exec through the Upgrade path
        context = ssl.create_default_context(cafile=str(ca))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            base = f"https://127.0.0.1:{port}"
            pod = {"metadata": {"name": "tls"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
            async with session.post(f"{base}/api/v1/namespaces/default/pods", json=pod) as r:
                assert (r.status, r.version.minor, r.headers["X-Kom-Sim-Group"]) == (201, 1, "pod")
            async with session.ws_connect(
                f"{base}/api/v1/namespaces/default/pods/tls/exec?command=echo&command=over-tls"
                "&stdout=true", protocols=("v5.channel.k8s.io",)) as ws:
                stdout = await ws.receive_bytes(timeout=10)
                status = await ws.receive_bytes(timeout=10)
            assert stdout == b"\x01over-tls\n"
            assert json.loads(status[1:])["status"] == "Success"
        # the upstream really was verified: trusting another CA, the probe fails
        other_ca = pki.file("foreign-ca.crt")
        bad = Gateway(ConfigHolder(load_config_text(
            text.replace("http://", "https://").replace(f"caFile: {ca}", f"caFile: {other_ca}"))))
        assert await bad.upstreams.groups["pod"][0].probe(2) is False
        await bad.close()
        # and a reload naming an unusable CA file is refused; the last good keeps serving
        reloaded = tmp_path / "reload.yaml"
        reloaded.write_text(text.replace("http://", "https://").replace(f"caFile: {ca}", "caFile: /dev/null"))
        result = await gateway.reload(str(reloaded))
        assert not result.applied and "upstream.tls.caFile: /dev/null: not a regular file" in result.error.render()
        assert gateway.holder.current.generation == 1
    finally:
        await listener.close()
        gateway.abort_all()
        await gateway.close()
        await sim.close()


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
               session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory, then the client reads what followed it (tickets)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    client = client_context.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    done = set()
    while len(done) < 2:
        for name, side in (("client", client), ("server", server)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    with pytest.raises(ssl.SSLWantReadError):
        client.read()  # takes in the tickets, if any
    return client, server


@pytest.mark.parametrize("tickets", [0, 1])
def test_session_tickets_are_sent_only_when_configured(pki, tickets):
    """Kubernetes clients never resume, so by default no ticket is written; with
    sessionTickets a client that resumes does, and keeps its certificate's identity."""
    server_context = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca),
                                        tickets)
    client_context = ssl.create_default_context(cafile=str(pki.ca))
    client_context.load_cert_chain(str(pki.file("kubelet.crt")), str(pki.file("kubelet.key")))
    client, server = _handshake(server_context, client_context)
    assert client.version() == "TLSv1.3"
    assert client.session.has_ticket is bool(tickets)
    client, server = _handshake(server_context, client_context, client.session)
    assert client.session_reused is bool(tickets)
    assert dict(x[0] for x in server.getpeercert()["subject"])["commonName"] == "system:node:node-1"
