"""A failed reconcile is retried by the service's daemon through kopf.TemporaryError, with
exponential backoff, or every few seconds while the API server is unreachable; an outage that
flickers at its edges is one warning; the daemon holds no finalizer on the service."""

from __future__ import annotations

import logging

import kopf
import pytest
import urllib3

from zimage_operator import handlers
from zimage_operator.config import OperatorSettings
from zimage_operator.handlers import OUTAGE_RETRY_SECONDS, backoff_seconds, retry_later
from zimage_operator.kube import OUTAGE, OutageLog
from zimage_operator.reconcile import TemporaryFailureError

REFUSED = urllib3.exceptions.MaxRetryError(
    None,  # type: ignore[arg-type]
    "/apis/zimage.dev/v1alpha1/namespaces/ml/zimageservices/posters",
    urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: Connection refused"),  # type: ignore[arg-type]
)


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [backoff_seconds(retry) for retry in range(7)] == [2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize("failures", [0, 1, 2, 5])
def test_a_temporary_failure_asks_kopf_to_retry_after_the_backoff(failures: int) -> None:
    error = retry_later(TemporaryFailureError("Deployment posters: etcd leader changed"), failures)
    assert isinstance(error, kopf.TemporaryError)
    assert error.delay == backoff_seconds(failures)
    assert "etcd leader changed" in str(error)


def test_an_unreachable_api_server_is_retried_every_few_seconds() -> None:
    try:
        raise TemporaryFailureError("the API server is unreachable") from REFUSED
    except TemporaryFailureError as exc:
        error = retry_later(exc, 9)
    OUTAGE.succeeded()
    assert error.delay == OUTAGE_RETRY_SECONDS


def test_an_outage_that_flickers_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(settle_seconds=60)
    with caplog.at_level(logging.DEBUG, logger="zimage_operator.kube"):
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
    with caplog.at_level(logging.WARNING, logger="zimage_operator.kube"):
        outage.failed(REFUSED)
        outage.succeeded()
        outage.failed(REFUSED)
        outage.succeeded()
    assert len(caplog.records) == 2


def test_the_service_daemon_puts_no_finalizer_on_services() -> None:
    """A finalizer would make `helm uninstall` and namespace deletion wait for an operator that
    is already gone; Kopf's daemon handlers must not ask for one."""
    registry = kopf.OperatorRegistry()
    handlers.register(OperatorSettings(), registry)
    spawning = registry._spawning.get_all_handlers()
    assert [handler.id for handler in spawning] == ["loop"]
    assert [handler.requires_finalizer for handler in spawning] == [False]


def test_a_namespace_being_deleted_is_told_apart_from_a_refusal() -> None:
    from kubernetes.client.rest import ApiException

    from zimage_operator.kube import namespace_terminating

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

    from zimage_operator.kube import unreachable

    # Graceful shutdown answers 503 "apiserver is shutting down" before the socket closes.
    assert unreachable(ApiException(status=503, reason="Service Unavailable"))
    assert unreachable(urllib3.exceptions.ProtocolError("Connection aborted."))
    for status in (400, 403, 409, 422, 500):
        assert not unreachable(ApiException(status=status)), status
