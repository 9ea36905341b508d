"""Guard readings from counter increases, and the verdict on them (pure).

A reading is never one scrape: it is what the rule's moved requests did between two
readings a window apart, summed over every gateway replica. A replica whose counters went
down restarted, so its increase is its new value (as Prometheus' `increase()`); one that
was missing at the start of the window is left out until it has two readings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kom_gateway.rollout.spec import Guards, format_duration

ANSWERED = ("1xx", "2xx", "3xx", "4xx", "5xx", "broken")  # the group answered
ERRORS = ("5xx", "broken")


@dataclass(frozen=True)
class ReplicaSample:
    """One replica's counters for one (rule, group): outcome -> count, and the latency
    histogram's cumulative bucket counts (upper bound -> count, +Inf included)."""

    outcomes: Mapping[str, float] = field(default_factory=dict)
    buckets: Mapping[float, float] = field(default_factory=dict)
    percent: float | None = None  # the percent this replica serves for (rule, group)
    # shadow reads: result -> count, the candidate's latency buckets, the shadow percent
    shadow: Mapping[str, float] = field(default_factory=dict)
    shadow_buckets: Mapping[float, float] = field(default_factory=dict)
    shadow_percent: float | None = None


@dataclass(frozen=True)
class Sample:
    time: float
    replicas: Mapping[str, ReplicaSample]  # replica (its URL) -> its counters
    unreachable: tuple[str, ...] = ()  # replicas that did not answer, with why


@dataclass(frozen=True)
class Readings:
    seconds: float  # the span the readings cover
    requests: float  # moved requests: answered by the group or fallen back
    answered: float
    errors: float
    fallbacks: float
    p99: float | None  # seconds; None with no latency observations
    replicas: int = 0

    @property
    def error_ratio(self) -> float:
        return self.errors / self.answered if self.answered else 0.0

    @property
    def fallback_ratio(self) -> float:
        return self.fallbacks / self.requests if self.requests else 0.0

    def describe(self) -> str:
        p99 = "n/a" if self.p99 is None else f"{self.p99 * 1000:.0f}ms"
        return (
            f"{self.requests:.0f} requests in {format_duration(self.seconds)} from "
            f"{self.replicas} replica(s): errors {self.error_ratio:.2%}, "
            f"fallbacks {self.fallback_ratio:.2%}, p99 {p99}"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "errorRatio": round(self.error_ratio, 6),
            "fallbackRatio": round(self.fallback_ratio, 6),
            "p99Seconds": self.p99,
        }


def _increase(now: float, then: float) -> float:
    return now if now < then else now - then


Counts = Mapping[str, float]
Buckets = Mapping[float, float]


def _increases(
    start: Sample, end: Sample, pick: Callable[[ReplicaSample], tuple[Counts, Buckets]]
) -> tuple[dict[str, float], dict[float, float], int]:
    """Increases of the counters `pick` chooses from `start` to `end`, summed over the
    replicas present in both (and how many those are)."""
    counts: dict[str, float] = {}
    buckets: dict[float, float] = {}
    replicas = 0
    for name, now_sample in end.replicas.items():
        then_sample = start.replicas.get(name)
        if then_sample is None:
            continue
        replicas += 1
        now, now_buckets = pick(now_sample)
        then, then_buckets = pick(then_sample)
        reset = any(v < then.get(k, 0.0) for k, v in now.items())
        for k, v in now.items():
            counts[k] = counts.get(k, 0.0) + (v if reset else _increase(v, then.get(k, 0.0)))
        for le, v in now_buckets.items():
            buckets[le] = buckets.get(le, 0.0) + (
                v if reset else _increase(v, then_buckets.get(le, 0.0))
            )
    return counts, buckets, replicas


def readings_between(start: Sample, end: Sample) -> Readings:
    """The rule's moved requests, from `start` to `end`."""
    outcomes, buckets, replicas = _increases(start, end, lambda r: (r.outcomes, r.buckets))
    return readings_from(end.time - start.time, outcomes, buckets, replicas)


def shadow_readings_between(start: Sample, end: Sample) -> ShadowReadings:
    """The rule's shadow reads, from `start` to `end`."""
    results, buckets, replicas = _increases(start, end, lambda r: (r.shadow, r.shadow_buckets))
    return ShadowReadings(end.time - start.time, results, quantile(0.99, buckets), replicas)


