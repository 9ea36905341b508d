"""The serving configuration and its atomic replacement.

The data plane reads `holder.current` once per request and keeps that snapshot for the
request's lifetime, so a reload never changes a decision half-way. A new configuration
that fails validation is refused and the last good one keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from kom_gateway.config.model import Config, ConfigError
from kom_gateway.routing.router import Router


@dataclass(frozen=True, slots=True)
class Active:
    """One immutable snapshot: a config, its compiled router and its generation."""

    config: Config
    router: Router
    generation: int


@dataclass(frozen=True, slots=True)
class ReloadResult:
    applied: bool
    generation: int  # the generation serving after this attempt
    error: ConfigError | None = None


class ConfigHolder:
    """Holds the serving snapshot; swaps it only for a configuration that validated."""

    def __init__(self, config: Config) -> None:
        self._active = Active(config, config.router(), 1)

    @property
    def current(self) -> Active:
        return self._active

    def apply(self, config: Config) -> ReloadResult:
        """Swap in an already-validated config (a single reference assignment)."""
        active = Active(config, config.router(), self._active.generation + 1)
        self._active = active
        return ReloadResult(True, active.generation)

    def refuse(self, error: ConfigError) -> ReloadResult:
        """A configuration that failed its checks: the current one keeps serving."""
        return ReloadResult(False, self._active.generation, error)
