"""The engine seam (kom_gateway/http/events.py): both HTTP/2 engines say the same thing
for the same frames, the shared connection classes act on it in one place, and the
nghttp2 binding calls no private Python (it only gathers; its stub is what the type
checker and the compiled core's build see)."""

from __future__ import annotations

import ast
import inspect
import logging
import os
import re
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import PriorityFrame, WindowUpdateFrame

from kom_gateway.http import engine as engines
from kom_gateway.http import events as ev
from kom_gateway.http.events import Event
from kom_gateway.http.h2.conn import engine_events, make_connection, split_request
from kom_gateway.http.settings import H2ClientSettings

HTTP = Path(__file__).resolve().parent.parent / "kom_gateway" / "http" / "nghttp2"
BUILT = engines.nghttp2_missing() is None
needs_nghttp2 = pytest.mark.skipif(
    not BUILT and not os.environ.get("KOM_REQUIRE_CLIENTS"), reason="nghttp2 engine not built"
)
FIELDS = ("kind", "stream_id", "end_stream", "headers", "method", "path", "authority",
          "status", "data", "flow_len", "error_code", "last_stream_id")  # fmt: skip
REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"gw"),
           (b":path", b"/api/v1/namespaces/default/configmaps"), (b"user-agent", b"t/1")]  # fmt: skip


def _record(event: object) -> tuple:
    return tuple(getattr(event, name) for name in FIELDS)


def _h2_request(event: h2.events.RequestReceived) -> Event:
    method, path, authority, regular = split_request(event.headers)
    return Event(ev.HEADERS, event.stream_id, end_stream=event.stream_ended is not None,
                 headers=regular, method=method, path=path, authority=authority)  # fmt: skip


