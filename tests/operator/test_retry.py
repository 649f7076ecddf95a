"""A failed reconcile is retried by the service's resync timer through kopf.TemporaryError,
with exponential backoff, or every few seconds while the API server is unreachable."""

from __future__ import annotations

import kopf
import pytest
import urllib3

from zimage_operator.handlers import OUTAGE_RETRY_SECONDS, backoff_seconds, resync
from zimage_operator.reconcile import TemporaryFailureError


class FailingReconciler:
    def __init__(self, cause: Exception | None = None) -> None:
        self.cause = cause
        self.calls: list[tuple[str, str]] = []

    def reconcile(self, namespace: str, name: str) -> None:
        self.calls.append((namespace, name))
        if self.cause is None:
            raise TemporaryFailureError("Deployment posters: etcd leader changed")
        raise TemporaryFailureError("the API server is unreachable") from self.cause


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [backoff_seconds(retry) for retry in range(7)] == [2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize("retry", [0, 1, 2, 5])
def test_a_temporary_failure_asks_kopf_to_retry_after_the_backoff(retry: int) -> None:
    reconciler = FailingReconciler()
    with pytest.raises(kopf.TemporaryError) as raised:
        resync(name="posters", namespace="ml", memo=kopf.Memo(reconciler=reconciler), retry=retry)
    assert raised.value.delay == backoff_seconds(retry)
    assert "etcd leader changed" in str(raised.value)
    assert reconciler.calls == [("ml", "posters")]


def test_an_unreachable_api_server_is_retried_every_few_seconds() -> None:
    reconciler = FailingReconciler(urllib3.exceptions.MaxRetryError(None, "/apis", "Connection refused"))  # type: ignore[arg-type]
    with pytest.raises(kopf.TemporaryError) as raised:
        resync(name="posters", namespace="ml", memo=kopf.Memo(reconciler=reconciler), retry=9)
    assert raised.value.delay == OUTAGE_RETRY_SECONDS