@dataclass(frozen=True)
class ShadowReadings:
    """What the rule's shadow reads found over a span, summed over replicas."""

    seconds: float
    results: Mapping[str, float]  # match, mismatch, error, skipped -> count
    p99: float | None  # the candidate's latency on compared reads
    replicas: int = 0

    @property
    def compared(self) -> float:
        return sum(self.results.get(k, 0.0) for k in ("match", "mismatch", "error"))

    @property
    def bad_ratio(self) -> float:
        """Mismatches and candidate errors over reads compared."""
        bad = self.results.get("mismatch", 0.0) + self.results.get("error", 0.0)
        return bad / self.compared if self.compared else 0.0

    def describe(self) -> str:
        p99 = "n/a" if self.p99 is None else f"{self.p99 * 1000:.0f}ms"
        r = self.results
        return (
            f"{self.compared:.0f} reads compared in {format_duration(self.seconds)} from "
            f"{self.replicas} replica(s): {r.get('mismatch', 0.0):.0f} mismatches, "
            f"{r.get('error', 0.0):.0f} errors ({self.bad_ratio:.2%}), "
            f"{r.get('skipped', 0.0):.0f} skipped, candidate p99 {p99}"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 3),
            "compared": self.compared,
            **{k: v for k, v in sorted(self.results.items())},
            "mismatchRatio": round(self.bad_ratio, 6),
            "p99Seconds": self.p99,
        }


def judge_shadow(
    readings: ShadowReadings, max_ratio: float, max_p99: float, min_compared: int
) -> Verdict:
    if readings.compared < min_compared:
        return Verdict(
            "insufficient",
            (
                f"too few reads compared to judge: {readings.compared:.0f} in "
                f"{format_duration(readings.seconds)}, the phase needs {min_compared}",
            ),
        )
    failed = []
    if readings.bad_ratio > max_ratio:
        failed.append(
            f"mismatch ratio {readings.bad_ratio:.2%} > {max_ratio:.2%} (mismatches and "
            f"errors of {readings.compared:.0f} reads compared)"
        )
    if readings.p99 is not None and readings.p99 > max_p99:
        failed.append(f"candidate p99 {readings.p99:.3f}s > {max_p99:g}s")
    return Verdict("fail", tuple(failed)) if failed else Verdict("pass")


def readings_from(
    seconds: float, outcomes: Mapping[str, float], buckets: Mapping[float, float], replicas: int
) -> Readings:
    answered = sum(outcomes.get(k, 0.0) for k in ANSWERED)
    fallbacks = outcomes.get("fallback", 0.0)
    errors = sum(outcomes.get(k, 0.0) for k in ERRORS)
    return Readings(
        seconds,
        answered + fallbacks,
        answered,
        errors,
        fallbacks,
        quantile(0.99, buckets),
        replicas,
    )


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """`histogram_quantile` on cumulative buckets: linear within the bucket holding the
    q-th observation; in the +Inf bucket, the highest finite bound (as Prometheus)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass(frozen=True)
class Verdict:
    kind: str  # "pass", "fail", "insufficient"
    reasons: tuple[str, ...] = ()

    def describe(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "every guard within bounds"


def judge(readings: Readings, guards: Guards) -> Verdict:
    if readings.requests < guards.min_requests:
        return Verdict(
            "insufficient",
            (
                f"too little traffic to judge: {readings.requests:.0f} moved requests in "
                f"{format_duration(readings.seconds)}, guards need {guards.min_requests}",
            ),
        )
    failed = []
    if readings.error_ratio > guards.max_error_ratio:
        failed.append(
            f"error ratio {readings.error_ratio:.2%} > {guards.max_error_ratio:.2%} "
            f"({readings.errors:.0f} of {readings.answered:.0f} answered by the group)"
        )
    if readings.fallback_ratio > guards.max_fallback_ratio:
        failed.append(
            f"fallback ratio {readings.fallback_ratio:.2%} > {guards.max_fallback_ratio:.2%} "
            f"({readings.fallbacks:.0f} of {readings.requests:.0f} fell back to default)"
        )
    if readings.p99 is not None and readings.p99 > guards.max_p99_seconds:
        failed.append(f"p99 {readings.p99:.3f}s > {guards.max_p99_seconds:g}s")
    return Verdict("fail", tuple(failed)) if failed else Verdict("pass")


class SampleWindow:
    """The samples of the current step, oldest first; readings span up to one window."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def clear(self) -> None:
        self.samples = []

    def add(self, sample: Sample, window: float) -> None:
        self.samples.append(sample)
        # keep one sample at or before the window's start, and everything after it
        cutoff = sample.time - window
        while len(self.samples) > 2 and self.samples[1].time <= cutoff:
            self.samples.pop(0)

    def readings(self) -> Readings | None:
        """From the oldest sample within (or just before) the window to the newest."""
        if len(self.samples) < 2:
            return None
        return readings_between(self.samples[0], self.samples[-1])

    def shadow_readings(self) -> ShadowReadings | None:
        if len(self.samples) < 2:
            return None
        return shadow_readings_between(self.samples[0], self.samples[-1])
