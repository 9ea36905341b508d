"""HPACK encoding without the dynamic table, memoised per header field.

hpack's encoder keeps a dynamic table: every header it sends is looked up and, when new,
added, so the bytes of a field depend on everything sent before. That bookkeeping was
the largest single cost of sending headers. This encoder never uses the dynamic table:
each field is a static-table index, or a literal "without indexing" (with the name from
the static table when it is there). A field's bytes then depend only on the field, so
they are computed once and memoised, and encoding a header block is a few dictionary
lookups. The price is a few dozen bytes per block that the dynamic table would have
saved (repeated user agents and authorities), which matters little between a gateway
and its apiservers or its clients.

Credentials (`authorization`, `proxy-authorization`, `cookie`, and any field hpack marks
never-indexed) use the never-indexed literal, so no intermediary may add them to a
table either. The first block starts with a dynamic table size update to 0: it is valid
whatever HEADER_TABLE_SIZE the peer set, and says this side will not use the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import NeverIndexedHeaderTuple

from kom_gateway.compat import (
    REQUEST_CODES,
    REQUEST_CODES_LENGTH,
    STATIC_TABLE,
    HuffmanEncoder,
    encode_integer,
)
from kom_gateway.http.settings import NEVER_INDEXED

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update, new size 0 (RFC 7541 6.3)
MEMO_SIZE = 8192
MEMO_MAX_BYTES = 1024  # longer fields are coded each time, never kept
HUFFMAN_MAX_BYTES = 1024  # longer values go as plain literals (see _string)


def _static_indexes() -> tuple[dict[tuple[bytes, bytes], int], dict[bytes, int]]:
    fields: dict[tuple[bytes, bytes], int] = {}
    names: dict[bytes, int] = {}
    for index, (name, value) in enumerate(STATIC_TABLE, start=1):
        fields.setdefault((name, value), index)
        names.setdefault(name, index)
    return fields, names


_STATIC_FIELDS, _STATIC_NAMES = _static_indexes()


def _string(data: bytes) -> bytes:
    """A string literal, Huffman-coded when that is shorter (RFC 7541 5.2). hpack's
    Huffman encoder grows one big integer bit by bit, quadratic in the length (a 400 KB
    value took 10 s of the event loop), so long strings are sent as plain literals: a
    fifth larger at most, and linear."""
    if len(data) > HUFFMAN_MAX_BYTES:
        return bytes(encode_integer(len(data), 7)) + data
    coded = _HUFFMAN.encode(data)
    if len(coded) < len(data):
        length = encode_integer(len(coded), 7)
        length[0] |= 0x80
        return bytes(length) + coded
    return bytes(encode_integer(len(data), 7)) + data


def encode_field(name: bytes, value: bytes, sensitive: bool = False) -> bytes:
    """One header field, without touching any table (pure)."""
    sensitive = sensitive or name in NEVER_INDEXED
    if not sensitive:
        index = _STATIC_FIELDS.get((name, value))
        if index is not None:  # indexed field (RFC 7541 6.1)
            out = encode_integer(index, 7)
            out[0] |= 0x80
            return bytes(out)
    flag = 0x10 if sensitive else 0x00  # literal never indexed / without indexing (6.2.3, 6.2.2)
    name_index = _STATIC_NAMES.get(name)
    if name_index is not None:
        out = encode_integer(name_index, 4)
        out[0] |= flag
        return bytes(out) + _string(value)
    return bytes((flag,)) + _string(name) + _string(value)


class StatelessEncoder:
    """Stands in for `hpack.Encoder` on an h2 connection (`conn.encoder`)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[bytes, bytes, bool], bytes] = {}
        self._announced = False
        # h2 sets this from the peer's SETTINGS_HEADER_TABLE_SIZE; with no table in use,
        # any value the peer allows is respected
        self.header_table_size = 4096

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        memo = self._memo
        parts = []
        if not self._announced:
            self._announced = True
            parts.append(_TABLE_SIZE_ZERO)
        for header in headers:
            key = (header[0], header[1], isinstance(header, NeverIndexedHeaderTuple))
            field = memo.get(key)
            if field is None:
                field = encode_field(*key)
                if len(field) <= MEMO_MAX_BYTES:
                    if len(memo) >= MEMO_SIZE:
                        memo.clear()
                    memo[key] = field
            parts.append(field)
        return b"".join(parts)