def _client_frames() -> list[bytes]:
    """What a client sends, one read each: preface, requests with and without a body,
    an empty DATA frame, window updates, PING, SETTINGS, PRIORITY, a reset, GOAWAY."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    reads = [c.data_to_send()]
    c.send_headers(1, REQUEST, end_stream=True)
    c.send_headers(3, REQUEST)
    c.send_data(3, b"x" * 1000)
    c.send_data(3, b"")
    c.send_data(3, b"y" * 10, end_stream=True)
    reads.append(c.data_to_send())
    c.send_headers(5, REQUEST)
    reads.append(c.data_to_send())
    reads.append(WindowUpdateFrame(0, window_increment=1000).serialize())
    c.ping(b"12345678")
    c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 50})
    reads.append(c.data_to_send())
    reads.append(PriorityFrame(7, depends_on=0, stream_weight=16).serialize())
    c.reset_stream(5, 8)
    c.close_connection(0, b"bye")
    reads.append(c.data_to_send())
    return reads


def _server_frames(request_bytes: bytes) -> list[bytes]:
    """What an apiserver answers to the client's first request on stream 1 and 3:
    a 100 Continue then a response with a body and trailers; a headers-only 404; a
    reset; PING ACK; GOAWAY."""
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    s.initiate_connection()
    s.receive_data(request_bytes)
    reads = [s.data_to_send()]
    s.send_headers(1, [(b":status", b"100")])
    s.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/json")])
    s.send_data(1, b"{}" * 100)
    s.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    s.send_headers(3, [(b":status", b"404")], end_stream=True)
    reads.append(s.data_to_send())
    s.reset_stream(5, 2)
    s.increment_flow_control_window(5000)
    s.close_connection(0, b"restart", last_stream_id=5)
    reads.append(s.data_to_send())
    return reads


@needs_nghttp2
def test_the_engines_say_the_same_thing_for_the_same_client_frames():
    from kom_gateway.http.nghttp2 import _nghttp2 as ng

    ng_server = ng.Session(True)
    ng_server.submit_settings(())
    h2_server = make_connection(client_side=False, max_concurrent_streams=100,
                                initial_window=65535, validate_inbound=False)  # fmt: skip
    h2_server.initiate_connection()
    seen: set[int] = set()
    for read in _client_frames():
        ours = [_record(e) for e in ng_server.receive(read)]
        theirs = [_record(e) for e in engine_events(h2_server.receive_data(read), _h2_request)]
        assert ours == theirs, read
        seen |= {r[0] for r in ours}
    assert seen == set(ev.NAMES) - {ev.PING_ACK}  # (a server's PING ACK: the next test)


@needs_nghttp2
def test_the_engines_say_the_same_thing_for_the_same_server_frames():
    from kom_gateway.http.nghttp2 import _nghttp2 as ng

    get = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    ng_client = ng.Session(False)
    ng_client.submit_settings(())
    h2_client = make_connection(client_side=True, max_concurrent_streams=100,
                                initial_window=65535, validate_inbound=False)  # fmt: skip
    h2_client.initiate_connection()
    for sid in (1, 3, 5):
        assert ng_client.request(get, True) == sid
        h2_client.send_headers(sid, get, end_stream=True)
    ng_reads = _server_frames(ng_client.send())
    h2_reads = _server_frames(h2_client.data_to_send())
    seen: set[int] = set()
    for ng_read, h2_read in zip(ng_reads, h2_reads, strict=True):
        ours = [_record(e) for e in ng_client.receive(ng_read)]
        theirs = [_record(e) for e in engine_events(h2_client.receive_data(h2_read))]
        # a stream that ends is closed by nghttp2 (CLOSE, code 0); h2 has no such event
        ours = [r for r in ours if not (r[0] == ev.CLOSE and r[10] == 0)]
        assert ours == theirs
        seen |= {r[0] for r in ours}
    assert {ev.HEADERS, ev.DATA, ev.END, ev.CLOSE, ev.GOAWAY, ev.SETTINGS} <= seen


def test_the_binding_calls_no_private_python():
    """It gathers; Python decides. The only calls up are `on_flushed` callbacks."""
    source = (HTTP / "_nghttp2.pyx").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    private_calls = {
        m.group(0) for m in re.finditer(r"\b(\w+)\._(?!_)\w*\s*\(", code) if m.group(1) != "self"
    }
    assert private_calls == set()
    assert "owner" not in code and "dispatch" not in code


@needs_nghttp2
def test_the_stub_matches_the_built_binding():
    from kom_gateway.http.nghttp2 import _nghttp2 as ng

    stub = ast.parse((HTTP / "_nghttp2.pyi").read_text())
    events_seen = False
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(ng, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
        elif isinstance(node, ast.Assign) and ast.unparse(node) == "Event = EngineEvent":
            assert all(hasattr(ng.Event, name) for name in FIELDS)  # the stub's Event is
            events_seen = True  # the vocabulary's, and the binding's has every field
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "Header") != "Header":
            assert isinstance(getattr(ng, node.target.id), int), node.target.id
    assert events_seen


def test_the_python_event_has_every_field_of_the_vocabulary():
    assert tuple(inspect.signature(Event).parameters) == FIELDS
    assert _record(Event(ev.DATA, 3, data=b"x", flow_len=1))[:3] == (ev.DATA, 3, False)
    assert set(ev.NAMES) == set(range(1, len(ev.NAMES) + 1))


ENGINES = [engines.select(name) for name in ("h2", "nghttp2") if name == "h2" or BUILT]


@pytest.mark.parametrize("base", [e.server for e in ENGINES], ids=lambda c: c.engine)
def test_one_events_failure_does_not_drop_the_rest_server_side(base, caplog):
    """A bug handling one stream's event is logged; the events after it, the close of
    another stream included, are still acted on (both engines: one loop)."""

    class Broken:  # an event whose handling fails (as a bug would) half-way
        kind, stream_id = ev.HEADERS, 1

        @property
        def headers(self):
            raise RuntimeError("a bug in one stream's handling")

    started: list[int] = []
    conn = base(lambda stream: started.append(stream.stream_id))
    conn._start()
    request = {"method": "GET", "path": "/", "authority": "a", "headers": []}
    with caplog.at_level(logging.ERROR):
        conn._handle([
            Broken(),
            Event(ev.HEADERS, 3, end_stream=True, **request),
            Event(ev.CLOSE, 3),
        ])  # fmt: skip
    assert started == [3] and 3 not in conn.streams  # handled, then forgotten
    assert "handling HTTP/2 HEADERS" in caplog.text and "one stream's handling" in caplog.text


@pytest.mark.parametrize("base", [e.server for e in ENGINES], ids=lambda c: c.engine)
def test_budgets_are_charged_in_one_place_for_both_engines(base):
    """A flood of PINGs as events cuts the client off at its budget, whatever the engine;
    nothing after the cut-off is served."""
    from kom_gateway.http.guard import PING_FLOOD, GuardLimits
    from kom_gateway.http.settings import H2ServerSettings

    reports: list[str] = []
    started: list[int] = []
    settings = H2ServerSettings(guard=GuardLimits(pings=(5, 0.001)))
    conn = base(lambda s: started.append(s.stream_id), settings, on_abuse=reports.append)
    conn._start()
    conn._handle([*(Event(ev.PING) for _ in range(6)),
                  Event(ev.HEADERS, 1, headers=[], method="GET", path="/", end_stream=True)])  # fmt: skip
    assert reports == [PING_FLOOD] and started == []


@pytest.mark.parametrize("base", [e.client for e in ENGINES], ids=lambda c: c.engine)
async def test_a_listener_bug_does_not_drop_the_rest_client_side(base, caplog):
    from kom_gateway.http.client import ClientStream

    calls: list[tuple] = []

    class Listener:
        def __init__(self, sid: int) -> None:
            self.sid = sid

        def on_response(self, status, headers):
            if self.sid == 1:
                raise RuntimeError("listener bug")
            calls.append(("response", self.sid, status))

        def on_data(self, data, flow_len):
            calls.append(("data", self.sid, data))

        def on_end(self):
            calls.append(("end", self.sid))

        def on_reset(self, kind, reason):
            calls.append(("reset", self.sid, kind))

    conn = base(H2ClientSettings())
    conn._start()
    for sid in (1, 3, 5):
        conn.streams[sid] = ClientStream(conn, sid, Listener(sid))
    with caplog.at_level(logging.ERROR):
        conn._handle([
            Event(ev.HEADERS, 1, status=200, headers=[]),
            Event(ev.HEADERS, 3, status=404, headers=[], end_stream=True),
            Event(ev.DATA, 5, data=b"ab", flow_len=2),
            Event(ev.CLOSE, 5, error_code=8),
        ])  # fmt: skip
    assert calls == [("response", 3, 404), ("end", 3), ("data", 5, b"ab"), ("reset", 5, "broken")]
    assert "handling upstream HEADERS failed" in caplog.text
