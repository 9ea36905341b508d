"""What the nghttp2 engine's server and client connections do alike with their session:
act on what its framing caused once the framed buffer is written, and free it when the
transport is gone. Functions, not a mixin: the compiled core's classes take one base
class each."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kom_gateway.http.events import EngineEvent

if TYPE_CHECKING:  # (the engine imports the binding; this module only needs its type)
    from kom_gateway.http.nghttp2._nghttp2 import Session


def after_send(session: Session, handle: Callable[[list[EngineEvent]], None]) -> None:
    """Once what `session.send()` framed is written: events of streams that closed as
    their last frame went out are handed to `handle`, and producers whose data went out
    hear so."""
    events = session.take_events()
    if events:
        handle(events)
    session.run_flushed()


def free(session: Session) -> None:
    """Free the session; data it still held is handed back to its producers."""
    session.close()
    session.run_flushed()
