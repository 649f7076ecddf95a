"""spec.loras without a cluster: the server's ZIMAGE_LORAS with each source where the pod finds
it, the claims mounted read-only, Hub adapters fetched by the prefetch Job (a new one for a new
adapter), the spec's rules, and the status: what each replica loaded and what failed."""

from __future__ import annotations

import json
import os
from typing import Any
from unittest import mock

import pytest

from zimage_operator import builders
from zimage_operator.builders import Owner
from zimage_operator.config import OperatorSettings
from zimage_operator.reconcile import _refreshing, adapter_failures
from zimage_operator.scaling import PodLoad, adapters_status
from zimage_operator.spec import InvalidSpecError, parse_spec
from zimage_operator.status import Condition, compute_conditions, model_state
from zimage_server.core.config import load_settings

OWNER = Owner(name="posters", namespace="ml", uid="1234")
SETTINGS = OperatorSettings(_env_file=None, default_server_image="zimage/zimage-server:9.9")
LORAS: list[dict[str, Any]] = [
    {"name": "pixel", "source": "hf://acme/pixel-art", "scale": 0.8},
    {"name": "ink", "source": "pvc://adapters/styles/ink.safetensors"},
    {"name": "brand", "source": "pvc://adapters/brand"},
    {"name": "local", "source": "file:///opt/adapters/local.safetensors"},
]


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    deployment = builders.build_deployment(OWNER, parse_spec(spec), SETTINGS, 1)
    result: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return result


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in pod["containers"][0]["env"]}


def test_adapters_reach_the_server_with_each_source_where_the_pod_finds_it() -> None:
    pod = _pod({"loras": LORAS})
    env = _env(pod)
    assert json.loads(env["ZIMAGE_LORAS"]) == [
        {"name": "pixel", "source": "hf://acme/pixel-art", "scale": 0.8},
        {"name": "ink", "source": "/adapters/adapters/styles/ink.safetensors", "scale": 1.0},
        {"name": "brand", "source": "/adapters/adapters/brand", "scale": 1.0},
        {"name": "local", "source": "/opt/adapters/local.safetensors", "scale": 1.0},
    ]
    # The claim is mounted once, read-only, where the sources point.
    claims = [volume for volume in pod["volumes"] if volume["name"].startswith("adapters-")]
    assert claims == [
        {"name": "adapters-0", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}}
    ]
    mounts = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["name"] == "adapters-0"]
    assert mounts == [{"name": "adapters-0", "mountPath": "/adapters/adapters", "readOnly": True}]
    # The server takes what the operator gives it.
    clean = {key: value for key, value in os.environ.items() if not key.startswith("ZIMAGE_")}
    with mock.patch.dict(os.environ, {**clean, "ZIMAGE_LORAS": env["ZIMAGE_LORAS"]}, clear=True):
        assert [adapter.name for adapter in load_settings([]).loras] == ["pixel", "ink", "brand", "local"]


def test_no_adapters_no_variable_and_no_volume() -> None:
    pod = _pod({})
    assert "ZIMAGE_LORAS" not in _env(pod)
    assert not [volume for volume in pod["volumes"] if volume["name"].startswith("adapters-")]


def test_a_change_of_adapters_changes_the_pod_template_so_the_pods_roll() -> None:
    before = _pod({"loras": LORAS})
    after = _pod({"loras": [{**LORAS[0], "scale": 0.5}, *LORAS[1:]]})
    assert before != after


def test_the_prefetch_job_fetches_the_hub_adapters_with_the_model() -> None:
    spec = parse_spec({"model": {"cache": {}}, "loras": LORAS})
    job = builders.build_prefetch_job(OWNER, spec, SETTINGS)
    assert job is not None
    env = {
        item["name"]: item.get("value") for item in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["ZIMAGE_LORAS"]) == [
        {"name": "pixel", "source": "hf://acme/pixel-art", "scale": 0.8}
    ]
    # Servers then read the cache offline: the adapter was fetched into it.
    assert _env(_pod({"model": {"cache": {}}, "loras": LORAS}))["HF_HUB_OFFLINE"] == "1"
    # Another Hub adapter is another Job (a Job's template cannot change); a claim's is not.
    name = builders.prefetch_job_name(OWNER, spec)
    other = parse_spec(
        {"model": {"cache": {}}, "loras": [{"name": "pixel", "source": "hf://acme/pixel-art@v2"}]}
    )
    assert builders.prefetch_job_name(OWNER, other) != name
    without_hub = parse_spec({"model": {"cache": {}}, "loras": LORAS[1:]})
    assert builders.prefetch_job_name(OWNER, without_hub) == builders.prefetch_job_name(
        OWNER, parse_spec({"model": {"cache": {}}})
    )


