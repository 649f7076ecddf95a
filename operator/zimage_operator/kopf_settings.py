"""How Kopf is set up for this operator (its public settings only)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import kopf

from .config import FIELD_MANAGER, OperatorSettings
from .failures import OUTAGE_RETRY_SECONDS

WORKER_THREADS = 16


class _Backoffs:
    """1, 1, 2, 3, then every ``OUTAGE_RETRY_SECONDS``, forever (an iterable without a length)."""

    def __iter__(self) -> Iterator[float]:
        yield from (1.0, 1.0, 2.0, 3.0)
        while True:
            yield OUTAGE_RETRY_SECONDS


def tune(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    settings.posting.level = logging.WARNING  # Kopf's own messages; ours go through Kube.post_event
    settings.posting.reporting_component = FIELD_MANAGER
    settings.execution.max_workers = WORKER_THREADS
    # Blocking calls (asyncio.to_thread) run on the loop's default executor: as many threads as
    # Kopf's own.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="zimage-operator"))
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Kopf's own API calls (watches, events) retry without end while the API server is down,
    # instead of escalating and stopping the operator.
    settings.networking.error_backoffs = _Backoffs()
    settings.posting.default_backoffs = (1.0,)  # events are best effort: one retry, then a warning
    if ours.namespaces:
        # The namespaces are named exactly: nothing to discover, and a namespaced account may not
        # list namespaces (Kopf would retry that refusal forever).
        settings.scanning.disabled = True
