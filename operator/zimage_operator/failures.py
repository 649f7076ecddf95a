"""What went wrong and what to do about it, in one place: whether the API server is unreachable
(one warning for a whole outage), worth retrying, or refusing; how long to wait before the next
try; the one line a problem is logged as.

The operator keeps one ``OutageLog`` (made in main.py, shared by the leader election, the
reconciler, the periodic passes and the permission check through ``Kube.outage``).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import urllib3
from kubernetes.client.rest import ApiException

from .metrics import API_REACHABLE, ERRORS

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
BASE_BACKOFF_SECONDS = 2.0
# While the API server is unreachable: retried this often, so that a service is reconciled
# within seconds of its return.
OUTAGE_RETRY_SECONDS = 2.0


def backoff_seconds(retry: int) -> float:
    """Delay before retry number ``retry + 1`` of a failed reconcile: 2, 4, 8, ... 60 seconds."""
    return min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2.0**retry)


def describe(exc: BaseException) -> str:
    """One line for the log: the API server's message for a refused request, not its headers."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {api_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def unreachable(exc: BaseException) -> bool:
    """The API server could not be reached at all, or answered that it is not serving now
    (503: "apiserver is shutting down", or not ready yet), as opposed to refusing a request."""
    if isinstance(exc, ApiException):
        return not exc.status or exc.status == 503
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


class OutageLog:
    """One warning when the API server becomes unreachable and one line when it is back,
    however many calls fail in between. The outage lasts until a call succeeds again (a
    reconcile, a renewal of the Lease): an API server that has just come back may refuse
    requests for a moment (403 while its authorizer warms up), and those are part of the same
    outage.

    An outage flickers at its edges: a call on a connection opened before a graceful shutdown
    can still succeed after the first refusal. A failure within ``settle_seconds`` of the last recovery is
    therefore the same outage going on, not news: it is logged at debug level."""

    def __init__(self, settle_seconds: float = 60.0) -> None:
        self.settle_seconds = settle_seconds
        self._since: float | None = None
        self._recovered: float | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._since is not None

    def covers(self, exc: BaseException) -> bool:
        """Whether ``exc`` belongs to an outage: it is one, or one is going on."""
        return unreachable(exc) or self.active

    def record(self, exc: BaseException) -> bool:
        """``failed(exc)`` if ``exc`` belongs to an outage; whether it did."""
        if not self.covers(exc):
            return False
        self.failed(exc)
        return True

    def failed(self, exc: BaseException) -> None:
        ERRORS.labels("unreachable").inc()
        with self._lock:
            if self._since is not None:
                return
            now = time.monotonic()
            self._since = now
            news = self._recovered is None or now - self._recovered > self.settle_seconds
        API_REACHABLE.set(0)
        if news:
            logger.warning(
                "the API server is unreachable (%s); retrying every few seconds until it is back",
                _first_line(exc),
            )
        else:
            logger.debug("the API server is unreachable again (%s)", _first_line(exc))

    def succeeded(self) -> None:
        with self._lock:
            since, self._since = self._since, None
            if since is not None:
                self._recovered = time.monotonic()
        if since is not None:
            API_REACHABLE.set(1)
            logger.info("the API server is reachable again after %.0fs", time.monotonic() - since)


def _first_line(exc: BaseException) -> str:
    # What failed, not the request that met it first: the outage is the API server's, not
    # any one service's.
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def is_temporary(exc: ApiException) -> bool:
    """Worth retrying: conflicts, throttling, server trouble. Other 4xx need a spec change."""
    return exc.status in (409, 429) or exc.status is None or exc.status >= 500


def namespace_terminating(exc: ApiException) -> bool:
    """The API server refused to create something because its namespace is being deleted."""
    if exc.status != 403:
        return False
    try:
        causes = (json.loads(exc.body or "{}").get("details") or {}).get("causes") or []
    except ValueError:
        return False
    return any(cause.get("reason") == "NamespaceTerminating" for cause in causes)


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
