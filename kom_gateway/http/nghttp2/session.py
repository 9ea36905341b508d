"""What the nghttp2 engine's server and client connections do alike with their session:
drain it into one buffer per pass (unless the transport's buffer is full: nghttp2 then
holds the rest), and free it when the transport is gone. Functions, not a mixin: the
compiled core's classes take one base class each."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kom_gateway.http.events import EngineEvent

if TYPE_CHECKING:  # (the engine imports the binding; this module only needs its type)
    from kom_gateway.http.nghttp2._nghttp2 import Session


def drain(session: Session, handle: Callable[[list[EngineEvent]], None]) -> bytes:
    """The frames nghttp2 has ready; events of streams that closed as their last frame
    went out are handed to `handle`, and producers whose data went out hear so."""
    data = session.send()
    events = session.take_events()
    if events:
        handle(events)
    session.run_flushed()
    return data


def free(session: Session) -> None:
    """Free the session; data it still held is handed back to its producers."""
    session.close()
    session.run_flushed()
