"""The metadata of a Kubernetes JSON body, read as it streams (pure).

kube-apiserver writes a List as `{"kind":…,"apiVersion":…,"metadata":{…},"items":[…]}`
and an object with `kind`, `apiVersion`, `metadata` first. This walks the top-level
object key by key and a List's items one by one, each decoded by the standard library's
C decoder (`JSONDecoder.raw_decode`) as soon as it is whole: what is held is at most one
item (an object is at most etcd's 1.5 MiB; past MAX_VALUE it is given up as unreadable),
never the list. An object's body after its metadata is not parsed at all. (ijson, the
streaming parser, does the same in constant memory but builds an event per token: 15
times slower here.)
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any

MAX_VALUE = 4 * 1024 * 1024  # one item, or one top-level value other than items
_WHITESPACE = " \t\n\r"
# the C scanner JSONDecoder.raw_decode wraps (StopIteration: no whole value yet); one
# for all readers (its memo is cleared at the end of every call)
_SCAN = json.JSONDecoder().scan_once


class JsonBodyError(ValueError):
    """The body is not the JSON of a Kubernetes object or List."""


class JsonMetadata:
    """Fed a body's chunks; calls `on_meta(metadata)` with the top-level `metadata` and,
    for a List, `on_item(metadata)` with each item's."""

    def __init__(
        self,
        is_list: bool,
        on_meta: Callable[[dict[str, Any]], None],
        on_item: Callable[[dict[str, Any]], None],
    ) -> None:
        self.is_list = is_list
        self.on_meta = on_meta
        self.on_item = on_item
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._decode = _SCAN
        self._text = ""  # decoded, not yet consumed from _pos
        self._pos = 0
        self._pending: list[str] = []  # decoded chunks not yet joined into _text
        self._pending_len = 0
        self._want = 0  # join and try again once this much is there (amortises retries)
        self._state = "open"  # open, key, colon, value, items, item, after-item, next, done
        self._key = ""

    def feed(self, data: bytes) -> None:
        if self._state == "done":
            return
        text = self._utf8.decode(data)
        self._pending.append(text)
        self._pending_len += len(text)
        if len(self._text) - self._pos + self._pending_len >= self._want:
            self._run(eof=False)

    def finish(self) -> None:
        """The body ended: JsonBodyError if it ended before the metadata did."""
        if self._state == "done":
            return
        self._pending.append(self._utf8.decode(b"", True))
        self._run(eof=True)
        if self._state != "done":
            raise JsonBodyError("the body ends inside its JSON")

    # -- the walk --------------------------------------------------------------------------
    def _run(self, eof: bool) -> None:
        self._text = self._text[self._pos :] + "".join(self._pending)
        self._pos = 0
        self._pending, self._pending_len = [], 0
        while self._state != "done" and self._step():
            pass
        left = len(self._text) - self._pos
        if self._state != "done" and left > MAX_VALUE:
            raise JsonBodyError(f"a value larger than {MAX_VALUE} bytes")
        self._want = 2 * left if not eof else 0  # (a value in pieces: try at twice the size)

    def _char(self) -> str:
        """The next non-blank character ("" when there is none yet), not consumed."""
        text, pos = self._text, self._pos
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        self._pos = pos
        return text[pos] if pos < len(text) else ""

    def _value(self) -> tuple[bool, Any]:
        """(True, the next JSON value) once it is whole, else (False, None)."""
        try:
            value, end = self._decode(self._text, self._pos)
        except (StopIteration, json.JSONDecodeError):
            return False, None
        self._pos = end
        return True, value

    def _expect(self, char: str, state: str) -> bool:
        found = self._char()
        if not found:
            return False
        if found != char:
            raise JsonBodyError(f"expected {char!r} at {self._pos}, got {found!r}")
        self._pos += 1
        self._state = state
        return True

    def _step(self) -> bool:
        """One move of the walk; False when it needs more of the body."""
        state = self._state
        if state == "open":
            return self._expect("{", "key")
        if state == "key":
            found = self._char()
            if found == "}":
                self._pos += 1
                self._state = "done"
                return True
            if not found:
                return False
            whole, key = self._value()
            if not whole:
                return False
            if not isinstance(key, str):
                raise JsonBodyError("a key that is not a string")
            self._key = key
            self._state = "colon"
            return True
        if state == "colon":
            return self._expect(":", "value")
        if state == "value":
            if self._key == "items" and self.is_list:
                return self._expect("[", "items")
            if not self._char():
                return False
            whole, value = self._value()
            if not whole:
                return False
            if self._key == "metadata" and isinstance(value, dict):
                self.on_meta(value)
                if not self.is_list:
                    self._state = "done"  # an object's other fields: digested, not parsed
                    return True
            self._state = "next"
            return True
        if state == "next":
            found = self._char()
            if found == "}":
                self._pos += 1
                self._state = "done"
                return True
            return self._expect(",", "key")
        return self._items()

    def _items(self) -> bool:
        """Every whole item there is, in one loop (a LIST's hot path): "items" (after
        `[`), "item" (after `,`) and "after-item" (expecting `,` or `]`)."""
        text, pos, state = self._text, self._pos, self._state
        decode, on_item, end = self._decode, self.on_item, len(text)
        try:
            while True:
                while pos < end and text[pos] in _WHITESPACE:
                    pos += 1
                if pos == end:
                    return False
                char = text[pos]
                if state == "after-item" or (state == "items" and char == "]"):
                    if char == "]":
                        self._state = state = "next"
                        pos += 1
                        return True
                    if char != ",":
                        raise JsonBodyError(f"expected ',' or ']' at {pos}, got {char!r}")
                    pos += 1
                    state = "item"
                    continue
                try:
                    item, pos = decode(text, pos)
                except (StopIteration, json.JSONDecodeError):
                    return False  # not whole yet
                meta = item.get("metadata") if isinstance(item, dict) else None
                on_item(meta if isinstance(meta, dict) else {})
                state = "after-item"
        finally:
            self._pos, self._state = pos, state
