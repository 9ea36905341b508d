"""Structured access log: one JSON line per request, sampled.

What operators read to plan a cut-over: who (client key, user agent, user), what (verb,
group/version/resource, namespace), where it belonged and where it went (home group,
chosen group, the group and endpoint that answered, fallback reason), and how it went
(status, duration, bytes). Lines are buffered and flushed a few times a second, not
written with a syscall per request.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from typing import IO, TYPE_CHECKING

from kom_gateway.config.model import AccessLogSettings

if TYPE_CHECKING:
    from kom_gateway.proxy.outcome import Finished

log = logging.getLogger(__name__)


def access_record(when: float, outcome: Finished) -> dict[str, object]:
    """The JSON object of one request that started at `when` (pure)."""
    client, info, decision = outcome.client, outcome.info, outcome.decision
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        + f".{int(when % 1 * 1000):03d}Z",
        "client": client.key,
        "userAgent": client.user_agent,
        "user": client.user or None,
        "verb": info.verb,
        "apiGroup": info.api_group,
        "apiVersion": info.api_version,
        "resource": info.resource,
        "subresource": info.subresource or None,
        "namespace": info.namespace or None,
        "name": info.name or None,
        "path": None if info.is_resource_request else info.path,
        "homeGroup": decision.home if decision else None,
        "chosenGroup": decision.target if decision else None,
        "cutover": decision.reason if decision else None,
        "answeredBy": outcome.answered_by,
        "endpoint": outcome.endpoint or None,
        "status": outcome.status,
        "durationMs": round(outcome.duration * 1000, 3),
        "bytesIn": outcome.bytes_in,
        "bytesOut": outcome.bytes_out,
        "fallback": outcome.fallback,
    }


def wanted(settings: AccessLogSettings, status: int, fallback: str | None, draw: float) -> bool:
    """Sampling: `draw` uniform in [0, 1); errors, 429s and fallbacks are always kept
    when `always_log_errors`."""
    if not settings.enabled:
        return False
    if settings.always_log_errors and (status >= 500 or status == 429 or fallback):
        return True
    return draw < settings.sample_rate


class AccessLog:
    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = AccessLogSettings(enabled=False)
        self._out: IO[str] | None = None
        self.configure(settings)

    def configure(self, settings: AccessLogSettings) -> None:
        """Apply (reloaded) settings; the file is reopened only if its path changed."""
        if self._out is not None and settings.path != self.settings.path:
            self.close()
        if settings.enabled and self._out is None:
            if settings.path == "-":
                self._out = sys.stdout
            else:
                try:
                    self._out = open(settings.path, "a", buffering=1 << 16)  # noqa: SIM115
                except OSError as exc:
                    log.error("access log %s cannot be opened: %s", settings.path, exc)
                    settings = AccessLogSettings(enabled=False, path=settings.path)
        self.settings = settings

    def wants(self, status: int, fallback: str | None) -> bool:
        """Whether this request is logged (ask before building its record)."""
        return self._out is not None and wanted(self.settings, status, fallback, random.random())

    def write(self, record: dict[str, object]) -> None:
        if self._out is not None:
            self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._out is not None:
            try:
                self._out.flush()
            except OSError as exc:
                log.error("access log write failed: %s", exc)

    def close(self) -> None:
        self.flush()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None
