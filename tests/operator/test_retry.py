"""A failed reconcile is tried again by the operator's passes after an exponential backoff, or
every few seconds while the API server is unreachable; an outage that flickers at its edges is
one warning."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
import urllib3

from zimage_operator.config import OperatorSettings
from zimage_operator.failures import OUTAGE_RETRY_SECONDS, OutageLog, backoff_seconds
from zimage_operator.passes import Passes, ServiceState
from zimage_operator.reconcile import TemporaryFailureError

INDICES: dict[str, dict[object, object]] = {
    "index_service": {},
    "index_deployment": {},
    "index_server_pod": {},
}
REFUSED = urllib3.exceptions.MaxRetryError(
    None,  # type: ignore[arg-type]
    "/apis/zimage.dev/v1alpha1/namespaces/ml/zimageservices/posters",
    urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: Connection refused"),  # type: ignore[arg-type]
)


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [backoff_seconds(retry) for retry in range(7)] == [2, 4, 8, 16, 32, 60, 60]


class FailingReconciler:
    """Stands in for the reconciler (whose real failures the cluster tests make): fails as told."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        self.kube = types.SimpleNamespace(outage=OutageLog())

    def reconcile(self, namespace: str, name: str) -> None:
        raise TemporaryFailureError(str(self.cause)) from self.cause


def retried_after(cause: BaseException, failures: int) -> float:
    """Seconds until the passes try a service again after ``failures + 1`` failed reconciles."""

    async def run() -> float:
        passes = Passes(FailingReconciler(cause), None, OperatorSettings(), INDICES)  # type: ignore[arg-type]
        state = ServiceState(("ml", "posters"), last_reconcile=0.0, failures=failures)
        assert not await passes.reconcile("ml", "posters", state)
        assert state.failures == failures + 1
        assert state.retry_at is not None
        return state.retry_at - asyncio.get_running_loop().time()

    return asyncio.run(run())


@pytest.mark.parametrize("failures", [0, 1, 2, 5])
def test_a_temporary_failure_is_tried_again_after_the_backoff(failures: int) -> None:
    waited = retried_after(RuntimeError("Deployment posters: etcd leader changed"), failures)
    assert backoff_seconds(failures) - 0.5 < waited <= backoff_seconds(failures)


def test_an_unreachable_api_server_is_retried_every_few_seconds() -> None:
    waited = retried_after(REFUSED, 9)
    assert OUTAGE_RETRY_SECONDS - 0.5 < waited <= OUTAGE_RETRY_SECONDS


def test_an_outage_that_flickers_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(settle_seconds=60)
    with caplog.at_level(logging.DEBUG, logger="zimage_operator.failures"):
        outage.failed(REFUSED)
        outage.failed(REFUSED)
        outage.succeeded()  # a call on a connection the old API server still served
        outage.failed(REFUSED)  # and the next refused one
        outage.succeeded()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in warnings] == ["the API server is unreachable"]
    assert "Connection refused" in warnings[0].getMessage()
    assert "/apis" not in warnings[0].getMessage(), "the cause, not the request that met it"
    assert not outage.active


def test_an_outage_after_the_settling_time_is_news(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(settle_seconds=0)
    with caplog.at_level(logging.WARNING, logger="zimage_operator.failures"):
        outage.failed(REFUSED)
        outage.succeeded()
        outage.failed(REFUSED)
        outage.succeeded()
    assert len(caplog.records) == 2


def test_a_namespace_being_deleted_is_told_apart_from_a_refusal() -> None:
    from kubernetes.client.rest import ApiException

    from zimage_operator.failures import namespace_terminating

    going = ApiException(status=403)
    going.body = (
        '{"kind": "Status", "reason": "Forbidden", "message": "unable to create new content in namespace ml '
        'because it is being terminated", "details": {"causes": [{"reason": "NamespaceTerminating"}]}}'
    )
    refused = ApiException(status=403)
    refused.body = '{"kind": "Status", "reason": "Forbidden", "message": "deployments.apps is forbidden"}'
    assert namespace_terminating(going)
    assert not namespace_terminating(refused)
    assert not namespace_terminating(ApiException(status=500))


def test_an_api_server_shutting_down_is_part_of_the_outage_not_a_refusal() -> None:
    from kubernetes.client.rest import ApiException

    from zimage_operator.failures import unreachable

    # Graceful shutdown answers 503 "apiserver is shutting down" before the socket closes.
    assert unreachable(ApiException(status=503, reason="Service Unavailable"))
    assert unreachable(urllib3.exceptions.ProtocolError("Connection aborted."))
    for status in (400, 403, 409, 422, 500):
        assert not unreachable(ApiException(status=status)), status
