"""The simulator's fault switches and its control API's description (pure: `sim --help`
and the docs read it without starting anything)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DIVERGENCES = ("", "content", "missing", "extra")
CONTROL_PORT = 16440  # the control API's default port (`sim --control-port`, the demo's)


@dataclass
class Faults:
    latency: float = 0.0  # seconds before answering
    capacity: int = 0  # with latency: requests in that wait at once, the rest queue (0: no cap)
    throttle: float = 0.0  # share of requests answered 429 + Retry-After
    retry_after: int = 1
    goaway_chance: float = 0.0  # per HTTP/2 request: graceful GOAWAY of its connection
    reset_mid_body: bool = False  # GET/LIST/WATCH/log responses are reset after the first chunk
    reset_after_headers: bool = False  # GET/LIST: response headers, then a reset (no body)
    reset_before_headers: bool = False  # read the request, then reset without answering
    refuse_streams: bool = False  # HTTP/2 RST_STREAM(REFUSED_STREAM): "not processed"
    status_override: int = 0  # answer every resource request with this status
    readyz_status: int = 0  # answer /readyz with this status (a failing readiness check)
    reset_mid_event: bool = False  # watches: half of the first event, then a reset
    # divergence (what shadow reads find): a correct group answers every read as default
    stale_by: int = 0  # reads see the store as it was this many writes ago (a lagging cache)
    lacks_resource: str = ""  # 404 for this resource ("pods", "leases.coordination.k8s.io")
    diverge: str = ""  # reads differ: "content" (a label added), "missing" or "extra" (an item)

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(known)})")
            if key == "diverge" and value not in DIVERGENCES:
                raise ValueError(f"diverge must be one of {', '.join(map(repr, DIVERGENCES))}")
            setattr(self, key, type(getattr(self, key))(value))


def control_api_help() -> str:
    """The control API, as `sim --help` and the docs describe it."""
    faults = ", ".join(f.name for f in fields(Faults))
    return (
        "control API (JSON over HTTP on --control-port):\n"
        "  GET  /groups                 each group: port, down, faults, what it served\n"
        '  PUT  /groups/NAME/faults     set faults, e.g. {"status_override": 500}; fields:\n'
        f"                               {faults}\n"
        "  POST /groups/NAME/down       stop serving (connections refused), /up to return\n"
        "  GET  /requests               the last requests: group, method, target, client\n"
        "  POST /reset                  every fault off, every group up, counters zeroed"
    )
