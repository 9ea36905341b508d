"""metav1.Status: how kube-apiserver (and so the gateway and the simulator) write errors."""

from __future__ import annotations

import json
from typing import Any


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A Failure Status; client-go reads reason/code/details from it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> bytes:
    """A Failure Status as the JSON bytes of a response body."""
    return json.dumps(status_object(code, reason, message, details)).encode()
