"""`kom-gateway rollout run` and `status`: the thin I/O loop around `machine`.

Every reading: read the target, take a guard reading, decide, and act, each step one log
line (and, for a ConfigMap, an Event on it). An edit is written as: state marked
"writing" -> config (compare-and-swap) -> state; a crash anywhere in between is resolved
on restart by looking at what the config holds."""

from __future__ import annotations

import difflib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TextIO

from kom_gateway.rollout import machine
from kom_gateway.rollout.edit import (
    EditError,
    current_percent,
    current_shadow,
    number,
    set_percent,
    set_shadow,
    validate,
)
from kom_gateway.rollout.machine import WRITES, Action
from kom_gateway.rollout.sources import GatewaysSource, PrometheusSource, Source
from kom_gateway.rollout.spec import RolloutSpec, format_duration
from kom_gateway.rollout.state import (
    ENDED,
    PAUSED,
    ROLLED_BACK,
    SHADOW_FAILED,
    SHADOW_OFF,
    SHADOW_ON,
    SHADOW_PASSED,
    SUCCEEDED,
    Lease,
    RolloutState,
)
from kom_gateway.rollout.targets import Conflict, Snapshot, Target, TargetError
from kom_gateway.routing.cutover import format_percent as pct

log = logging.getLogger("kom_gateway.rollout")

EXIT_CODES = {SUCCEEDED: 0, ROLLED_BACK: 3, PAUSED: 4}
EVENT_REASONS = {
    "start": ("RolloutStarted", False),
    "resume": ("RolloutResumed", False),
    "promote": ("RolloutPromoted", False),
    "applied": ("RolloutStepServed", False),
    "hold": ("RolloutHolding", False),
    "rollback": ("RolloutRolledBack", True),
    "pause": ("RolloutPaused", True),
    "succeed": ("RolloutSucceeded", False),
    "shadow-on": ("RolloutShadowStarted", False),
    "shadow-applied": ("RolloutShadowServed", False),
    "shadow-pass": ("RolloutShadowPassed", False),
    "shadow-fail": ("RolloutShadowFailed", True),
}


class RolloutError(Exception):
    """The rollout cannot run; nothing was written."""


def make_source(spec: RolloutSpec) -> Source:
    g = spec.guards
    timeout = max(1.0, min(5.0, spec.interval))
    if g.prometheus:
        return PrometheusSource(
            g.prometheus, spec.label, spec.group, g.window, timeout, 2 * spec.interval
        )
    return GatewaysSource(g.gateways, spec.label, spec.group, g.window, timeout)


