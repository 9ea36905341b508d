"""The nghttp2 session (`_nghttp2.pyx`) without sockets: the pitfalls the engine's design
note lists, each as a regression test. Peers are h2 state machines fed in memory."""

from __future__ import annotations

import os

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import DataFrame

from kom_gateway.http import engine as engines
from kom_gateway.http import events as ev

if engines.nghttp2_missing() is not None:
    if os.environ.get("KOM_REQUIRE_CLIENTS"):
        pytest.fail(f"the nghttp2 engine is not built: {engines.nghttp2_missing()}", pytrace=False)
    pytest.skip("the nghttp2 engine is not built", allow_module_level=True)

from kom_gateway.http.nghttp2 import _nghttp2 as ng

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"gw"),
           (b":path", b"/api/v1/namespaces/default/configmaps")]


def pair() -> tuple[ng.Session, h2.connection.H2Connection]:
    """A server session and an h2 client that has sent its preface and SETTINGS."""
    server = ng.Session(True)
    server.submit_settings([(ng.SETTINGS_MAX_CONCURRENT_STREAMS, 100)])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.receive(client.data_to_send())
    client.receive_data(server.send())
    server.receive(client.data_to_send())
    return server, client


def kinds(events: list) -> list[int]:
    return [e.kind for e in events]


def test_one_event_per_header_block_whatever_its_size():
    server, client = pair()
    headers = [*REQUEST, *((b"x-field-%d" % i, b"v" * 30_000) for i in range(30))]  # ~900 KB
    client.send_headers(1, headers, end_stream=True)
    events = server.receive(client.data_to_send())
    assert kinds(events) == [ev.HEADERS]  # no per-header event, no Python call
    assert events[0].end_stream is True  # END_STREAM rides in the event: no END for a GET
    assert events[0].headers == headers[len(REQUEST):]  # regular fields; pseudo split in C
    assert (events[0].method, events[0].path, events[0].authority) == (
        "POST", "/api/v1/namespaces/default/configmaps", "gw")


def test_response_status_is_split_off_in_c():
    server, client = ng.Session(True), ng.Session(False)
    server.submit_settings(())
    client.submit_settings(())
    stream_id = client.request(REQUEST, True)
    server.receive(client.send())
    server.respond(stream_id, [(b":status", b"404"), (b"content-type", b"application/json")], True)
    events = [e for e in client.receive(server.send()) if e.kind == ev.HEADERS]
    assert [(e.stream_id, e.headers, e.status) for e in events] == [
        (stream_id, [(b"content-type", b"application/json")], 404)]


def test_a_final_response_after_1xx_is_a_response_and_trailers_end_the_body():
    """nghttp2 files the final response after a 100 Continue under "other HEADERS", as it
    does trailers: the session still reports it as the response (Go's server sends 100
    Continue to a request carrying Expect: 100-continue)."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client = ng.Session(False)
    client.submit_settings(())
    server.receive_data(client.send())
    client.receive(server.data_to_send())
    stream_id = client.request(REQUEST, False)
    server.receive_data(client.send())
    server.send_headers(stream_id, [(b":status", b"100")])
    server.send_headers(stream_id, [(b":status", b"201"), (b"content-type", b"application/json")])
    server.send_data(stream_id, b"{}")
    server.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
    events = client.receive(server.data_to_send())
    assert [e.status for e in events if e.kind == ev.HEADERS] == [100, 201]
    assert kinds(events)[-2:] == [ev.DATA, ev.END]  # trailers: dropped, the end is kept


def test_header_list_over_the_limit_is_reported_for_its_stream_only():
    server = ng.Session(True, max_header_list=8192)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [*REQUEST, (b"x-big", b"v" * 20_000)], end_stream=True)
    client.send_headers(3, REQUEST, end_stream=True)
    events = [e for e in server.receive(client.data_to_send()) if e.kind == ev.HEADERS]
    assert [(e.stream_id, e.headers is None) for e in events] == [(1, True), (3, False)]


def test_stream_reset_mid_data_frame_never_leaks_into_another_stream():
    """A DATA frame arrives in two reads; the stream is reset between them. Its second
    half is dropped, and the next stream's body is only its own."""
    server, client = pair()
    client.send_headers(1, REQUEST)
    client.send_headers(3, REQUEST)
    server.receive(client.data_to_send())
    frame = DataFrame(1, b"A" * 10_000).serialize()
    first = server.receive(frame[:5000])
    assert all(e.stream_id == 1 for e in first if e.kind == ev.DATA)
    server.reset(1, 0x8)
    server.send()
    later = server.receive(frame[5000:] + DataFrame(3, b"B" * 100, flags=["END_STREAM"]).serialize())
    data = [(e.stream_id, e.data) for e in later if e.kind == ev.DATA]
    assert data == [(3, b"B" * 100)]


