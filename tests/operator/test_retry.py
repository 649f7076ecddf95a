"""Temporary failures are retried with exponential backoff; success resets the count."""

from __future__ import annotations

import threading
import time

from zimage_operator.handlers import Runner
from zimage_operator.reconcile import TemporaryFailureError


class FlakyReconciler:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []
        self.done = threading.Event()

    def reconcile(self, namespace: str, name: str) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise TemporaryFailureError("the API server is busy")
        self.done.set()


def test_temporary_failures_are_retried_with_growing_delays() -> None:
    flaky = FlakyReconciler(failures=3)
    runner = Runner(flaky, base_delay=0.05)  # type: ignore[arg-type]
    runner.run("ml", "posters")
    assert flaky.done.wait(5), "the reconcile was not retried to success"
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
    assert len(flaky.calls) == 4
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert gaps[2] >= 0.2
    assert runner._attempts == {}
