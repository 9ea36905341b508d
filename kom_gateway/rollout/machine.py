"""The rollout's decisions (pure): from the state, the percent the config holds, the
percent each replica serves and the guard readings, what to do now; and how each action
changes the state. The runner only reads, writes and sleeps around these two."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kom_gateway.rollout.guards import Readings, ShadowReadings, Verdict, judge, judge_shadow
from kom_gateway.rollout.spec import RolloutSpec, ShadowPhase, format_duration
from kom_gateway.rollout.state import (
    ENDED,
    PAUSED,
    PROGRESSING,
    ROLLED_BACK,
    SHADOW_FAILED,
    SHADOW_ON,
    SHADOW_PASSED,
    SUCCEEDED,
    RolloutState,
)
from kom_gateway.routing.cutover import format_percent as pct

# what an action does to the config: only these write it (the last three, the rule's shadow)
WRITES = ("promote", "rollback", "shadow-on", "shadow-pass", "shadow-fail")


@dataclass(frozen=True)
class Action:
    kind: str  # promote, applied, hold, rollback, pause, succeed, ended
    message: str
    percent: float | None = None  # the percent to write (promote, rollback)
    verdict: Verdict | None = None
    readings: Readings | ShadowReadings | None = None
    topic: str = ""  # what a hold waits for (an Event is recorded when it changes)
    end_phase: str = ""  # the phase a failed shadow phase ends the rollout in


def new_state(spec: RolloutSpec, configured: float, now: float) -> RolloutState:
    """A rollout starting from whatever percent the config holds now."""
    return RolloutState(
        rule=spec.label,
        group=spec.group,
        steps=list(spec.steps),
        start_percent=configured,
        percent=configured,
        step_started=now,
    )


def reconcile(state: RolloutState, spec: RolloutSpec, configured: float, now: float) -> list[str]:
    """Bring a stored state up to date with the config and spec before deciding; what
    changed, in words."""
    notes = []
    if state.writing is not None:  # a write was cut short by a crash
        if configured == state.writing:
            notes.append(f"the interrupted write of {pct(state.writing)} had landed")
            state.percent = configured
            state.step_started, state.step_applied = now, None
        else:
            notes.append(f"the interrupted write of {pct(state.writing)} had not landed")
        state.writing = None
    if list(spec.steps) != state.steps:
        state.steps = list(spec.steps)
        notes.append(f"steps are now [{', '.join(pct(s) for s in spec.steps)}]")
    return notes


def resume(state: RolloutState, spec: RolloutSpec, configured: float, now: float) -> str:
    """An ended (paused, rolled back) rollout continues from the configured percent."""
    was = state.phase
    state.phase = PROGRESSING
    state.percent = configured
    state.step_started, state.step_applied = now, None
    state.reason = f"resumed from {was} at {pct(configured)}"
    state.note(now, "resume", state.reason, percent=configured)
    return state.reason


def decide(
    spec: RolloutSpec,
    state: RolloutState,
    configured: float,
    served: Sequence[float | None],
    readings: Readings | None,
    now: float,
    shadow_served: Sequence[float | None] = (),
    shadow_readings: ShadowReadings | None = None,
) -> Action:
    if state.phase in ENDED:
        return Action("ended", f"the rollout is {state.phase}: {state.reason}")
    if configured != state.percent:
        return Action(
            "pause",
            f"the percent was changed outside the rollout ({pct(state.percent)} -> "
            f"{pct(configured)}); paused so the two do not fight. Run again with --resume to "
            f"continue from {pct(configured)}",
        )
    steps = spec.steps
    if spec.shadow is not None and state.shadow != SHADOW_PASSED and state.percent < steps[0]:
        return _shadow_phase(spec, spec.shadow, state, shadow_served, shadow_readings, now)
    if state.percent < steps[0]:
        return Action("promote", f"starting: {pct(state.percent)} -> {pct(steps[0])}", steps[0])
    at = pct(state.percent)
    if state.step_applied is None:
        serving = sum(1 for p in served if p == state.percent)
        if served and serving == len(served):
            return Action("applied", f"all {len(served)} replica(s) serve {at}")
        waited = format_duration(now - state.step_started)
        return Action(
            "hold",
            f"waiting for every gateway replica to serve {at} ({serving} of {len(served)} do, "
            f"{waited} after the edit)",
            topic="reload",
        )
    if readings is None:
        return Action("hold", f"at {at}: collecting guard readings", topic="readings")
    verdict = judge(readings, spec.guards)
    if verdict.kind == "fail":
        return _failure(spec, state, verdict, readings)
    held = now - state.step_applied
    if held < spec.hold:
        return Action(
            "hold",
            f"at {at} for {format_duration(held)} of {format_duration(spec.hold)}; "
            f"{readings.describe()}; {verdict.describe()}",
            verdict=verdict,
            readings=readings,
            topic="hold",
        )
    if readings.seconds < spec.guards.window * 0.9:
        return Action(
            "hold",
            f"at {at}: waiting for a full {format_duration(spec.guards.window)} guard window "
            f"({format_duration(readings.seconds)} so far)",
            verdict=verdict,
            readings=readings,
            topic="window",
        )
    if verdict.kind == "insufficient":
        return Action(
            "hold",
            f"at {at}: {verdict.describe()}",
            verdict=verdict,
            readings=readings,
            topic="traffic",
        )
    if state.step + 1 >= len(steps):
        return Action(
            "succeed",
            f"held {at} for {format_duration(held)} with guards passing ({readings.describe()}): "
            "rollout complete",
            verdict=verdict,
            readings=readings,
        )
    nxt = steps[state.step + 1]
    return Action(
        "promote",
        f"{at} -> {pct(nxt)}: held {format_duration(held)}, {readings.describe()}",
        nxt,
        verdict,
        readings,
    )


def _shadow_phase(
    spec: RolloutSpec,
    phase: ShadowPhase,
    state: RolloutState,
    served: Sequence[float | None],
    readings: ShadowReadings | None,
    now: float,
) -> Action:
    """Before anyone moves: shadow reads on, every replica shadowing, held for the phase's
    hold over a full guard window with enough reads compared; then off, and the steps
    begin. A breach turns them off and ends the rollout where it started."""
    at = pct(phase.percent)
    if state.shadow != SHADOW_ON:
        return Action(
            "shadow-on",
            f"shadow phase: {at} of the reads of {spec.label}'s clients on default are also "
            f"asked of {spec.group} (at most {phase.max_per_second:g}/s) and compared, for "
            f"{format_duration(phase.hold)}, before anyone moves",
        )
    if state.shadow_applied is None:
        shadowing = sum(1 for p in served if p == phase.percent)
        if served and shadowing == len(served):
            return Action("shadow-applied", f"all {len(served)} replica(s) shadow {at} of reads")
        return Action(
            "hold",
            f"waiting for every gateway replica to shadow {at} of reads ({shadowing} of "
            f"{len(served)} do)",
            topic="reload",
        )
    if readings is None:
        return Action("hold", "shadow phase: collecting readings", topic="readings")
    verdict = judge_shadow(
        readings, phase.max_mismatch_ratio, phase.max_p99_seconds, spec.guards.min_requests
    )
    if verdict.kind == "fail":
        end = PAUSED if spec.on_failure == "pause" else ROLLED_BACK
        return Action(
            "shadow-fail",
            f"shadow phase failed: {verdict.describe()} ({readings.describe()}); shadow reads "
            f"off, and the rollout stops at {pct(state.percent)} before anyone moved",
            verdict=verdict,
            readings=readings,
            end_phase=end,
        )
    held = now - state.shadow_applied
    waiting, topic = "", ""
    if held < phase.hold:
        waiting, topic = f"held {format_duration(held)} of {format_duration(phase.hold)}", "hold"
    elif readings.seconds < spec.guards.window * 0.9:
        waiting = f"waiting for a full {format_duration(spec.guards.window)} window"
        topic = "window"
    elif verdict.kind == "insufficient":
        waiting, topic = "waiting for traffic", "traffic"
    if waiting:
        return Action(
            "hold",
            f"shadow phase {waiting}: {readings.describe()}; {verdict.describe()}",
            verdict=verdict,
            readings=readings,
            topic=f"shadow {topic}",
        )
    return Action(
        "shadow-pass",
        f"shadow phase passed after {format_duration(held)}: {readings.describe()}; shadow "
        "reads off, the steps begin",
        verdict=verdict,
        readings=readings,
    )


def _failure(
    spec: RolloutSpec, state: RolloutState, verdict: Verdict, readings: Readings
) -> Action:
    why = f"guards failed at {pct(state.percent)}: {verdict.describe()} ({readings.describe()})"
    if spec.on_failure == "pause":
        return Action("pause", f"{why}; paused at {pct(state.percent)}", None, verdict, readings)
    if spec.rollback_to == "0":
        to = 0.0
    else:
        to = spec.steps[state.step - 1] if state.step > 0 else state.start_percent
    return Action("rollback", f"{why}; rolling back to {pct(to)}", to, verdict, readings)


def advance(state: RolloutState, action: Action, now: float) -> None:
    """The state after `action` (a write's percent has landed by the time this runs)."""
    if action.readings is not None:
        state.last_readings = action.readings.as_json()
    if action.verdict is not None:
        state.last_verdict = action.verdict.describe()
    kind = action.kind
    if kind in ("hold", "ended"):
        state.reason = action.message
        return
    state.reason = action.message
    if kind == "applied":
        state.step_applied = now
    elif kind == "promote":
        assert action.percent is not None
        state.percent = action.percent
        state.step_started, state.step_applied = now, None
    elif kind == "rollback":
        assert action.percent is not None
        state.percent = action.percent
        state.phase = ROLLED_BACK
    elif kind == "pause":
        state.phase = PAUSED
    elif kind == "succeed":
        state.phase = SUCCEEDED
    elif kind == "shadow-on":
        state.shadow, state.shadow_applied = SHADOW_ON, None
    elif kind == "shadow-applied":
        state.shadow_applied = now
    elif kind == "shadow-pass":
        state.shadow = SHADOW_PASSED
        state.step_started = now
    elif kind == "shadow-fail":
        state.shadow = SHADOW_FAILED
        state.phase = action.end_phase
    state.note(now, kind, action.message, percent=state.percent)
