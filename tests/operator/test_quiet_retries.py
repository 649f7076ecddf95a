"""The operator's log says each problem once, in its own words: Kopf's line per retried request
stays out of it (except at debug level), and a refused request is one line."""

from __future__ import annotations

import logging

import pytest

from zimage_operator.failures import describe
from zimage_operator.main import configure_logging


@pytest.fixture
def restore_levels() -> object:
    names = ("kopf", "httpx")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    ("level", "logged"),
    [
        # Kopf's retry line stays out; the operator's own warning gets in.
        ("info", ["zimage_operator.failures"]),
        # At debug level Kopf says everything.
        ("debug", ["kopf.clients", "zimage_operator.failures"]),
    ],
)
def test_kopfs_retry_lines_stay_out_of_the_log_but_at_debug_level(
    level: str, logged: list[str], restore_levels: object, caplog: pytest.LogCaptureFixture
) -> None:
    configure_logging(level)
    with caplog.at_level(logging.DEBUG):
        # Kopf's API client logs each failed attempt at ERROR from a logger under "kopf".
        logging.getLogger("kopf.clients").error("Request attempt #1 failed; will retry: GET ...")
        logging.getLogger("zimage_operator.failures").warning("the API server is unreachable (...)")
    assert [record.name for record in caplog.records] == logged


def test_a_refused_request_is_one_line_with_the_api_servers_words() -> None:
    from kubernetes.client.rest import ApiException

    refused = ApiException(status=403, reason="Forbidden")
    refused.body = '{"message": "pods is forbidden: User \\"x\\" cannot list resource \\"pods\\""}'
    assert describe(refused) == '403 pods is forbidden: User "x" cannot list resource "pods"'
    assert describe(TimeoutError("slow")) == "TimeoutError: slow"
