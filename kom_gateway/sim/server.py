"""Serving simulated apiserver groups: one port per group, one shared store.

Each group answers HTTP/2 (h2c) and HTTP/1.1 on its port, names itself in the
`X-Kom-Sim-Group` response header, counts what it served, and has fault switches. A
control API (JSON over HTTP on its own port) lets tests and the demo flip faults and
read counters and the request log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from kom_gateway import compat
from kom_gateway.http import engine as engines
from kom_gateway.http.guard import UNGUARDED
from kom_gateway.http.h1.server import request_tls
from kom_gateway.http.listener import Listener
from kom_gateway.http.serverconn import HTTP2ServerStream
from kom_gateway.http.settings import H2ServerSettings
from kom_gateway.http.stream import BodyTooLarge, ServerStream, StreamClosed
from kom_gateway.http.transport import REFUSED_STREAM
from kom_gateway.kube.requestinfo import RequestInfo, parse_request
from kom_gateway.sim.api import (
    ExecReply,
    LogReply,
    Reply,
    SimAPI,
    SimRequest,
    WatchReply,
    is_probe,
    status_reply,
)
from kom_gateway.sim.auth import ANONYMOUS, UNAUTHENTICATED, Authenticator, Unauthorized, UserInfo
from kom_gateway.sim.faults import Faults
from kom_gateway.sim.store import ApiError, Store, WatchEvent

log = logging.getLogger(__name__)
GROUP_HEADER = "x-kom-sim-group"
MAX_BODY = 3 * 1024 * 1024
MAX_WATCH_BACKLOG = 10000  # events queued for one slow watcher before it is dropped


def served_key(info: RequestInfo) -> str:
    """How a served request is counted: `list pods`, `get pods/log` (kubectl logs)."""
    what = info.resource or info.path
    if info.subresource:
        what += f"/{info.subresource}"
    return f"{info.verb} {what}"


@dataclass
class SimGroup:
    name: str
    host: str
    port: int
    listener: Listener | None = None
    down: bool = False
    faults: Faults = field(default_factory=Faults)
    served: Counter[str] = field(default_factory=Counter)  # "verb resource" -> count
    _slots: tuple[int, asyncio.Semaphore] | None = None

    async def wait_latency(self, queued: bool = True) -> None:
        """The answer's latency; with `capacity`, only that many requests are in it at
        once and the rest queue, so latency grows with load as on a saturated apiserver.
        Not `queued` (health probes): the latency alone, as APF exempts the probes (the
        `probes` flow schema), so a saturated apiserver still answers its readyz."""
        faults = self.faults
        if not faults.capacity or not queued:
            await asyncio.sleep(faults.latency)
            return
        if self._slots is None or self._slots[0] != faults.capacity:
            self._slots = (faults.capacity, asyncio.Semaphore(faults.capacity))
        async with self._slots[1]:
            await asyncio.sleep(faults.latency)


class Simulator:
    def __init__(
        self,
        store: Store | None = None,
        bookmark_interval: float = 1.0,
        h2_settings: H2ServerSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.authenticator = authenticator  # None: everyone is anonymous (plaintext demo)
        # e.g. a small MAX_CONCURRENT_STREAMS. Like kube-apiserver (Go's server), no
        # frame-rate budgets and no stalled-reader cut-off: the gateway's upstream
        # connections carry many clients' resets and slow readers.
        self.h2_settings = replace(
            h2_settings or H2ServerSettings(), guard=UNGUARDED, stalled_write_timeout=0
        )
        # the h2 engine, as kube-apiserver: a header field may be as long as the whole
        # header list allows (nghttp2 caps one field at 64 KiB; Go does not)
        self.engine = engines.select("h2")
        self.ssl_context = ssl_context  # serve the groups over TLS (ALPN h2, http/1.1)
        self.store = store or Store()
        self.api = SimAPI(self.store, bookmark_interval)
        self.groups: dict[str, SimGroup] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=5000)
        self.request_count = 0
        self._control: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------
    async def add_group(self, name: str, host: str, port: int) -> SimGroup:
        group = SimGroup(name, host, port)
        self.groups[name] = group
        await self._listen(group)
        return group

    async def _listen(self, group: SimGroup) -> None:
        listener = Listener(
            lambda stream: self._spawn(group, stream),
            lambda request: self._upgrade(group, request),
            self.h2_settings,
            self.ssl_context,
            engine=self.engine,
        )
        group.port = await listener.start(group.host, group.port)
        group.listener = listener
        group.down = False

    async def set_down(self, name: str, down: bool) -> None:
        """Down: the port stops accepting and every connection is cut (a crashed apiserver)."""
        group = self.groups[name]
        if down and not group.down:
            group.down = True
            listener, group.listener = group.listener, None
            if listener is not None:
                await listener.abort()
        elif not down and group.down:
            await self._listen(group)

    async def start_control(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/groups", self._ctl_groups)
        app.router.add_put("/groups/{name}/faults", self._ctl_faults)
        app.router.add_post("/groups/{name}/down", self._ctl_down)
        app.router.add_post("/groups/{name}/up", self._ctl_up)
        app.router.add_get("/requests", self._ctl_requests)
        app.router.add_post("/reset", self._ctl_reset)
        self._control = web.AppRunner(app, access_log=None)
        await self._control.setup()
        site = web.TCPSite(self._control, host, port)
        await site.start()
        return int(compat.site_sockets(site)[0].getsockname()[1])

    async def close(self) -> None:
        for group in self.groups.values():
            if group.listener is not None:
                await group.listener.close()
        for task in list(self._tasks):
            task.cancel()
        if self._control is not None:
            await self._control.cleanup()

    # -- serving -------------------------------------------------------------------------
    def _spawn(self, group: SimGroup, stream: ServerStream) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(group, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _authenticate(
        self, ssl_object: ssl.SSLObject | None, headers: list[tuple[str, str]]
    ) -> UserInfo | Reply:
        """Who the request is, as kube-apiserver would decide; a 401 reply if nobody."""
        if self.authenticator is None:
            return UserInfo(ANONYMOUS, (UNAUTHENTICATED,), authenticator="anonymous")
        cert = (ssl_object.getpeercert() or None) if ssl_object is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            return self.authenticator.authenticate(cert, der, headers)
        except Unauthorized as exc:
            log.info("401: %s", exc)
            return status_reply(401, "Unauthorized", "Unauthorized")

    def _record(
        self,
        group: SimGroup,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        user: UserInfo | Reply,
    ) -> None:
        self.request_count += 1
        entry: dict[str, Any] = {
            "seq": self.request_count,
            "group": group.name,
            "method": method,
            "target": target,
            "remoteGroups": [],
            "headerNames": [name for name, _ in headers],
        }
        if isinstance(user, UserInfo):
            entry["user"] = user.as_json()
            entry["authenticator"] = user.authenticator
        else:
            entry["unauthorized"] = True
        for name, value in headers:
            if name == "user-agent":
                entry["userAgent"] = value
            elif name == "x-remote-user":
                entry["remoteUser"] = value
            elif name == "x-remote-group":
                entry["remoteGroups"].append(value)
            elif name == "authorization":
                entry["authorization"] = value.split(" ")[0]
            elif name.startswith("x-remote-extra-"):
                entry.setdefault("remoteExtra", {})[name[len("x-remote-extra-") :]] = value
            elif name.startswith("impersonate-"):
                entry.setdefault("impersonate", {})[name] = value
        self.requests.append(entry)

    async def _serve(self, group: SimGroup, stream: ServerStream) -> None:
        headers = [(n.decode("latin-1"), v.decode("utf-8", "replace")) for n, v in stream.headers]
        user = self._authenticate(stream.ssl_object, headers)
        self._record(group, stream.method, stream.target, headers, user)
        faults = group.faults
        try:
            if isinstance(user, Reply):
                self._reply(group, stream, user)
                return
            if (
                faults.goaway_chance
                and isinstance(stream, HTTP2ServerStream)
                and random.random() < faults.goaway_chance
            ):
                stream.connection.goaway(two_phase=False)  # as Go's server does
            if faults.refuse_streams and isinstance(stream, HTTP2ServerStream):
                stream.connection.reset_stream(stream.stream_id, REFUSED_STREAM)
                return
            info = parse_request(stream.method, stream.target)
            if faults.latency:
                await group.wait_latency(queued=not is_probe(info))
            try:
                body = await stream.read_body(MAX_BODY)
            except BodyTooLarge:
                self._reply(
                    group,
                    stream,
                    status_reply(413, "RequestEntityTooLarge", "request body too large"),
                )
                return
            if faults.reset_before_headers:
                stream.reset()
                return
            request = SimRequest(stream.method, stream.target, {}, body, user=user)
            for name, value in headers:
                request.headers.setdefault(name, value)
                if name == "x-remote-group":
                    request.remote_groups.append(value)
            is_resource = info.is_resource_request
            if faults.readyz_status and info.path.rstrip("/") == "/readyz":
                reply: Any = Reply(
                    faults.readyz_status,
                    b"[-]etcd failed: reason withheld\nreadyz check failed",
                    "text/plain; charset=utf-8",
                )
            elif faults.status_override and is_resource:
                reply = status_reply(
                    faults.status_override, "InternalError", "simulated failure (status override)"
                )
            elif faults.throttle and is_resource and random.random() < faults.throttle:
                reply = status_reply(429, "TooManyRequests", "simulated overload")
                reply.headers.append(("retry-after", str(faults.retry_after)))
            else:
                reply = self.api.handle(request, info, faults)
            await self._answer(group, stream, info, reply)
        except StreamClosed:
            pass
        except Exception:
            log.exception("simulator failed on %s %s", stream.method, stream.target)
            stream.reset()

    async def _answer(
        self, group: SimGroup, stream: ServerStream, info: RequestInfo, reply: Any
    ) -> None:
        group.served[served_key(info)] += 1
        if isinstance(reply, Reply):
            read = info.verb in ("get", "list") and info.is_resource_request
            self._reply(
                group,
                stream,
                reply,
                reset_after_half=group.faults.reset_mid_body and read,
                reset_after_headers=group.faults.reset_after_headers and read,
            )
        elif isinstance(reply, WatchReply):
            await self._watch(group, stream, reply)
        elif isinstance(reply, LogReply):
            await self._log(group, stream, reply)
        elif isinstance(reply, ExecReply):
            self._reply(
                group,
                stream,
                status_reply(
                    400,
                    "BadRequest",
                    "exec needs an HTTP/1.1 Upgrade (WebSocket v5.channel.k8s.io)",
                ),
            )

    def _headers(
        self, group: SimGroup, content_type: str, extra: list[tuple[str, str]]
    ) -> list[tuple[bytes, bytes]]:
        out = [
            (b"content-type", content_type.encode()),
            (GROUP_HEADER.encode(), group.name.encode()),
            (b"cache-control", b"no-cache, private"),
        ]
        out += [(n.encode(), v.encode()) for n, v in extra]
        return out

    def _reply(
        self,
        group: SimGroup,
        stream: ServerStream,
        reply: Reply,
        reset_after_half: bool = False,
        reset_after_headers: bool = False,
    ) -> None:
        headers = self._headers(group, reply.content_type, reply.headers)
        headers.append((b"content-length", str(len(reply.body)).encode()))
        if stream.method == "HEAD":
            stream.start_response(reply.status, headers, end_stream=True)
            return
        stream.start_response(reply.status, headers)
        if reset_after_headers:
            stream.reset()
            return
        if reset_after_half and len(reply.body) > 1:
            stream.write(reply.body[: len(reply.body) // 2], stream.reset)
            return
        stream.write(reply.body)
        stream.end()

    async def _watch(self, group: SimGroup, stream: ServerStream, reply: WatchReply) -> None:
        queue: deque[bytes] = deque()
        wakeup = asyncio.Event()
        overflow = False

        def deliver(event: WatchEvent) -> None:
            nonlocal overflow
            if len(queue) >= MAX_WATCH_BACKLOG:
                overflow = True  # kube-apiserver also drops watchers that cannot keep up
            else:
                line = (
                    self.api.watch_event_line(event.type, event.obj, True)
                    if reply.as_table
                    else event.line
                )
                queue.append(line)
            wakeup.set()

        stream.start_response(200, self._headers(group, "application/json", []))
        try:
            watcher = self.store.watch(
                reply.rt, reply.namespace, reply.since_rv, reply.predicate, deliver
            )
        except ApiError as exc:  # 410: still a 200, with one ERROR event (notes §8)
            await stream.send(self.api.expired_line(exc.message))
            stream.end()
            return
        stream.on_closed(wakeup.set)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + reply.timeout if reply.timeout else None
        if reply.send_initial_events and reply.bookmarks:
            queue.append(self.api.bookmark(reply.rt, initial_events_end=True))
        first = True
        try:
            while not stream.closed and not overflow:
                if queue:
                    batch = b"".join(queue)
                    queue.clear()
                    if first and group.faults.reset_mid_event:
                        line = batch.find(b"\n") + 1 or len(batch)
                        await stream.send(batch[: max(1, line // 2)])
                        stream.reset()
                        return
                    await stream.send(batch)
                    if first and group.faults.reset_mid_body:
                        stream.reset()
                        return
                    first = False
                    continue
                wait = self.api.bookmark_interval if reply.bookmarks else 3600.0
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        break
                wakeup.clear()
                try:
                    async with asyncio.timeout(wait):
                        await wakeup.wait()
                except TimeoutError:
                    if reply.bookmarks and not queue:
                        queue.append(self.api.bookmark(reply.rt))
            stream.end()
        finally:
            watcher.stop()

    async def _log(self, group: SimGroup, stream: ServerStream, reply: LogReply) -> None:
        name = reply.pod["metadata"]["name"]
        stream.start_response(200, self._headers(group, "text/plain", []))
        for i in range(3):
            await stream.send(f"{name}: log line {i}\n".encode())
            if group.faults.reset_mid_body:
                stream.reset()
                return
        i = 3
        while reply.follow and not stream.closed:
            await asyncio.sleep(0.5)
            await stream.send(f"{name}: log line {i}\n".encode())
            i += 1
        stream.end()

    # -- exec over WebSocket (HTTP/1.1 upgrade) ------------------------------------------
    async def _upgrade(self, group: SimGroup, request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k.lower(), v) for k, v in request.headers.items()]
        user = self._authenticate(request_tls(request)[0], headers)
        self._record(group, request.method, request.raw_path, headers, user)
        reply = (
            user
            if isinstance(user, Reply)
            else self.api.handle(
                SimRequest(
                    request.method,
                    request.raw_path,
                    {k: v for k, v in reversed(headers)},
                    user=user,
                )
            )
        )
        group.served[f"exec {request.path}"] += 1
        if (
            not isinstance(reply, ExecReply)
            or request.headers.get("Upgrade", "").lower() != "websocket"
        ):
            status = (
                reply
                if isinstance(reply, Reply)
                else status_reply(
                    400, "BadRequest", "only WebSocket exec (v5.channel.k8s.io) is simulated"
                )
            )
            return web.Response(
                status=status.status,
                body=status.body,
                content_type="application/json",
                headers={GROUP_HEADER: group.name},
            )
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        ws.headers[GROUP_HEADER] = group.name
        await ws.prepare(request)
        command = reply.command
        if command[:1] == ["cat"] and reply.stdin:
            async for message in ws:  # echo stdin (channel 0) to stdout (channel 1)
                if message.type != WSMsgType.BINARY or not message.data:
                    break
                channel, payload = message.data[0], message.data[1:]
                if channel == 0:
                    await ws.send_bytes(b"\x01" + payload)
                elif channel == 255:  # v5: the client closed stdin
                    break
        else:
            text = " ".join(command[1:]) if command[:1] == ["echo"] else f"sim ran {command}"
            await ws.send_bytes(b"\x01" + text.encode() + b"\n")
        await ws.send_bytes(b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode())
        await ws.close()
        return ws

    # -- control API ---------------------------------------------------------------------
    def _group(self, request: web.Request) -> SimGroup:
        name = request.match_info["name"]
        if name not in self.groups:
            raise web.HTTPNotFound(text=f"no group {name!r}")
        return self.groups[name]

    async def _ctl_groups(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                name: {
                    "port": g.port,
                    "down": g.down,
                    "faults": asdict(g.faults),
                    "served": dict(g.served),
                    "total": sum(g.served.values()),
                }
                for name, g in self.groups.items()
            }
        )

    async def _ctl_faults(self, request: web.Request) -> web.Response:
        group = self._group(request)
        try:
            group.faults.update(await request.json())
        except (ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(asdict(group.faults))

    async def _ctl_down(self, request: web.Request) -> web.Response:
        await self.set_down(self._group(request).name, True)
        return web.json_response({"down": True})

    async def _ctl_up(self, request: web.Request) -> web.Response:
        await self.set_down(self._group(request).name, False)
        return web.json_response({"down": False})

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        since = int(dict(parse_qsl(request.query_string)).get("since", "0"))
        return web.json_response([r for r in self.requests if r["seq"] > since])

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        for group in self.groups.values():
            group.served.clear()
            group.faults = Faults()
            if group.down:
                await self.set_down(group.name, False)
        return web.json_response({"reset": True})
