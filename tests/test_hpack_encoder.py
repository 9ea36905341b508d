"""The stateless HPACK encoder: what it writes decodes (with hpack's own decoder) to the
same headers, never touches the dynamic table, keeps credentials never-indexed."""

from __future__ import annotations

from hpack import Decoder, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from kom_gateway.http import hpack_encoder
from kom_gateway.http.hpack_encoder import StatelessEncoder, encode_field

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"10.0.0.1:6443"),
           (b":path", b"/api/v1/namespaces/default/pods?watch=1"),
           (b"user-agent", b"kubelet/v1.31.0 (linux/amd64) kubernetes/abc"),
           (b"accept", b"application/vnd.kubernetes.protobuf"),
           (b"authorization", b"Bearer secret-token"),
           (b"x-remote-user", b"system:node:n1"), (b"x-remote-group", b"system:nodes")]


def test_blocks_decode_to_the_same_headers_and_leave_the_table_empty():
    encoder, decoder = StatelessEncoder(), Decoder()
    first = encoder.encode(REQUEST)
    assert first[:1] == b"\x20"  # table size update to 0, once
    assert decoder.decode(first, raw=True) == REQUEST
    second = encoder.encode(REQUEST)
    assert second[:1] != b"\x20" and first[1:] == second  # memoised, identical
    assert decoder.decode(second, raw=True) == REQUEST
    assert len(decoder.header_table.dynamic_entries) == 0


def test_static_table_fields_are_one_byte_and_credentials_never_indexed():
    assert encode_field(b":method", b"GET") == b"\x82"  # static index 2
    assert encode_field(b":status", b"200") == b"\x88"  # static index 8
    secret = encode_field(b"authorization", b"Bearer x")
    assert secret[0] & 0xF0 == 0x10  # literal never indexed, name index 23 (4-bit prefix)
    decoded = Decoder().decode(secret, raw=True)
    assert isinstance(decoded[0], NeverIndexedHeaderTuple)
    marked = encode_field(b"x-token", b"abc", sensitive=True)
    assert marked[0] == 0x10  # never indexed, new name


def test_decodes_under_a_peer_table_size_of_zero():
    decoder = Decoder()
    decoder.max_allowed_table_size = 0  # the peer set SETTINGS_HEADER_TABLE_SIZE 0
    assert decoder.decode(StatelessEncoder().encode(REQUEST), raw=True) == REQUEST


def test_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(hpack_encoder, "MEMO_SIZE", 10)
    encoder = StatelessEncoder()
    for i in range(100):
        encoder.encode([(b"x-n", str(i).encode())])
    assert len(encoder._memo) <= 10


header = st.tuples(
    st.sampled_from([b":path", b"content-type", b"x-custom", b"cookie", b"date"])
    | st.binary(min_size=1, max_size=20).map(lambda b: b.lower()),
    st.binary(max_size=64),
)


@given(st.lists(st.lists(header, max_size=12), max_size=5))
def test_any_headers_round_trip(blocks):
    encoder, decoder = StatelessEncoder(), Decoder()
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block
