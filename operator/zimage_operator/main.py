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
from .failures import OutageLog
from .metrics import LEADER, serve_standby


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = level != "debug"
    # Kopf retries its watches and Event posts without end and logs every attempt; what matters
    # is said once by the operator itself: an unreachable API server (failures.py), a permission the
    # account lacks (permissions.py), a failed reconcile (reconcile.py). At debug level Kopf
    # says everything. httpx would log every /load read.
    logging.getLogger("kopf").setLevel(logging.CRITICAL if quiet else logging.NOTSET)
    logging.getLogger("httpx").setLevel(logging.WARNING if quiet else logging.NOTSET)


def lead(settings: OperatorSettings, outage: OutageLog) -> LeaderElector | None:
    """Stand by until this replica holds the Lease, answering /healthz meanwhile; then keep
    renewing it, and exit at once when another replica holds it. None when stopped (SIGTERM)
    while standing by."""
    from .kube import api_client

    elector = LeaderElector(
        api_client(),
        settings.lease_namespace or own_namespace(),
        settings.lease_name,
        lease_seconds=settings.lease_seconds,
        retry_seconds=settings.lease_retry_seconds,
        outage=outage,
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
    configure_logging(settings.log_level)
    from . import handlers

    handlers.register(settings)
    scope = ", ".join(settings.namespaces) or "all namespaces"
    outage = OutageLog()  # one for the process: the election, the reconciler, the passes
    elector = lead(settings, outage) if settings.leader_election else None
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
            memo=kopf.Memo(settings=settings, outage=outage),
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
