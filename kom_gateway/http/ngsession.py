"""What the nghttp2 engine's server and client connections do alike with their session:
drain it into one buffer per pass (unless the transport's buffer is full: nghttp2 then
holds the rest), and free it when the transport is gone. Functions, not a mixin: the
compiled core's classes take one base class each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Session = Any  # kom_gateway.http._nghttp2.Session (a Cython class, no stub)


def drain(session: Session, handle: Callable[[list[tuple]], None]) -> bytes:
    """The frames nghttp2 has ready; events of streams that closed as their last frame
    went out are handed to `handle`, and producers whose data went out hear so."""
    data: bytes = session.send()
    if session.events:
        events, session.events = session.events, []
        handle(events)
    session.run_flushed()
    return data


def free(session: Session) -> None:
    """Free the session; data it still held is handed back to its producers."""
    session.close()
    session.run_flushed()