@pytest.mark.parametrize(
    ("loras", "words"),
    [
        ([{"name": "Pixel", "source": "hf://a/b"}], "spec.loras[0].name"),
        ([{"name": "a", "source": "hf://a/b"}, {"name": "a", "source": "hf://a/c"}], "is given twice"),
        ([{"name": "z-image-turbo", "source": "hf://a/b"}], "the model's own name"),
        ([{"name": "a", "source": "s3://b/c"}], "spec.loras[0].source"),
        ([{"name": "a", "source": "pvc://claim"}], "spec.loras[0].source"),
        ([{"name": "a", "source": "pvc://claim/../x"}], "must not contain '..'"),
        ([{"name": "a", "source": "hf://a/b", "scale": 3}], "spec.loras[0].scale"),
        ([{"name": f"a{i}", "source": "hf://a/b"} for i in range(17)], "at most 16"),
    ],
)
def test_adapters_the_crd_refuses_are_refused_by_parse_spec(loras: list[dict[str, Any]], words: str) -> None:
    with pytest.raises(InvalidSpecError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_spec({"loras": loras})


def test_the_status_lists_what_each_replica_loaded_and_what_failed() -> None:
    pods = [
        PodLoad("p-1", True, adapters=("pixel", "ink")),
        PodLoad("p-0", True, adapters=("pixel",), adapters_failed=(("ink", "ink.safetensors: not LoRA"),)),
        PodLoad("p-2", False),  # unreachable: it says nothing
        PodLoad("p-3", True, ready=False, adapters=()),  # still warming up
    ]
    assert adapters_status(pods) == {
        "loaded": ["pixel"],
        "pods": {"p-0": ["pixel"], "p-1": ["pixel", "ink"]},
        "failed": [{"name": "ink", "pod": "p-0", "reason": "ink.safetensors: not LoRA"}],
    }
    spec = parse_spec({"loras": LORAS})
    status = {"adapters": adapters_status(pods)}
    failures = adapter_failures(status, spec)
    assert failures == ["adapter ink on p-0: ink.safetensors: not LoRA"]
    # An adapter no longer in the spec is not held against the service.
    assert adapter_failures(status, parse_spec({"loras": LORAS[:1]})) == []


def _conditions(**values: Any) -> dict[str, Condition]:
    defaults: dict[str, Any] = {
        "invalid": None,
        "apply_error": None,
        "model": model_state(False, None),
        "desired_replicas": 1,
        "pods": [],
        "deployment": {
            "metadata": {"generation": 1},
            "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1},
        },
    }
    return {c.type: c for c in compute_conditions(**{**defaults, **values})}


def test_an_adapter_that_failed_to_load_makes_the_service_degraded_not_unready() -> None:
    conditions = _conditions(adapter_failures=["adapter ink on p-0: not LoRA"])
    assert conditions["Degraded"].status is True
    assert conditions["Degraded"].reason == "AdapterLoadFailed"
    assert "adapter ink on p-0" in conditions["Degraded"].message
    assert conditions["Ready"].status is True


def test_replicas_keep_serving_while_the_cache_fetches_new_adapters() -> None:
    downloading = model_state(
        True, {"status": {}}, [{"status": {"containerStatuses": [{"state": {"running": {}}}]}}]
    )
    assert downloading.reason == "CacheDownloading"
    serving = {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}
    refreshing = _refreshing(downloading, serving)
    assert refreshing is not None
    assert "the 2 ready replicas keep serving the previous model and adapters" in refreshing
    conditions = _conditions(model=downloading, refreshing=refreshing)
    assert conditions["Ready"].status is True
    assert conditions["Progressing"].reason == "RefreshingCache"
    assert conditions["ModelReady"].status is False
    # Nothing serving yet (a new service), or a failed fetch: no such hold.
    assert _refreshing(downloading, None) is None
    assert _refreshing(downloading, {"spec": {"replicas": 1}, "status": {"readyReplicas": 0}}) is None
    failed = model_state(True, {"status": {"conditions": [{"type": "Failed", "status": "True"}]}})
    assert _refreshing(failed, serving) is None
