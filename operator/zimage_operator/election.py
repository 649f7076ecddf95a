"""Leader election: one operator replica acts, the others stand by.

A Lease (``coordination.k8s.io/v1``) in the operator's namespace names the replica that acts.
The leader renews it every ``retry_seconds``. A standby takes it over once it has seen the
same record, unchanged, for the lease's duration by its own clock (so the nodes' clocks need
not agree), with an update that the API server refuses if anyone changed the Lease since it
was read: of two standbys, one wins. A leader that finds another replica holding the Lease
exits at once; its restart stands by. A leader that stops on purpose gives the Lease up, and a
standby takes over within ``retry_seconds``.

While the API server cannot be reached, the leader keeps trying (it cannot write anything
either), and a standby starts its count again: after an outage that every replica saw, the
leader renews before any standby may take over, and nothing fails over. A leader cut off alone
is replaced after the lease's duration, and exits at its first renewal once it is back.

Replicas that differ in their settings (a second Helm release in the same namespace, say)
still share the Lease: only one of them ever acts.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .failures import OutageLog, describe

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def micro_time(moment: datetime.datetime) -> str:
    """A Lease's time fields are MicroTime: always six fractional digits."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def own_namespace() -> str:
    """The namespace the operator runs in: ``POD_NAMESPACE`` (the downward API), else its
    service account's, else ``default`` (run from a workstation)."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def new_identity() -> str:
    """The pod's name (``POD_NAME``, else the host name) and a suffix of this process's own:
    a restarted container is a new candidate, not the old leader."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        *,
        identity: str | None = None,
        lease_seconds: float = 15.0,
        retry_seconds: float = 2.0,
        outage: OutageLog | None = None,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.identity = identity or new_identity()
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds
        self.outage = outage or OutageLog()
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- one attempt -------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Whether this replica holds the Lease after one read and, where it may, one write."""
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create(now)
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.acquire_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.lease_seconds
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False  # another replica holds it and has renewed within its duration
        taking_over = holder != self.identity
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": self._held(
                now,
                acquired=now if taking_over else spec.acquire_time or now,
                transitions=(spec.lease_transitions or 0) + (1 if taking_over else 0),
            ),
        }
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # changed since it was read: another replica was quicker
                return False
            raise
        if taking_over:
            self._leads()
        return True

    def _held(self, now: datetime.datetime, acquired: datetime.datetime, transitions: int) -> dict[str, Any]:
        """The Lease's spec with this replica holding it, renewed ``now``."""
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "acquireTime": micro_time(acquired),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    def _leads(self) -> None:
        logger.info("leader election: %s now leads (Lease %s/%s)", self.identity, self.namespace, self.name)

    def _create(self, now: datetime.datetime) -> bool:
        body = {
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._held(now, acquired=now, transitions=0),
        }
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        self._leads()
        return True

    # -- the loops ---------------------------------------------------------------------------

    def wait_for_leadership(self, stop: threading.Event | None = None) -> bool:
        """Try every ``retry_seconds`` until this replica leads (True) or ``stop`` is set."""
        stop = stop or self._stop
        standing_by = problem = None
        while not stop.is_set():
            try:
                leads = self.try_acquire_or_renew()
                self.outage.succeeded()
                if leads:
                    return True
                holder = self.holder()
                if holder != standing_by:
                    logger.info("leader election: standing by; %s leads", holder)
                    standing_by = holder
                problem = None
            except Exception as exc:  # the API server unreachable or refusing: keep trying
                self._observed = None  # the count starts again once the Lease can be read
                described = describe(exc)
                # An outage is one warning (failures.py) for the whole operator; else once a problem.
                if not self.outage.record(exc) and described != problem:
                    logger.warning("leader election: cannot read the Lease: %s", described)
                problem = described
            stop.wait(self.retry_seconds)
        return False

    def holder(self) -> str | None:
        """The holder in the Lease as last read."""
        return self._observed[0] if self._observed else None

    def keep_renewing(self, lost: Callable[[], None]) -> None:
        """Renew every ``retry_seconds`` in a thread of its own; ``lost`` is called when another
        replica holds the Lease."""

        def renew() -> None:
            problem = None
            while not self._stop.wait(self.retry_seconds):
                try:
                    renewed = self.try_acquire_or_renew()
                    self.outage.succeeded()
                    if renewed or self.holder() == self.identity:
                        problem = None
                        continue  # renewed, or a write that lost a race: read again
                except Exception as exc:
                    if self.outage.record(exc):  # one warning for the whole outage
                        continue
                    described = describe(exc)
                    if described != problem:
                        logger.warning("leader election: cannot renew the Lease: %s", described)
                    problem = described
                    continue
                logger.error("leader election: %s holds the Lease now", self.holder())
                lost()
                return

        self._renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Stop renewing and give the Lease up, so that a standby takes over at once."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.retry_seconds + 5)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            body = {
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
            }
            self.api.patch_namespaced_lease(self.name, self.namespace, body)
            logger.info("leader election: gave the Lease up")
        except Exception as exc:  # it expires on its own
            logger.warning("leader election: could not give the Lease up: %s", describe(exc))
