"""What to do when an attempt fails: the fallback-to-default policy (pure).

Every group shares etcd with `default`, so default can always serve a request correctly;
the only question is whether retrying is *safe*:

- the apiserver sent GOAWAY before taking the stream (routine: `--goaway-chance`):
  retry on a fresh connection to the same group, up to GOAWAY_RETRIES times (as Go's
  transport does), then as below;
- nothing reached the apiserver (no healthy endpoint, connect/TLS error, REFUSED_STREAM,
  GOAWAY again): retry on default, any verb;
- the request was sent but no response headers came: reads are retried on default;
  writes may have been applied, so the client gets 503 + Retry-After (client-go retries);
- a non-default group answered a read with 500/502/503/504 (`falls_back_on_status`),
  before any of it went to the client: retried on default, which shares the group's etcd
  and can give the right answer; a write's 5xx is its answer (it may have been applied);
- a non-default group's response to a (short) read broke after its headers but before
  any body byte reached the client (its headers are held until then:
  `holds_response_headers`): retried on default, like a 5xx;
- default itself failed: try its other endpoints for unsent requests, else 503.

Failures after the response started are not retried here: a watch is ended cleanly so the
client re-watches (and lands on a healthy group); anything else is reset.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.routing.router import DEFAULT_GROUP


class Failure(Enum):
    NO_HEALTHY_ENDPOINT = "no-healthy-endpoint"
    CONNECT = "connect-error"
    GOAWAY = "goaway"  # above the upstream's GOAWAY last-stream-id: not processed
    REFUSED = "refused"  # RST_STREAM(REFUSED_STREAM): not processed
    RESET_BEFORE_HEADERS = "reset-before-headers"  # sent; may have been processed
    RESET_BEFORE_BODY = "reset-before-body"  # headers came (held), then a reset: a read
    UPSTREAM_5XX = "upstream-5xx"  # a read answered 500/502/503/504 by a non-default group

    @property
    def unsent(self) -> bool:
        return self in (
            Failure.NO_HEALTHY_ENDPOINT,
            Failure.CONNECT,
            Failure.REFUSED,
            Failure.GOAWAY,
        )


class Next(NamedTuple):
    retry_group: str | None  # try this group next (None: answer the client)
    status: int = 0
    reason: str = ""
    message: str = ""
    retry_after: int | None = None


GOAWAY_RETRIES = 3
READ_VERBS = frozenset({"get", "list", "watch"})


def is_idempotent_read(info: RequestInfo, method: str) -> bool:
    return method in ("GET", "HEAD") or info.verb in READ_VERBS


FALLBACK_STATUSES = frozenset({500, 502, 503, 504})


def may_fall_back(info: RequestInfo, method: str, group: str) -> bool:
    """Whether a failed answer from `group` may be replaced by default's: reads only
    (a write may have been applied), and never from default itself."""
    return group != DEFAULT_GROUP and is_idempotent_read(info, method)


def falls_back_on_status(status: int, info: RequestInfo, method: str, group: str) -> bool:
    """Whether a response with `status` from `group` is retried on default instead of
    being relayed. Never for writes (they may have been applied), never for default
    itself, never for 4xx or 429 (those are the apiserver's answer, not ill health)."""
    return status in FALLBACK_STATUSES and may_fall_back(info, method, group)


def holds_response_headers(info: RequestInfo, method: str, group: str) -> bool:
    """Whether `group`'s response headers wait for its first body byte (or its end)
    before going to the client: so that a response that breaks before any of it reached
    the client can still be retried on default. Short reads only: a watch's headers must
    not wait for its first event, which may be minutes away."""
    return not info.is_long_running and may_fall_back(info, method, group)


def after_failure(
    failure: Failure,
    info: RequestInfo,
    method: str,
    group: str,
    default_endpoints_left: bool,
    goaways: int = 0,
) -> Next:
    """The next step after `failure` on `group` (`goaways`: GOAWAYs met so far)."""
    if failure is Failure.GOAWAY and goaways <= GOAWAY_RETRIES:
        return Next(group)
    retry_safe = failure.unsent or is_idempotent_read(info, method)
    if not retry_safe:
        return Next(
            None,
            503,
            "ServiceUnavailable",
            f"the apiserver group {group!r} failed before answering ({failure.value}); "
            "the request may or may not have been applied",
            1,
        )
    if group != DEFAULT_GROUP:
        return Next(DEFAULT_GROUP)
    if default_endpoints_left:
        return Next(DEFAULT_GROUP)
    return Next(
        None, 503, "ServiceUnavailable", f"no apiserver could take the request ({failure.value})", 1
    )
