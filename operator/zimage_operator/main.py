"""``zimage-operator``: runs the ZImageService operator (a wrapper around ``kopf run``)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, cast

import kopf
from pydantic import ValidationError
from pydantic_settings import CliApp

from .config import OperatorSettings
from .election import LeaderElector, own_namespace
from .kube import OUTAGE
from .metrics import LEADER, serve_standby

# Kopf's words for a request that found no API server at all.
_UNREACHABLE_WORDS = ("Cannot connect", "ClientConnectorError", "ServerDisconnected", "TimeoutError")


class QuietRetries(logging.Filter):
    """Keeps retries from flooding the log: each problem is logged once where it is handled.

    Drops Kopf's line per retried handler (the reconciler has said what failed) and its line per
    retried event post (a post that finally fails is still a warning, unless an outage or the
    deletion of its namespace explains it), and its line per request refused for a permission
    (permissions.py reports those once); folds its line per
    retried request into the one outage warning when the API server is unreachable or an outage
    is going on. Other retried requests stay visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kopf"):
            return True
        message = record.getMessage()
        if "failed temporarily" in message:
            return False
        if record.name.startswith("kopf._core.engines.posting"):
            return self._keep_post_failure(message)
        if not (message.startswith("Request attempt") and "will retry" in message):
            return True
        if "APIForbiddenError" in message:
            # A permission the account lacks: the permission check says so once, naming what to
            # grant, and fails liveness; Kopf would repeat its refused request every 2 s.
            return False
        if any(word in message for word in _UNREACHABLE_WORDS):
            OUTAGE.failed(ConnectionError(message))
            return False
        return not OUTAGE.active

    @staticmethod
    def _keep_post_failure(message: str) -> bool:
        """Events are best effort. Their retries are dropped; a post that finally fails stays
        a warning, unless the outage warning already covers it or its namespace is going."""
        if message.startswith("Request attempt"):
            return False
        if not message.startswith("Failed to post an event"):
            return True
        going = "NamespaceTerminating" in message or ('namespaces "' in message and "not found" in message)
        return not (OUTAGE.active or going)


def lead(settings: OperatorSettings) -> LeaderElector | None:
    """Stand by until this replica holds the Lease, answering /healthz meanwhile; then keep
    renewing it, and exit at once when another replica holds it. None when stopped (SIGTERM)
    while standing by."""
    from .handlers import api_client

    elector = LeaderElector(
        api_client(),
        settings.lease_namespace or own_namespace(),
        settings.lease_name,
        lease_seconds=settings.lease_seconds,
        retry_seconds=settings.lease_retry_seconds,
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    health = serve_standby(settings.health_host, settings.health_port)
    try:
        leads = elector.wait_for_leadership(stop)
    finally:
        health.shutdown()
        health.server_close()
        signal.signal(signal.SIGTERM, previous)
    if not leads:
        return None

    def lost() -> None:
        logging.getLogger(__name__).error("leader election: lost the Lease; exiting so that one replica acts")
        logging.shutdown()
        os._exit(1)

    elector.keep_renewing(lost)
    return elector


def main(argv: list[str] | None = None) -> int:
    try:
        settings = CliApp.run(OperatorSettings, cli_args=list(sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        print(f"zimage-operator: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietRetries())
    if settings.log_level != "debug":
        # Kopf logs every handler call at INFO, httpx every load read; keep their warnings and errors.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from . import handlers

    handlers.register(settings)
    scope = ", ".join(settings.namespaces) or "all namespaces"
    elector = lead(settings) if settings.leader_election else None
    if elector is None and settings.leader_election:
        return 0  # stopped while standing by
    LEADER.set(1)
    logging.getLogger(__name__).info("watching %s", scope)
    try:
        kopf.run(
            standalone=True,  # one replica acts: the Lease decides which (election.py)
            # Kopf would name itself after the user from the password database, which has no
            # entry for an arbitrary runAsUser (KeyError at start-up).
            # (Kopf's Identity type is a NewType of str it does not export.)
            identity=cast(Any, f"zimage-operator@{socket.gethostname()}"),
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            memo=kopf.Memo(settings=settings),
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
