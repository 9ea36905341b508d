"""The gateway: every request is parsed, routed and handed to an Exchange.

`Gateway.handle` is the stream handler both HTTP versions call. It reads the config
snapshot once, so a reload never changes a request's decision half-way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from aiohttp import web

from kom_gateway.config import ConfigError, load_config_file
from kom_gateway.config.holder import ConfigHolder, ReloadResult
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.identity import PeerIdentity
from kom_gateway.kubestatus import status_body
from kom_gateway.proxy.exchange import Exchange
from kom_gateway.proxy.headers import status_headers
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.upgrade import handle_upgrade
from kom_gateway.proxy.upstreams import UpstreamEndpoint, Upstreams
from kom_gateway.requestinfo import parse_request
from kom_gateway.routing.cutover import Client

log = logging.getLogger(__name__)
CLIENT_CACHE_SIZE = 16384


class Gateway:
    def __init__(self, holder: ConfigHolder, metrics: Metrics | None = None) -> None:
        self.holder = holder
        self.metrics = metrics or Metrics()
        self.upstreams = Upstreams(self._health_changed)
        self.upstreams.sync(holder.current.config)
        self.metrics.config_generation.set(holder.current.generation)
        self._clients: dict[tuple[bytes, str, bytes], Client] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, stream: ServerStream) -> None:
        active = self.holder.current
        info = parse_request(stream.method, stream.target)
        if info.bad_target:
            body = status_body(400, "BadRequest", f"malformed request target: {info.malformed}")
            stream.start_response(400, status_headers(body))
            stream.write(body)
            stream.end()
            self.metrics.requests.labels("none", info.verb, "", "400").inc()
            return
        decision = active.router.decide(
            info, self.client_for(stream.headers, stream.remote_addr, stream.peer)
        )
        exchange = Exchange(self, stream, info, decision, active)
        task = asyncio.get_running_loop().create_task(exchange.run())
        exchange.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def client_for(self, headers: Headers, remote_addr: str, peer: PeerIdentity | None) -> Client:
        """Who is asking, for the cut-over bucket; cached (its bucket and rule memoised)."""
        user_agent = b""
        authorization = b""
        for name, value in headers:
            if name == b"user-agent":
                user_agent = value
            elif name == b"authorization":
                authorization = value
        key = (authorization, peer.key if peer else remote_addr, user_agent)
        client = self._clients.get(key)
        if client is None:
            client = _new_client(remote_addr, peer, user_agent, authorization)
            if len(self._clients) >= CLIENT_CACHE_SIZE:
                self._clients.clear()
            self._clients[key] = client
        return client

    async def upgrade(self, request: web.BaseRequest) -> web.StreamResponse:
        return await handle_upgrade(self, request)

    def reload(self, path: str) -> ReloadResult:
        """Re-read `path`; a config that fails validation, or whose TLS files cannot be
        loaded, is refused and the last good one keeps serving."""
        try:
            config = load_config_file(path)
            self.upstreams.sync(config)  # raises before changing anything
        except ConfigError as exc:
            result = self.holder.refuse(exc)
        else:
            result = self.holder.apply(config)
        if result.applied:
            self.metrics.config_reloads.labels("applied").inc()
            self.metrics.config_generation.set(result.generation)
            log.info("configuration generation %d applied from %s", result.generation, path)
        else:
            self.metrics.config_reloads.labels("rejected").inc()
            assert result.error is not None
            log.error(
                "configuration rejected, still serving generation %d:\n%s",
                result.generation,
                result.error.render(),
            )
        return result

    def _health_changed(self, endpoint: UpstreamEndpoint, healthy: bool) -> None:
        self.metrics.endpoint_healthy.labels(endpoint.group, endpoint.name).set(1 if healthy else 0)

    async def close(self) -> None:
        await self.upstreams.close()


def _new_client(
    remote_addr: str, peer: PeerIdentity | None, user_agent: bytes, authorization: bytes
) -> Client:
    """The cut-over key: the verified certificate's identity (what the apiserver will
    authenticate), else a digest of the bearer token, else the address."""
    ua = user_agent.decode("latin-1")
    if peer is not None:
        return Client(ua, peer.key, remote_addr, peer.user, peer.groups)
    if authorization[:7].lower() == b"bearer ":
        digest = hashlib.sha256(authorization[7:].strip()).hexdigest()[:32]
        return Client(ua, f"token:{digest}", remote_addr)
    return Client(ua, "", remote_addr)
