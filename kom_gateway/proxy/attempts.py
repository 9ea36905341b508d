"""The loop every request runs over groups and endpoints, for the proxy and the Upgrade
path alike: try the least busy endpoint of the current group; after a failure, the
fallback policy (`fallback.after_failure`) says where to go next, and the move is counted.
"""

from __future__ import annotations

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.proxy.fallback import Failure, Next, after_failure
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.upstreams import UpstreamEndpoint, Upstreams
from kom_gateway.routing.router import DEFAULT_GROUP


class Attempts:
    def __init__(
        self, upstreams: Upstreams, metrics: Metrics, info: RequestInfo, method: str, group: str
    ) -> None:
        self._upstreams = upstreams
        self._metrics = metrics
        self._info = info
        self._method = method
        self.group = group  # where the next attempt goes
        self.fallback: str | None = None  # why the request last left a group, if it did
        self._tried: set[UpstreamEndpoint] = set()
        self._goaways = 0

    def pick(self) -> UpstreamEndpoint | None:
        """The next endpoint to try in `group`; None when it has no healthy one left."""
        endpoint = self._upstreams.pick(self.group, self._tried)
        if endpoint is not None:
            self._tried.add(endpoint)
        return endpoint

    def failed(self, endpoint: UpstreamEndpoint | None, failure: Failure) -> Next:
        """Where to go after `failure`: `retry_group` None means answer with the step's
        status; otherwise `group` is now the one to try."""
        if failure is Failure.GOAWAY:
            self._goaways += 1
            if endpoint is not None:
                self._tried.discard(endpoint)  # routine: the same endpoint may take it again
        step = after_failure(
            failure,
            self._info,
            self._method,
            self.group,
            self._upstreams.has_candidates(DEFAULT_GROUP, self._tried),
            self._goaways,
        )
        if step.retry_group is not None:
            if not (failure is Failure.GOAWAY and step.retry_group == self.group):
                self._metrics.fallbacks.labels(self.group, step.retry_group, failure.value).inc()
                self.fallback = failure.value
            self.group = step.retry_group
        return step
