"""The metadata of a Kubernetes protobuf body, read as it streams (pure).

kube-apiserver's protobuf encoding (what kubelets and most controllers ask for) is the
magic `k8s\\0` and a `runtime.Unknown` message whose field 2 (`raw`) holds the object; a
List has its ListMeta in field 1 and each item in field 2; an object has its ObjectMeta
in field 1 (name 1, namespace 3, uid 5, resourceVersion 6, written first: Go's generated
marshallers write fields in number order). Only those are read; everything else is
skipped by its length without being held, so a 50 MB LIST costs a few Python steps per
item and no memory. No schema is needed, so none is shipped (the protobuf library needs
the message in full, and generated classes, to read it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

MAGIC = b"k8s\x00"
_OBJECT_META = {1: "name", 3: "namespace", 5: "uid", 6: "resourceVersion"}  # field -> JSON
MAX_META = 65536  # a ListMeta or one of ObjectMeta's four strings; longer is not metadata

Needs = Generator[None, None, Any]  # a step that may wait for more bytes


class ProtobufError(ValueError):
    """The body is not a Kubernetes protobuf body."""


class _End(Exception):
    """The body ended where more was needed."""


class ProtobufMetadata:
    """Fed a body's chunks; calls `on_meta(metadata)` for the top-level object or list
    and `on_item(metadata)` per list item, with the fields found under their JSON names
    (resourceVersion, uid; an item's namespace and name too), as `JsonMetadata` does."""

    def __init__(
        self,
        is_list: bool,
        on_meta: Callable[[dict[str, Any]], None],
        on_item: Callable[[dict[str, Any]], None],
    ) -> None:
        self.is_list = is_list
        self.on_meta = on_meta
        self.on_item = on_item
        self._buf = bytearray()
        self._pos = 0  # read up to here in _buf
        self._base = 0  # bytes dropped from _buf's front (positions in the body: _at())
        self._eof = False
        self._steps = self._body()
        next(self._steps)

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._resume()
        if self._pos > 65536:  # drop what was read (the rest is a field's partial head)
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0

    def finish(self) -> None:
        """The body ended: ProtobufError if it ended inside a field."""
        self._eof = True
        self._resume()

    def _resume(self) -> None:
        try:
            self._steps.send(None)
        except StopIteration:
            pass
        except _End:
            raise ProtobufError("the body ends inside a field") from None

    # -- reading -------------------------------------------------------------------------
    def _at(self) -> int:
        return self._base + self._pos

    def _need(self, n: int) -> Needs:
        while len(self._buf) - self._pos < n:
            if self._eof:
                raise _End
            yield

    def _varint(self) -> Needs:
        value = shift = 0
        while True:
            yield from self._need(1)
            byte = self._buf[self._pos]
            self._pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ProtobufError("a varint longer than 10 bytes")

    def _take(self, n: int) -> Needs:
        yield from self._need(n)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def _skip(self, n: int) -> Needs:
        while n:
            yield from self._need(1)
            step = min(n, len(self._buf) - self._pos)
            self._pos += step
            n -= step

    def _field(self) -> Needs:
        """(number, wire type, length of a LEN field or 0), the value not yet read (a
        varint's is read and dropped)."""
        key = yield from self._varint()
        number, wire = key >> 3, key & 7
        if wire == 2:
            return number, wire, (yield from self._varint())
        if wire == 0:
            yield from self._varint()
        elif wire in (1, 5):
            yield from self._skip(8 if wire == 1 else 4)
        else:
            raise ProtobufError(f"wire type {wire}")
        return number, wire, 0

    # -- the body --------------------------------------------------------------------------
    def _body(self) -> Needs:
        yield  # (primed)
        if (yield from self._take(4)) != MAGIC:
            raise ProtobufError("no k8s protobuf magic")
        while True:
            try:
                yield from self._need(1)
            except _End:
                return  # the body ended between two fields
            number, wire, length = yield from self._field()
            if number == 2 and wire == 2:
                yield from self._raw(length)
            elif wire == 2:
                yield from self._skip(length)

    def _raw(self, length: int) -> Needs:
        end = self._at() + length
        while self._at() < end:
            number, wire, size = yield from self._field()
            if wire != 2:
                continue
            if number == 1 and self.is_list:
                meta = yield from self._small(size)
                self.on_meta({"resourceVersion": _strings(meta, (2,)).get(2, "")})
            elif number == 1:
                self.on_meta((yield from self._object_meta(size)))
            elif number == 2 and self.is_list:
                yield from self._item(size)
            else:
                yield from self._skip(size)

    def _item(self, length: int) -> Needs:
        left = length
        found: dict[int, str] = {}
        while left > 0:
            start = self._at()
            number, wire, size = yield from self._field()
            left -= self._at() - start
            if number == 1 and wire == 2 and not found:
                found = yield from self._object_meta(size)
            elif wire == 2:
                yield from self._skip(size)
            left -= size if wire == 2 else 0
        self.on_item(found)

    def _object_meta(self, length: int) -> Needs:
        """ObjectMeta's name (1), namespace (3), uid (5), resourceVersion (6)."""
        found: dict[str, str] = {}
        left = length
        while left > 0:
            start = self._at()
            number, wire, size = yield from self._field()
            left -= self._at() - start
            if wire != 2:
                continue
            left -= size
            name = _OBJECT_META.get(number)
            if name is not None and size <= MAX_META:
                found[name] = (yield from self._take(size)).decode("utf-8", "replace")
            else:
                yield from self._skip(size)
        return found

    def _small(self, size: int) -> Needs:
        if size > MAX_META:
            raise ProtobufError(f"a ListMeta of {size} bytes")
        return (yield from self._take(size))


def _strings(message: bytes, wanted: tuple[int, ...]) -> dict[int, str]:
    """The LEN fields `wanted` of a message held whole (a ListMeta)."""
    out: dict[int, str] = {}
    pos = 0
    while pos < len(message):
        key, pos = _varint_at(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint_at(message, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint_at(message, pos)
            if number in wanted:
                out[number] = message[pos : pos + size].decode("utf-8", "replace")
            pos += size
        else:
            raise ProtobufError(f"wire type {wire}")
    return out


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("a truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
