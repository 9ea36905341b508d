"""The stateless HPACK encoder: what it writes decodes (with hpack's own decoder) to the
same headers, never touches the dynamic table, keeps credentials never-indexed."""

from __future__ import annotations

from hpack import Decoder, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from kom_gateway.http.h2 import hpack_encoder
from kom_gateway.http.h2.hpack_encoder import StatelessEncoder, encode_field

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


def test_header_cost_is_linear_long_values_never_reach_the_huffman_coder(monkeypatch):
    """hpack's Huffman coder is quadratic in a string's length (a 400 KB value held the
    event loop 10 s). A 1 MiB header list must put at most HUFFMAN_MAX_BYTES per field
    through it, and memoise nothing long: work per KB stays bounded whatever one client
    sends. (A bound on work, not on time.)"""
    coded: list[int] = []
    real = hpack_encoder._HUFFMAN.encode
    monkeypatch.setattr(hpack_encoder._HUFFMAN, "encode", lambda data: coded.append(len(data)) or real(data))
    encoder, decoder = StatelessEncoder(), Decoder(max_header_list_size=4 << 20)
    headers = [*REQUEST[:4], (b"x-huge", b"a" * (1 << 20)),
               *((b"x-field-%d" % i, b"b" * 3000) for i in range(50))]
    block = encoder.encode(headers)
    assert max(coded) <= hpack_encoder.HUFFMAN_MAX_BYTES
    assert sum(coded) <= hpack_encoder.HUFFMAN_MAX_BYTES * len(headers) * 2  # name + value
    assert len(block) < 1.01 * sum(len(n) + len(v) for n, v in headers) + 1024
    assert decoder.decode(block, raw=True) == headers
    assert all(len(field) <= hpack_encoder.MEMO_MAX_BYTES for field in encoder._memo.values())
