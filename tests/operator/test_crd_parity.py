"""The CRD's enumerations are the server's: every value the CRD lists is one the server takes."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from zimage_operator import builders
from zimage_operator.spec import GraphPart, parse_spec
from zimage_server.core.choices import GRAPHABLE, check_attention_backend
from zimage_server.core.config import Settings

CRD = Path(__file__).resolve().parents[2] / "deploy/crds/zimage.dev_zimageservices.yaml"


def _field(*path: str) -> dict[str, Any]:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node: dict[str, Any] = schema["properties"]["spec"]
    for part in path:
        node = node["properties"][part]
    return node


def _literal(setting: str) -> set[str]:
    return set(typing.get_args(Settings.model_fields[setting].annotation))


@pytest.mark.parametrize("backend", _field("runtime", "attentionBackend")["enum"])
def test_every_attention_backend_the_crd_admits_is_one_the_server_takes(backend: str) -> None:
    check_attention_backend(backend)  # raises for a name the server refuses


def test_cuda_graph_parts_precision_scope_and_log_level_match_the_server() -> None:
    assert (
        set(_field("runtime", "cudaGraphs")["items"]["enum"])
        == set(GRAPHABLE)
        == set(typing.get_args(GraphPart))
    )
    assert set(_field("runtime", "precision")["enum"]) == _literal("precision")
    assert set(_field("vram", "scope")["enum"]) == _literal("vram_scope")
    assert set(_field("runtime", "logLevel")["enum"]) == _literal("log_level")


def test_the_name_limit_keeps_every_derived_name_within_63_characters() -> None:
    rule = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "x-kubernetes-validations"
    ][0]["rule"]
    assert f"size(self.metadata.name) <= {builders.MAX_NAME_LENGTH}" in rule
    owner = builders.Owner("n" * builders.MAX_NAME_LENGTH, "ml", "uid")
    job = builders.prefetch_job_name(owner, parse_spec({}))
    assert len(job) <= 63
    assert len(builders.cache_claim_name(owner)) <= 63
    # A pod of the Deployment: NAME-<template hash, at most 10>-<5 random>.
    assert len(owner.name) + 1 + 10 + 1 + 5 <= 63
