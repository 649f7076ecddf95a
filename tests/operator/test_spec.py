"""Specs stored under an older, looser CRD that the operator refuses before they reach a pod."""

from __future__ import annotations

from typing import Any

import pytest

from zimage_operator.spec import InvalidSpecError, parse_spec

REFUSED = [
    ({"auth": {"apiKeySecretRef": {"name": "keys", "key": "."}}}, "auth.apiKeySecretRef.key"),
    ({"model": {"tokenSecretRef": {"name": "hub", "key": ".."}}}, "model.tokenSecretRef.key"),
    ({"vram": {"source": "file"}}, "resources.gpus 0"),
    ({"runtime": {"image": "Registry.example/Team/Server:1"}}, "not an image reference"),
    ({"runtime": {"image": "zimage/server:1 --privileged"}}, "not an image reference"),
    ({"runtime": {"image": "zimage/server@sha256:xyz"}}, "not an image reference"),
]


@pytest.mark.parametrize(("spec", "words"), REFUSED, ids=[words for _, words in REFUSED])
def test_specs_that_cannot_run_are_refused_with_what_to_change(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidSpecError, match=words):
        parse_spec(spec)


def test_what_runs_is_admitted() -> None:
    parse_spec({"runtime": {"image": "registry.example:5000/team/zimage-server:0.1.0@sha256:" + "a" * 64}})
    parse_spec({"auth": {"apiKeySecretRef": {"name": "keys", "key": "..keys"}}})
    parse_spec({"vram": {"source": "file"}, "resources": {"gpus": 0}, "runtime": {"compile": False}})