def test_an_empty_body_queue_defers_instead_of_spinning():
    """No data yet: the provider defers (a 0-byte read without EOF would make nghttp2
    emit empty DATA frames forever); a write resumes it; end() sends END_STREAM."""
    server, client = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    assert server.respond(1, [(b":status", b"200")], False)
    out = server.send()
    assert out and server.send() == b""  # headers only; nothing more, no loop
    client.receive_data(out)
    flushed: list[str] = []
    assert server.write(1, b"hello", lambda: flushed.append("hello"))
    events = client.receive_data(server.send())
    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"hello"]
    assert server.flushed_pending() and not flushed
    server.end(1)
    events = client.receive_data(server.send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_data_queued_for_a_client_that_leaves_is_handed_back():
    server, client = pair()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    server.respond(1, [(b":status", b"200")], False)
    calls: list[int] = []
    server.write(1, b"x" * 1000, lambda: calls.append(1))
    server.send()
    assert server.queued(1) == 1000 and not server.flushed_pending()  # window 0: it waits
    client.send_headers(3, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    server.respond(3, [(b":status", b"200")], False)
    server.write(3, b"y" * 500, None)
    server.send()
    assert server.queued_total() == 1500  # every stream's, in one call
    server.close()  # the connection dropped: nghttp2_session_del calls no close callback
    assert server.flushed_pending() == 1  # ...but the producer still gets its credit back
    # and every later call on the freed session is harmless
    assert server.send() == b"" and server.receive(b"x") == [] and server.closed
    assert server.consume(1, 10) is False
    assert not server.write(1, b"y", None)
    assert server.queued_total() == 0


def _answered_client(end_stream: bool) -> tuple[ng.Session, h2.connection.H2Connection, int]:
    """A client session (64 KiB windows) with one GET open, answered 200 by an h2 peer."""
    client = ng.Session(False)
    client.submit_settings([(ng.SETTINGS_INITIAL_WINDOW_SIZE, 65535)])
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    client.receive(peer.data_to_send())
    sid = client.request([(b":method", b"GET"), (b":scheme", b"http"),
                          (b":authority", b"a"), (b":path", b"/")], end_stream)
    peer.receive_data(client.send())
    peer.send_headers(sid, [(b":status", b"200")])
    return client, peer, sid


def test_consume_gives_the_connection_window_back_even_for_a_gone_stream():
    client, peer, sid = _answered_client(True)
    for _ in range(3):  # over half the window: consume() then sends WINDOW_UPDATE
        peer.send_data(sid, b"z" * 13_000)
    peer.reset_stream(sid)
    events = client.receive(peer.data_to_send())
    received = sum(e.flow_len for e in events if e.kind == ev.DATA)
    assert received == 39_000 and client.receive_window() == 65535 - 39_000
    client.consume(sid, received)  # the stream is closed: the connection is still credited
    assert client.receive_window() == 65535


def test_consume_says_whether_a_window_update_waits_to_be_sent():
    """The connections flush after an acknowledgement only when consume() says
    nghttp2 queued something: a WINDOW_UPDATE goes out once half a window is taken."""
    client, peer, sid = _answered_client(False)
    for _ in range(4):
        peer.send_data(sid, b"z" * 10_000)
    client.receive(peer.data_to_send())
    client.send()  # the SETTINGS ACK and the like: nothing is left queued
    assert client.consume(sid, 10_000) is False  # under half the window: nothing to send
    assert client.consume(sid, 30_000) is True  # over half: a WINDOW_UPDATE is queued
    peer.receive_data(client.send())
    assert peer.remote_flow_control_window(sid) == 65535
    assert client.consume(sid, 0) is False  # nothing taken, nothing queued


def test_bad_arguments_raise_instead_of_reaching_c():
    """None where bytes belong, or a header that is not a pair of bytes, is a TypeError
    (the header array is freed on the way out), never a pointer into nothing."""
    server, _client = pair()
    with pytest.raises(TypeError):
        server.goaway(0, 0, None)
    sender = ng.Session(False)
    sender.submit_settings(())
    for bad in ([(b"x", None)], [("x", b"v")], [(b"x",)], [b"xv"]):
        with pytest.raises((TypeError, ValueError)):
            sender.request([*REQUEST, *bad], True)
    assert sender.request(REQUEST, True) == 1  # the session is still sound


def test_receive_takes_bytes_or_any_contiguous_buffer():
    """Bytes (what the loop reads) are read in place; a bytearray or memoryview through
    the buffer protocol, a slice of one too; what is no buffer is a TypeError."""
    for form in (bytes, bytearray, memoryview, lambda b: memoryview(b"junk" + b)[4:]):
        server = ng.Session(True)
        server.submit_settings(())
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, REQUEST, end_stream=True)
        assert server.receive(form(b"")) == []
        assert kinds(server.receive(form(client.data_to_send())))[-1] == ev.HEADERS
    for bad in (None, "text", 42):
        with pytest.raises(TypeError):
            server.receive(bad)
    with pytest.raises((TypeError, ValueError, BufferError)):
        server.receive(memoryview(b"abcd")[::2])  # not contiguous
    assert kinds(server.receive(client.data_to_send())) == []  # the session is still sound


def test_a_stream_is_answered_once_and_only_if_it_exists():
    """Found by bench/fuzz_engine.py: a second respond() on a stream replaced the body
    queue nghttp2 still pointed at (its data lost, the pointer dangling), and a respond()
    on a stream the client never opened kept a queue until the connection closed."""
    server, client = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    assert not server.respond(8, [(b":status", b"200")], False)  # never opened
    assert server.respond(1, [(b":status", b"200")], False)
    flushed: list[int] = []
    assert server.write(1, b"x" * 100, lambda: flushed.append(1))
    assert not server.respond(1, [(b":status", b"500")], False)  # answered already
    events = client.receive_data(server.send())
    server.run_flushed()
    assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [b"x" * 100]
    assert flushed == [1]
