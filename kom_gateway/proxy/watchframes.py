"""Where the watch events in a response body end (pure).

An upstream that breaks a watch in the middle of an event must not look like a clean
end: the client would decode half an object. Ended on an event boundary, the client
simply re-watches from its last resourceVersion. Kube-apiserver frames watch events as
one JSON document per line (`application/json`), or as a 4-byte big-endian length and a
message (`application/vnd.kubernetes.protobuf;stream=watch`).
"""

from __future__ import annotations

PROTOBUF = b"application/vnd.kubernetes.protobuf"


class WatchFrames:
    """Fed each body chunk; `at_boundary` says whether the bytes so far are whole events."""

    __slots__ = ("_header", "_left", "_protobuf", "at_boundary")

    def __init__(self, content_type: bytes) -> None:
        self._protobuf = content_type.startswith(PROTOBUF)
        self._left = 0  # protobuf: message bytes still to come in the current frame
        self._header = b""  # protobuf: a length prefix split across chunks
        self.at_boundary = True

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if not self._protobuf:
            self.at_boundary = data[-1] == 0x0A  # b"\n"
            return
        i, n = 0, len(data)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            need = 4 - len(self._header)
            self._header += data[i : i + need]
            i += need
            if len(self._header) == 4:
                self._left = int.from_bytes(self._header, "big")
                self._header = b""
        self.at_boundary = not self._left and not self._header
