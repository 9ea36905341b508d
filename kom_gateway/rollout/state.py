"""What a rollout remembers between readings and across restarts (pure data + JSON),
and the lease that keeps a second controller off the same rule.

The state lives next to the routing config (a status file beside a `file:` target, an
annotation on a ConfigMap target), so a restarted controller resumes where it was."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
ROLLED_BACK = "RolledBack"
PAUSED = "Paused"
ENDED = (SUCCEEDED, ROLLED_BACK, PAUSED)
SHADOW_OFF, SHADOW_ON, SHADOW_PASSED, SHADOW_FAILED = "", "on", "passed", "failed"
HISTORY_KEPT = 50


def step_of(steps: list[float], percent: float) -> int:
    """Index of the highest step at or below `percent` (-1: below the first)."""
    return bisect.bisect_right(steps, percent) - 1


def rollout_key(label: str, group: str) -> str:
    """A stable, file- and annotation-safe name for (rule, group)."""
    digest = hashlib.sha256(f"{label}\0{group}".encode()).hexdigest()[:10]
    return f"{group}-{digest}"


@dataclass
class Lease:
    holder: str  # "host/pid/random": one controller process
    host: str
    pid: int
    renewed: float  # wall-clock seconds
    seconds: float

    @classmethod
    def mine(cls, now: float, seconds: float) -> Lease:
        host = socket.gethostname()
        return cls(f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}", host, os.getpid(), now, seconds)

    def expires(self) -> float:
        return self.renewed + self.seconds

    def lapsed(self, now: float) -> bool:
        """Expired, or held by a process of this host that no longer runs."""
        if now >= self.expires():
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


@dataclass
class RolloutState:
    rule: str  # the rule's label
    group: str
    steps: list[float]
    start_percent: float  # where the rollout began (what "previous" means before step 0)
    percent: float = 0.0  # what the controller last wrote (or found at start)
    phase: str = PROGRESSING
    step_started: float = 0.0  # when the current percent was written
    step_applied: float | None = None  # when every replica served it (the hold starts)
    writing: float | None = None  # percent being written: set before the config write
    reason: str = ""  # why the rollout is where it is (for humans)
    last_readings: dict[str, Any] | None = None
    last_verdict: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    lease: Lease | None = None
    # the shadow phase (spec `shadow`): SHADOW_OFF, SHADOW_ON, SHADOW_PASSED or SHADOW_FAILED
    shadow: str = ""
    shadow_applied: float | None = None  # when every replica shadowed (its hold starts)
    # {"shadow": the rule's own `shadow` (None: none)}, taken when the phase began, put back
    shadow_restore: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        """Index into steps of the percent now configured (-1: below the first)."""
        return step_of(self.steps, self.percent)

    def note(self, now: float, action: str, message: str, **extra: Any) -> None:
        self.history.append({"time": round(now, 3), "action": action, "message": message, **extra})
        del self.history[:-HISTORY_KEPT]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        raw = json.loads(text)
        lease = raw.pop("lease", None)
        state = cls(**raw)
        state.lease = Lease(**lease) if lease else None
        return state
