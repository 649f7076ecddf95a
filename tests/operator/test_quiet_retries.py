"""Retries do not flood the operator's log: Kopf's per-retry lines are folded or dropped."""

from __future__ import annotations

import logging

import pytest

from zimage_operator.kube import OUTAGE
from zimage_operator.main import QuietRetries


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, None)


@pytest.fixture(autouse=True)
def no_outage() -> None:
    OUTAGE.succeeded()


def test_an_unreachable_api_server_is_one_outage_not_a_line_per_request() -> None:
    quiet = QuietRetries()
    refused = (
        "Request attempt #3 failed; will retry: GET https://127.0.0.1:6443/api -> ClientConnectorError()"
    )
    assert quiet.filter(_record("kopf._cogs.clients.watching", refused)) is False
    assert OUTAGE.active
    forbidden = "Request attempt #1 failed; will retry: GET https://127.0.0.1:6443/api -> APIForbiddenError()"
    assert quiet.filter(_record("kopf._cogs.clients.watching", forbidden)) is False  # part of the outage
    OUTAGE.succeeded()
    # On its own, a permission the account lacks: permissions.py says so once, with what to grant.
    assert quiet.filter(_record("kopf._cogs.clients.watching", forbidden)) is False
    assert not OUTAGE.active
    throttled = "Request attempt #1 failed; will retry: GET https://127.0.0.1:6443/api -> APIServerError()"
    assert quiet.filter(_record("kopf._cogs.clients.watching", throttled)) is True  # others: shown


def test_retried_handlers_and_event_posts_are_dropped_final_failures_kept() -> None:
    quiet = QuietRetries()
    assert quiet.filter(_record("kopf.objects", "Timer 'resync' failed temporarily: 409")) is False
    post = "Request attempt #1/2 failed; will retry: POST /api/v1/namespaces/ml/events -> APIForbiddenError()"
    assert quiet.filter(_record("kopf._core.engines.posting", post)) is False
    assert not OUTAGE.active
    final = "Failed to post an event. Ignoring and continuing."
    assert quiet.filter(_record("kopf._core.engines.posting", final)) is True
    assert quiet.filter(_record("zimage_operator.reconcile", "ml/posters: cannot apply ...")) is True


def test_event_posts_that_fail_for_an_outage_or_a_namespace_going_are_dropped() -> None:
    quiet = QuietRetries()
    escalating = (
        "Request attempt #2/2 failed; escalating: POST /api/v1/namespaces/ml/events -> APIForbiddenError()"
    )
    assert quiet.filter(_record("kopf._core.engines.posting", escalating)) is False
    going = (
        "Failed to post an event. Ignoring and continuing. Code: 403. Message: events is forbidden: "
        "namespace ml is being terminated. Details: {'causes': [{'reason': 'NamespaceTerminating'}]}"
    )
    assert quiet.filter(_record("kopf._core.engines.posting", going)) is False
    gone = 'Failed to post an event. Ignoring and continuing. Code: 404. Message: namespaces "ml" not found.'
    assert quiet.filter(_record("kopf._core.engines.posting", gone)) is False
    plain = "Failed to post an event. Ignoring and continuing. Event: type='Normal', reason='RollingOut'"
    assert quiet.filter(_record("kopf._core.engines.posting", plain)) is True
    OUTAGE.failed(ConnectionError("refused"))
    assert quiet.filter(_record("kopf._core.engines.posting", plain)) is False  # the outage's warning says it
    OUTAGE.succeeded()


def test_a_refused_request_is_one_line_with_the_api_servers_words() -> None:
    from kubernetes.client.rest import ApiException

    from zimage_operator.handlers import describe

    refused = ApiException(status=403, reason="Forbidden")
    refused.body = '{"message": "pods is forbidden: User \\"x\\" cannot list resource \\"pods\\""}'
    assert describe(refused) == '403 pods is forbidden: User "x" cannot list resource "pods"'
    assert describe(TimeoutError("slow")) == "TimeoutError: slow"
