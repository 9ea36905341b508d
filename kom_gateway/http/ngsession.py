"""What the nghttp2 engine's server and client connections share around their session:
draining it into one buffer per pass, and what happens when the transport is gone."""

from __future__ import annotations

from kom_gateway.http import _nghttp2 as ng


class NgSessionOwner:
    session: ng.Session
    _paused: bool

    def _handle(self, events: list[tuple]) -> None:
        raise NotImplementedError

    def _data_to_send(self) -> bytes:
        if self._paused:  # the transport's buffer is full: nghttp2 holds the rest
            return b""
        session = self.session
        data = session.send()
        if session.events:  # streams that closed as their last frame went out
            events, session.events = session.events, []
            self._handle(events)
        session.run_flushed()
        return data

    def _closed(self) -> None:
        """Free the session; data it still held is handed back to its producers."""
        self.session.close()
        self.session.run_flushed()