class Rollout:
    def __init__(
        self,
        spec: RolloutSpec,
        target: Target,
        source: Source,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.target = target
        self.source = source
        self.clock = clock
        self.lease = Lease.mine(clock(), max(15.0, 3 * spec.interval))
        self._last_hold = ""

    # -- reading the target ----------------------------------------------------------------
    def configured(self, snapshot: Snapshot) -> float:
        try:
            config = validate(snapshot.text, self.target.describe())
        except EditError as exc:
            raise RolloutError(f"{self.target.describe()} does not pass check now: {exc}") from None
        if self.spec.group not in config.groups:
            raise RolloutError(f"the routing config has no group {self.spec.group!r}")
        return current_percent(config, self.spec.rule, self.spec.group)

    # -- starting ----------------------------------------------------------------------------
    def start(self, resume: bool, restart: bool) -> tuple[Snapshot, RolloutState]:
        snapshot = self.target.read()
        configured = self.configured(snapshot)
        now = self.clock()
        held_by = self.target.lock(self.lease.holder)
        state = snapshot.state
        lease = state.lease if state is not None else None
        theirs = lease is not None and lease.holder != self.lease.holder
        if held_by is None and theirs and lease is not None and not lease.lapsed(now):
            held_by = self._live_holder(lease)
        if held_by is not None:
            until = f" (its lease runs to {_clock_text(lease.expires())})" if lease else ""
            raise RolloutError(
                f"another controller drives {self.spec.describe()} on {self.target.describe()}: "
                f"{held_by}{until}. Two would fight over the percent; stop that one first (its "
                "lock is released when it exits)"
            )
        if state is None or restart:
            state = machine.new_state(self.spec, configured, now)
            action = "start"
            message = (
                f"starting {self.spec.describe()} from {pct(configured)} on "
                f"{self.target.describe()}"
            )
        else:
            action = "resume"
            notes = machine.reconcile(state, self.spec, configured, now)
            shadow = current_shadow(validate(snapshot.text, self.target.describe()), self.spec.rule)
            if state.shadow == SHADOW_ON and shadow != phase_shadow(self.spec):
                state.shadow, state.shadow_applied = SHADOW_OFF, None
                notes.append("the rule's shadow is not the phase's: the shadow phase starts over")
            message = f"resuming {self.spec.describe()} at {pct(state.percent)} ({state.phase})"
            if notes:
                message += "; " + "; ".join(notes)
            if state.phase in ENDED and resume:
                message = machine.resume(state, self.spec, configured, now)
        if state.phase in ENDED and configured != state.percent and not resume:
            raise RolloutError(hand_edit_advice(self.spec, state, configured))
        if state.phase == SUCCEEDED:  # running a completed rollout again changes nothing
            log.info(
                "the rollout already completed at %s: nothing to do (--restart runs it again)",
                pct(state.percent),
            )
            return snapshot, state
        if state.phase in ENDED:
            raise RolloutError(
                f"the rollout is {state.phase} at {pct(state.percent)}: {state.reason}. "
                "Fix the cause and run again with --resume (continue from the configured "
                "percent) or --restart (start over)"
            )
        state.note(now, action, message, percent=state.percent)
        self.lease.renewed = now
        state.lease = self.lease
        snapshot = self.target.write(snapshot, None, state)
        self._say(action, message)
        return snapshot, state

    def _live_holder(self, lease: Lease) -> str | None:
        """Who holds `lease`, if it is alive: a controller renews its lease at every
        reading, so one seen renewing is refused at once, and one that stops (a crashed
        pod: another host, no pid to check) is taken over when its lease lapses."""
        log.info(
            "the rollout's lease is held by %s: waiting up to %s to see whether it renews it",
            lease.holder,
            format_duration(lease.seconds),
        )
        deadline = time.monotonic() + lease.seconds + 1
        while time.monotonic() < deadline:
            time.sleep(min(1.0, lease.seconds / 10))
            state = self.target.read().state
            current = state.lease if state is not None else None
            if current is None:
                return None  # released meanwhile
            if current.holder != lease.holder or current.renewed != lease.renewed:
                return current.holder  # alive (or another controller took it)
            if current.lapsed(self.clock()):
                return None
        return None

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event, resume: bool = False, restart: bool = False) -> int:
        _, state = self.start(resume, restart)
        if state.phase == SUCCEEDED:
            return EXIT_CODES[SUCCEEDED]
        try:
            while True:
                try:
                    self.tick(state)
                except Conflict as exc:  # the next reading reads the target again
                    log.info("%s; reading it again", exc)
                if state.phase in ENDED:
                    return EXIT_CODES[state.phase]
                if stop.wait(self.spec.interval):
                    log.info(
                        "stopped at %s (%s); the state is saved: run again to resume",
                        pct(state.percent),
                        state.reason,
                    )
                    return 0
        finally:
            self._release(state)

    def tick(self, state: RolloutState) -> None:
        """One reading: read the target and the guards, decide, act (`state` is the
        controller's own; the stored copy only tells whether another took over)."""
        snapshot = self.target.read()
        stored = snapshot.state.lease if snapshot.state is not None else None
        if stored is not None and stored.holder != self.lease.holder:
            raise RolloutError(f"{stored.holder} took over the rollout; this controller stops")
        try:
            configured = self.configured(snapshot)
        except RolloutError as exc:  # the gateways keep serving their last good config
            log.warning("holding: %s", exc)
            return
        now = self.clock()
        for problem in self.source.observe(now):
            log.warning("guard source: %s", problem)
        since = state.step_applied if state.step_applied is not None else now
        readings = self.source.readings(since, now)
        shadow_since = state.shadow_applied if state.shadow_applied is not None else now
        action = machine.decide(
            self.spec,
            state,
            configured,
            self.source.served(),
            readings,
            now,
            self.source.shadow_served(),
            self.source.shadow_readings(shadow_since, now),
        )
        self.lease.renewed = now
        state.lease = self.lease
        if action.kind in WRITES:
            self._write(snapshot, state, action, now)
        else:
            if action.kind in ("applied", "shadow-applied"):
                self.source.clear()
            machine.advance(state, action, now)
            self.target.write(snapshot, None, state)
        self._say(action.kind, action.message, action.topic)

    def _write(self, snapshot: Snapshot, state: RolloutState, action: Action, now: float) -> None:
        if action.kind.startswith("shadow-"):
            self._write_shadow(snapshot, state, action, now)
            return
        assert action.percent is not None
        try:
            text = set_percent(
                snapshot.text,
                self.spec.rule,
                self.spec.group,
                action.percent,
                self.target.describe(),
            )
        except EditError as exc:
            raise RolloutError(f"cannot move to {pct(action.percent)}: {exc}") from None
        state.writing = action.percent
        try:
            snapshot = self.target.write(snapshot, None, state)
            snapshot = self.target.write(snapshot, text, state)
        finally:
            state.writing = None
        machine.advance(state, action, now)
        self.source.clear()
        self.target.write(snapshot, None, state)

    def _write_shadow(
        self, snapshot: Snapshot, state: RolloutState, action: Action, now: float
    ) -> None:
        """The shadow phase's edits: the rule's `shadow` set to the phase's (what the rule
        had is kept in the state), and put back as it was when the phase ends."""
        spec, phase = self.spec, self.spec.shadow
        assert phase is not None
        config = validate(snapshot.text, self.target.describe())
        shadow: dict | None
        if action.kind == "shadow-on":
            if state.shadow_restore is None:  # (a retried write must not take its own)
                state.shadow_restore = {"shadow": current_shadow(config, spec.rule)}
            shadow = phase_shadow(spec)
        else:
            shadow = (state.shadow_restore or {}).get("shadow")
        try:
            text = set_shadow(snapshot.text, spec.rule, shadow, spec.group, self.target.describe())
        except EditError as exc:
            raise RolloutError(f"cannot set the rule's shadow: {exc}") from None
        snapshot = self.target.write(snapshot, None, state)  # (the restore value, first)
        snapshot = self.target.write(snapshot, text, state)
        machine.advance(state, action, now)
        self.source.clear()
        self.target.write(snapshot, None, state)

    def _release(self, state: RolloutState) -> None:
        """Give the lease up so a restarted controller resumes at once."""
        try:
            snapshot = self.target.read()
            current = snapshot.state
            if (
                current is not None
                and current.lease is not None
                and current.lease.holder == self.lease.holder
            ):
                current.lease = None
                self.target.write(snapshot, None, current)
        except TargetError as exc:
            log.warning("could not release the rollout lease: %s", exc)

    def _say(self, kind: str, message: str, topic: str = "") -> None:
        """One log line per reading; an Event when something happened (a hold only when
        what it waits for changes, so Events stay readable)."""
        log.info("%s: %s", kind, message)
        if kind == "hold":
            if topic == self._last_hold:
                return
            self._last_hold = topic
        else:
            self._last_hold = ""
        reason, warning = EVENT_REASONS.get(kind, ("Rollout", False))
        try:
            self.target.event(warning, reason, message)
        except TargetError as exc:
            log.warning("%s", exc)


