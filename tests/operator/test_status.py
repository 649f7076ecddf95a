"""Spec parsing, condition computation and the live-vs-desired comparison, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from zimage_operator.drift import contains
from zimage_operator.spec import InvalidSpecError, parse_spec
from zimage_operator.status import Condition, compute_conditions, merge_conditions, model_state, transitions

NO_CACHE = model_state(False, None)


def _deployment(
    replicas: int, ready: int, updated: int, generation: int = 1, observed: int = 1
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "observedGeneration": observed,
        },
    }


def _by_type(conditions: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in conditions}


def _conditions(**kwargs: Any) -> dict[str, Condition]:
    values: dict[str, Any] = {
        "invalid": None,
        "apply_error": None,
        "model": NO_CACHE,
        "desired_replicas": 2,
        "pods": [],
    }
    values.update(kwargs)
    return _by_type(compute_conditions(**values))


def test_the_spec_takes_the_crd_defaults() -> None:
    spec = parse_spec({})
    assert spec.model.source == "hf://Tongyi-MAI/Z-Image-Turbo"
    assert spec.runtime.max_batch_size == 4
    assert spec.autoscaling.mode == "builtin"
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"runtime": {"precision": "int4"}}, "spec.runtime.precision"),
        ({"model": {"source": "s3://bucket/x"}}, "unsupported scheme"),
        ({"model": {"source": "pvc:///x"}}, "needs a claim name"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must not exceed maxReplicas"),
        ({"runtime": {"warmupSizes": ["1000x1000"]}}, "multiple of 16 from 256 to 2048"),
        ({"runtime": {"warmupSizes": ["16x16"]}}, "multiple of 16 from 256 to 2048"),
        ({"model": {"source": "pvc://claim/../../etc"}}, "must not contain '..'"),
        ({"resources": {"gpus": 9}}, "one node's GPUs"),
        (
            {
                "resources": {"gpus": 2},
                "parallelism": {"sequenceParallel": 2},
                "runtime": {"cudaGraphs": ["transformer"]},
            },
            "cannot replay the transformer",
        ),
        ({"resources": {"gpus": 2}, "parallelism": {"sequenceParallel": 4}}, "set resources.gpus to 4"),
        ({"resources": {"gpus": 4}, "parallelism": {"workers": 2}}, "one worker per GPU, 4 with"),
        (
            {"resources": {"gpus": 2}, "parallelism": {"workers": 2, "sequenceParallel": 2}},
            "one worker per GPU, 1 with resources.gpus 2 and sequenceParallel above 1",
        ),
        ({"resources": {"gpus": 0}}, "needs runtime.compile false"),
        ({"resources": {"gpus": 0}, "runtime": {"compile": False, "precision": "fp8"}}, "precision bf16"),
        ({"runtime": {"compileArtifacts": {"enabled": True}}}, "add model.cache"),
        (
            {"runtime": {"compile": False, "compileArtifacts": {"enabled": True, "claimName": "k"}}},
            "set runtime.compile true",
        ),
        ({"autoscaling": {"minReplicas": 0}, "replicas": 0}, "needs mode keda"),
        ({"autoscaling": {"mode": "hpa", "minReplicas": 0}, "replicas": 0}, "needs mode keda"),
        ({"autoscaling": {"mode": "keda", "minReplicas": 0}}, "needs replicas 0 too"),
        ({"autoscaling": {"mode": "keda", "minReplicas": -1}, "replicas": 0}, "must not be negative"),
    ],
)
def test_specs_the_operator_cannot_serve_are_explained(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidSpecError, match=words):
        parse_spec(raw)


def test_all_replicas_ready_is_ready_and_not_progressing() -> None:
    conditions = _conditions(deployment=_deployment(2, 2, 2))
    assert conditions["Ready"] == Condition("Ready", True, "Serving", "2 of 2 replicas ready")
    assert conditions["Progressing"].status is False
    assert conditions["Progressing"].reason == "RolloutComplete"
    assert conditions["Degraded"].status is False


def test_a_rollout_in_progress_is_progressing_but_still_ready() -> None:
    conditions = _conditions(deployment=_deployment(2, 1, 1, generation=3, observed=3))
    assert conditions["Ready"].status is True
    assert conditions["Progressing"] == Condition(
        "Progressing", True, "RollingOut", "1 of 2 replicas updated, 1 ready"
    )


def test_a_deployment_not_yet_observed_is_progressing() -> None:
    assert (
        _conditions(deployment=_deployment(2, 2, 2, generation=4, observed=3))["Progressing"].status is True
    )


def test_no_ready_replica_is_not_ready() -> None:
    conditions = _conditions(deployment=_deployment(2, 0, 2))
    assert conditions["Ready"] == Condition("Ready", False, "NoReadyReplicas", "0 of 2 replicas ready")


def _pod(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


RUNNING: dict[str, Any] = {"containerStatuses": [{"state": {"running": {}}}]}
UNSCHEDULABLE: dict[str, Any] = {
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.",
        }
    ]
}


def test_waiting_for_the_model_cache() -> None:
    job = {"status": {"active": 1}}
    assert model_state(True, job, []).reason == "CachePending"
    conditions = _conditions(
        model=model_state(True, job, [_pod("fetch", **RUNNING)]),
        desired_replicas=0,
        deployment=_deployment(0, 0, 0),
    )
    assert conditions["ModelReady"].reason == "CacheDownloading"
    assert conditions["Degraded"].status is False
    assert conditions["Ready"].reason == "WaitingForModel"
    assert conditions["Progressing"].reason == "WaitingForModel"


def test_a_prefetch_that_cannot_be_scheduled_is_degraded_with_the_schedulers_words() -> None:
    model = model_state(True, {"status": {"active": 1}}, [_pod("fetch-x", **UNSCHEDULABLE)])
    conditions = _conditions(model=model, desired_replicas=0, deployment=_deployment(0, 0, 0))
    assert (conditions["ModelReady"].reason, conditions["Degraded"].reason) == (
        "CacheBlocked",
        "CacheBlocked",
    )
    assert conditions["Degraded"].status is True
    assert "fetch-x: 0/2 nodes are available" in conditions["Degraded"].message
    assert conditions["Ready"].status is False


def test_unschedulable_server_pods_are_degraded_and_not_ready() -> None:
    conditions = _conditions(deployment=_deployment(1, 0, 1), pods=[_pod("posters-a", **UNSCHEDULABLE)])
    assert conditions["Degraded"] == Condition(
        "Degraded",
        True,
        "Unschedulable",
        "posters-a: 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.",
    )
    assert conditions["Ready"].status is False


def test_a_missing_secret_is_degraded_with_the_kubelets_message() -> None:
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "zimage-keys" not found'}
    pod = _pod("posters-a", containerStatuses=[{"state": {"waiting": waiting}}])
    degraded = _conditions(deployment=_deployment(1, 0, 1), pods=[pod])["Degraded"]
    assert degraded.reason == "PodsFailing"
    assert degraded.message == 'posters-a: CreateContainerConfigError: secret "zimage-keys" not found'


def test_a_filled_cache_is_model_ready() -> None:
    job = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert model_state(True, job).reason == "CachePopulated"


def test_a_failed_prefetch_is_degraded() -> None:
    job = {
        "status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}
    }
    conditions = _conditions(model=model_state(True, job), desired_replicas=0, deployment=None)
    assert conditions["Degraded"].status is True
    assert "BackoffLimitExceeded" in conditions["Degraded"].message


def test_crash_looping_pods_are_degraded() -> None:
    pod = {
        "metadata": {"name": "posters-abc"},
        "status": {"containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
    }
    degraded = _conditions(deployment=_deployment(2, 1, 2), pods=[pod])["Degraded"]
    assert degraded == Condition("Degraded", True, "PodsFailing", "posters-abc: CrashLoopBackOff")


def test_an_invalid_spec_is_degraded_not_a_crash() -> None:
    conditions = _conditions(invalid="spec.model.source: unsupported scheme", deployment=None)
    assert conditions["Degraded"] == Condition(
        "Degraded", True, "InvalidSpec", "spec.model.source: unsupported scheme"
    )
    assert conditions["Ready"].status is False


def test_a_refused_write_is_degraded_with_the_api_message() -> None:
    degraded = _conditions(
        apply_error="Deployment posters: field is immutable", deployment=_deployment(2, 2, 2)
    )["Degraded"]
    assert (degraded.reason, degraded.message) == ("ApplyFailed", "Deployment posters: field is immutable")


def test_transition_times_only_move_when_the_status_changes() -> None:
    first = merge_conditions(
        [], [Condition("Ready", False, "NoReadyReplicas", "0 of 1")], 1, "2026-01-01T00:00:00Z"
    )
    same = merge_conditions(
        first, [Condition("Ready", False, "NoReadyReplicas", "0 of 2")], 2, "2026-01-01T00:01:00Z"
    )
    flipped = merge_conditions(
        same, [Condition("Ready", True, "Serving", "1 of 2")], 2, "2026-01-01T00:02:00Z"
    )
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:02:00Z"
    assert same[0]["observedGeneration"] == 2
    assert transitions(first, same) == []
    assert [c["reason"] for c in transitions(same, flipped)] == ["Serving"]


@pytest.mark.parametrize(
    ("live", "want", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"l": [{"x": 1, "y": 2}]}, {"l": [{"x": 1}]}, True),
        ({"l": [{"x": 1}, {"x": 2}]}, {"l": [{"x": 1}]}, False),
        ({"cpu": "500m"}, {"cpu": "0.5"}, True),
        ({"memory": "48Gi"}, {"memory": "49Gi"}, False),
        ({"image": "a:1"}, {"image": "a:2"}, False),
    ],
)
def test_contains(live: dict[str, Any], want: dict[str, Any], expected: bool) -> None:
    assert contains(live, want) is expected


def test_a_name_conflict_blocks_the_service_and_says_which_object() -> None:
    conditions = _by_type(
        compute_conditions(
            invalid=None,
            apply_error=None,
            conflict="Service shop/shop already exists and was not created by this ZImageService",
            model=NO_CACHE,
            desired_replicas=1,
            deployment=None,
            pods=[],
        )
    )
    assert (conditions["Degraded"].status, conditions["Degraded"].reason) == (True, "NameConflict")
    assert "Service shop/shop" in conditions["Degraded"].message
    assert (conditions["Ready"].status, conditions["Progressing"].status) == (False, False)


def test_kubectl_scale_below_the_autoscalers_floor_is_explained() -> None:
    from zimage_operator.status import scaling_condition

    below = scaling_condition("builtin", 0, 1, 4)
    assert (below.status, below.reason) == (True, "BelowMinReplicas")
    assert "autoscaling.mode none and replicas 0" in below.message
    assert scaling_condition("builtin", 2, 1, 4).status is False
    assert scaling_condition("none", 0, 1, 4).reason == "AsRequested"


def _server(
    state: dict[str, Any], ready: bool, restarts: int, last: dict[str, Any] | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"name": "server", "ready": ready, "restartCount": restarts, "state": state}
    if last is not None:
        status["lastState"] = {"terminated": last}
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": [status]}}


def test_a_crash_loop_reads_the_same_in_every_state_it_passes_through() -> None:
    from zimage_operator.status import failing_pods

    exit_1 = {"exitCode": 1, "reason": "Error"}
    states = [
        _server({"terminated": exit_1}, False, 0),
        _server({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}, False, 1, exit_1),
        _server({"running": {}}, False, 1, exit_1),
        _server({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}}, False, 2, exit_1),
    ]
    said = {tuple(failing_pods([pod])) for pod in states}
    assert said == {("p: CrashLoopBackOff: container server keeps exiting, last with code 1 (Error)",)}
    # Up and ready again: the loop is over. A restart for VRAM has its own Event.
    assert failing_pods([_server({"running": {}}, True, 2, exit_1)]) == []
    vram = {"exitCode": 137, "message": "zimage: VRAM limit exceeded (process): 75 GiB"}
    assert failing_pods([_server({"running": {}}, False, 1, vram)]) == []
    assert failing_pods([_server({"running": {}}, False, 0)]) == [], "a container starting is not failing"
