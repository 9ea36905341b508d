"""What a read's response said, in constant memory, built while it streams (pure).

A LIST of 50 MB is never held: its bytes pass once through a digest, and through a
reader of its metadata only (`jsonmeta.JsonMetadata`, `protobuf.ProtobufMetadata`),
which holds at most one item at a time. An item
becomes three numbers (its key, and its key with uid and resourceVersion, hashed) added
into order-free sums, so two lists compare by a few integers whatever their size, and
the kind of difference (items missing, extra, or changed) still shows.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

from kom_gateway.http.stream import Headers
from kom_gateway.shadow.jsonmeta import JsonBodyError, JsonMetadata
from kom_gateway.shadow.protobuf import ProtobufError, ProtobufMetadata

# the media types whose metadata is read (the rest compare by digest only)
ENCODINGS = {b"application/json": "json", b"application/vnd.kubernetes.protobuf": "protobuf"}
MASK = 2**64 - 1
MAX_STATUS_BODY = 65536  # a Status error body is small; past this it is not read




class Summary:
    """One response, summarised: equal summaries mean equal answers."""

    __slots__ = (
        "body_digest",
        "encoding",
        "item_keys",
        "item_versions",
        "items",
        "resource_version",
        "status",
        "too_large_rv",
        "uid",
        "unreadable",
    )

    def __init__(self) -> None:
        self.status = 0
        self.encoding = ""  # "json", "protobuf": its metadata is read; "": digest only
        self.resource_version = ""  # the list's, or the object's
        self.uid = ""  # the object's (a GET)
        self.items = 0  # a list's items
        self.item_keys = 0  # sum of hash(namespace/name), mod 2**64
        self.item_versions = 0  # sum of hash(namespace/name uid resourceVersion)
        self.body_digest = b""
        self.too_large_rv = False  # a Status "Too large resource version" (a lagging reader)
        self.unreadable = ""  # why the JSON could not be read ("" if it could)

    def describe(self) -> str:
        """For a mismatch's log line."""
        rv = self.resource_version or "-"
        items = f" {self.items} items" if self.items else ""
        return f"{self.status} rv {rv}{items}"


class SummaryBuilder:
    """Fed a response's status, headers and body chunks; `finish()` is its Summary."""

    __slots__ = ("_digest", "_inflate", "_is_list", "_reader", "_status_body", "out")

    def __init__(self, is_list: bool) -> None:
        self.out = Summary()
        self._digest = hashlib.blake2b(digest_size=16)
        self._is_list = is_list
        self._reader: JsonMetadata | ProtobufMetadata | None = None
        self._status_body: bytearray | None = None
        self._inflate: Any = None  # a gzip-encoded body (client-go asks for it)

    def response(self, status: int, headers: Headers) -> None:
        out = self.out
        out.status = status
        content_type = encoding = b""
        for name, value in headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value.strip().lower()
        media = content_type.split(b";", 1)[0].strip()
        out.encoding = ENCODINGS.get(media, "")
        if encoding == b"gzip":
            self._inflate = zlib.decompressobj(wbits=31)
        elif encoding not in (b"", b"identity"):
            out.encoding = ""  # compared by digest only
        if status != 200:
            self._status_body = bytearray()  # a Status: small, read whole
        elif out.encoding == "json":
            self._reader = JsonMetadata(self._is_list, self._took_meta, self._took_item)
        elif out.encoding == "protobuf":
            self._reader = ProtobufMetadata(self._is_list, self._took_meta, self._took_item)

    def feed(self, data: bytes) -> None:
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data)
            except zlib.error as exc:
                self._inflate = None
                self._unreadable(f"gzip: {exc}")
                return
        self._digest.update(data)
        if self._status_body is not None:
            if len(self._status_body) + len(data) <= MAX_STATUS_BODY:
                self._status_body += data
            return
        if self._reader is not None:
            try:
                self._reader.feed(data)
            except (JsonBodyError, ProtobufError) as exc:
                self._unreadable(str(exc))

    def _took_meta(self, meta: dict[str, Any]) -> None:
        self.out.resource_version = str(meta.get("resourceVersion") or "")
        self.out.uid = str(meta.get("uid") or "")

    def _took_item(self, meta: dict[str, Any]) -> None:
        out = self.out
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        version = f"{key} {meta.get('uid', '')} {meta.get('resourceVersion', '')}"
        out.items += 1
        # str hash: both answers are summarised in this process, where it is one function
        out.item_keys = (out.item_keys + hash(key)) & MASK
        out.item_versions = (out.item_versions + hash(version)) & MASK

    def _unreadable(self, why: str) -> None:
        self.out.unreadable = why[:200]
        self._reader = None

    def finish(self) -> Summary:
        out = self.out
        out.body_digest = self._digest.digest()
        if self._reader is not None:
            try:
                self._reader.finish()
            except (JsonBodyError, ProtobufError) as exc:
                self._unreadable(str(exc))
            else:
                if not out.resource_version:
                    self._unreadable("no metadata.resourceVersion")
        if self._status_body is not None:
            out.too_large_rv = _too_large(bytes(self._status_body))
        return out


def _too_large(body: bytes) -> bool:
    """A Status whose cause is ResourceVersionTooLarge: the reader had not yet seen the
    resourceVersion it was asked for (kube-apiserver, after waiting up to 3 s)."""
    try:
        status = json.loads(body)
    except ValueError:
        return False
    details = status.get("details") if isinstance(status, dict) else None
    causes = details.get("causes") if isinstance(details, dict) else None
    return isinstance(causes, list) and any(
        isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes
    )