def _clock_text(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def dry_run(spec: RolloutSpec, target: Target, out: TextIO) -> int:
    """The edits the rollout would make from here, as diffs; nothing is written."""
    snapshot = target.read()
    text = snapshot.text
    config = validate(text, target.describe())
    percent = current_percent(config, spec.rule, spec.group)
    print(f"{spec.describe()} on {target.describe()}: now {pct(percent)}", file=out)
    if spec.shadow is not None and percent < spec.steps[0]:
        shadowed = set_shadow(text, spec.rule, phase_shadow(spec), spec.group, target.describe())
        print(f"\n# first, the shadow phase for {format_duration(spec.shadow.hold)} (its rule's "
              "shadow set, then put back as it was)", file=out)  # fmt: skip
        out.writelines(
            difflib.unified_diff(
                text.splitlines(True), shadowed.splitlines(True), "before", "after", n=1
            )
        )
    for step in (s for s in spec.steps if s > percent):
        new = set_percent(text, spec.rule, spec.group, step, target.describe())
        print(f"\n# {pct(percent)} -> {pct(step)}, after a hold of {format_duration(spec.hold)} "
              "with guards passing", file=out)  # fmt: skip
        out.writelines(
            difflib.unified_diff(
                text.splitlines(True), new.splitlines(True), "before", "after", n=1
            )
        )
        text, percent = new, step
    if spec.on_failure == "rollback":
        to = "0%" if spec.rollback_to == "0" else "the step before"
        print(f"\nOn a failed guard: roll back to {to}.", file=out)
    else:
        print("\nOn a failed guard: pause where it is.", file=out)
    return 0


def status(spec: RolloutSpec, target: Target, out: TextIO, as_json: bool, now: float) -> int:
    snapshot = target.read()
    config = validate(snapshot.text, target.describe())
    configured = current_percent(config, spec.rule, spec.group)
    state = snapshot.state
    report = status_report(spec, state, configured, now)
    if as_json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    print(f"rollout: {spec.describe()}", file=out)
    print(f"target: {target.describe()}", file=out)
    for key in (
        "phase",
        "shadow",
        "percent",
        "step",
        "held",
        "controller",
        "lastReadings",
        "lastVerdict",
        "reason",
        "drift",
        "next",
    ):
        value = report.get(key)
        if value not in (None, ""):
            print(f"{key}: {value if not isinstance(value, dict) else json.dumps(value)}", file=out)
    return 0


def phase_shadow(spec: RolloutSpec) -> dict | None:
    """The rule's `shadow` while the spec's shadow phase runs."""
    if spec.shadow is None:
        return None
    return {
        "group": spec.group,
        "percent": number(spec.shadow.percent),
        "maxPerSecond": number(spec.shadow.max_per_second),
    }


def _shadow_status(spec: RolloutSpec, state: RolloutState) -> str | None:
    """The shadow phase in words (None: the spec has none)."""
    phase = spec.shadow
    if phase is None:
        return None
    if state.shadow == SHADOW_ON:
        if state.shadow_applied is None:
            return f"on at {pct(phase.percent)}, waiting for every replica"
        return f"on at {pct(phase.percent)} of reads"
    return {SHADOW_PASSED: "passed", SHADOW_FAILED: "failed"}.get(state.shadow, "not started")


def hand_edit_advice(spec: RolloutSpec, state: RolloutState, configured: float) -> str:
    """An ended rollout whose percent was changed by hand since: say so, and what to run."""
    return (
        f"the config holds {pct(configured)} for {spec.group} but this rollout ended "
        f"{state.phase} at {pct(state.percent)}: the percent was edited by hand since. "
        f"`rollout run --restart` rolls out again from {pct(configured)}; `rollout run "
        f"--resume` continues the steps from {pct(configured)}; or set it back to "
        f"{pct(state.percent)} to match"
    )


def status_report(
    spec: RolloutSpec, state: RolloutState | None, configured: float, now: float
) -> dict:
    """What `rollout status` says (pure)."""
    if state is None:
        nxt = next((s for s in spec.steps if s > configured), None)
        first = ""
        if spec.shadow is not None and configured < spec.steps[0]:
            first = f"runs the shadow phase ({format_duration(spec.shadow.hold)}), then "
        return {
            "phase": "NotStarted",
            "percent": pct(configured),
            "next": f"`rollout run` {first}moves {pct(configured)} -> {pct(nxt)}"
            if nxt
            else "nothing: already past the last step",
        }
    n = len(spec.steps)
    report: dict = {
        "phase": state.phase,
        "shadow": _shadow_status(spec, state),
        "percent": pct(configured),
        "step": f"{state.step + 1} of {n}" if state.step >= 0 else f"before step 1 of {n}",
        "held": None,
        "controller": None,
        "lastReadings": state.last_readings,
        "lastVerdict": state.last_verdict,
        "reason": state.reason,
        "history": state.history,
    }
    if state.lease is not None and not state.lease.lapsed(now):
        report["controller"] = (
            f"{state.lease.holder} (renewed {format_duration(now - state.lease.renewed)} ago)"
        )
    if state.step_applied is not None:
        report["held"] = (
            f"{format_duration(now - state.step_applied)} of {format_duration(spec.hold)}"
        )
    if configured != state.percent and state.phase in ENDED:
        report["drift"] = hand_edit_advice(spec, state, configured)
        report["next"] = "nothing until you choose (see drift)"
    elif configured != state.percent:
        report["next"] = (
            f"the config holds {pct(configured)} but the rollout wrote {pct(state.percent)}: "
            "a running controller pauses"
        )
    elif state.phase in ENDED:
        report["next"] = "nothing: run with --resume or --restart to continue"
    elif spec.shadow is not None and state.shadow != SHADOW_PASSED and state.step < 0:
        report["next"] = (
            f"finish the shadow phase ({format_duration(spec.shadow.hold)} with mismatches at "
            f"most {spec.shadow.max_mismatch_ratio:.2%}), then move to {pct(spec.steps[0])}"
        )
    elif state.step_applied is None:
        report["next"] = (
            f"waiting for every replica to serve {pct(state.percent)}, "
            f"then hold {format_duration(spec.hold)}"
        )
    else:
        left = spec.hold - (now - state.step_applied)
        nxt = spec.steps[state.step + 1] if state.step + 1 < n else None
        goal = f"promote to {pct(nxt)}" if nxt is not None else "complete the rollout"
        wait = f"in {format_duration(left)}" if left > 0 else "at the next reading"
        report["next"] = f"{goal} {wait} if the guards pass"
    return report
