"""The built-in autoscaler's decision, case by case."""

from __future__ import annotations

import pytest

from zimage_operator.scaling import Decision, History, PodLoad, artifacts_status, decide
from zimage_operator.spec import AutoscalingSpec

SPEC = AutoscalingSpec(
    minReplicas=1, maxReplicas=6, targetQueuePerReplica=4, scaleDownStabilizationSeconds=60
)


def pods(*loads: tuple[int, int], unreachable: int = 0) -> list[PodLoad]:
    found = [PodLoad(f"p{i}", True, queue, running) for i, (queue, running) in enumerate(loads)]
    return found + [PodLoad(f"u{i}", False, error="timed out") for i in range(unreachable)]


def run(current: int, loads: list[PodLoad], history: History | None = None, now: float = 1000.0) -> Decision:
    return decide(SPEC, current, loads, history or History(), now)


@pytest.mark.parametrize(
    ("case", "current", "loads", "expected"),
    [
        ("idle at the minimum", 1, pods((0, 0)), 1),
        ("load fits", 2, pods((3, 1), (2, 1)), 2),
        ("scale up at once", 1, pods((10, 1)), 3),
        ("scale up clamped to max", 2, pods((40, 1), (40, 1)), 6),
        ("below min is raised", 0, [], 1),
        ("above max is lowered", 9, pods(*[(0, 0)] * 9), 6),
    ],
)
def test_decisions(case: str, current: int, loads: list[PodLoad], expected: int) -> None:
    assert run(current, loads).desired == expected, case


def test_scale_down_waits_for_the_stabilization_window() -> None:
    history = History()
    assert run(1, pods((12, 0)), history, now=0).desired == 3
    # Load is gone, but 3 replicas were needed 30 s ago: hold.
    held = run(3, pods((0, 0), (0, 0), (0, 0)), history, now=30)
    assert held.desired == 3
    # 61 s after the peak the window has passed: scale down.
    assert run(3, pods((0, 0), (0, 0), (0, 0)), history, now=61).desired < 3


def test_scale_down_is_bounded_per_step() -> None:
    history = History()
    decision = run(6, pods(*[(0, 0)] * 6), history, now=0)
    assert decision.desired == 3, "at most half of the replicas go in one step"


def test_busy_pods_are_not_scaled_away() -> None:
    history = History()
    decision = run(4, pods((1, 0), (0, 1), (0, 1), (0, 0)), history, now=0)
    assert decision.recommended == 1
    assert decision.desired == 3, "three pods are busy"


def test_unreachable_pods_count_as_busy_and_are_reported() -> None:
    decision = run(3, pods((0, 0), unreachable=2), History(), now=0)
    assert decision.desired == 2
    assert decision.unreachable == ("u0", "u1")
    assert "unreachable: u0, u1" in decision.reason


def test_unreachable_pods_add_no_load() -> None:
    decision = run(1, pods((0, 0), unreachable=1), History(), now=0)
    assert (decision.load, decision.desired) == (0, 1)


def test_artifacts_are_available_once_a_ready_replica_found_or_wrote_them() -> None:
    pods = [
        PodLoad("a", True, artifacts="saved", artifact="zimage-compile-1.bin"),
        PodLoad("b", True, artifacts="loaded", artifact="zimage-compile-1.bin"),
        PodLoad("c", False),
    ]
    status = artifacts_status(pods)
    assert status["state"] == "Available"
    assert status["artifacts"] == ["zimage-compile-1.bin"]
    assert status["pods"] == {"saved": 1, "loaded": 1}
    assert "2 of 3 ready replicas" in str(status["message"])


def test_artifacts_are_missing_when_every_replica_compiled_without_them() -> None:
    # A replica whose save failed (a read-only or full volume) reports absent after its warm-up.
    status = artifacts_status([PodLoad("a", True, artifacts="absent", artifact="zimage-compile-1.bin")])
    assert (status["state"], status["artifacts"], status["pods"]) == ("Missing", [], {"absent": 1})
    assert "absent 1" in str(status["message"])


def test_artifacts_are_unknown_without_a_report() -> None:
    # No ready pod, an unreachable one, a server too old to say, or one still warming up
    # (Ready to the kubelet's eyes too early, where readiness is not the server's).
    warming = PodLoad("a", True, artifacts="absent", artifact="zimage-compile-1.bin", ready=False)
    for pods in ([], [PodLoad("a", False)], [PodLoad("a", True)], [warming]):
        assert artifacts_status(pods)["state"] == "Unknown"


def test_the_status_names_the_artifact_file_the_server_keys() -> None:
    from zimage_operator.autoscaler import artifact_file
    from zimage_server.pipeline import compile_artifacts

    path = compile_artifacts.artifact_path("/shared", {"gpu": "H100", "torch": "2.11"})
    key = compile_artifacts.artifact_key(path)
    assert "/" not in key
    assert not key.endswith(".bin"), "the server's answer names no file"
    assert artifact_file(key) == path.name
    assert artifact_file(path.name) == path.name, "what older servers sent"
    assert artifact_file(None) is None


def test_the_window_kept_in_the_status_continues_in_another_operator() -> None:
    first = History()
    assert first.add(1000.0, 4, 60) == 4
    assert first.add(1002.5, 3, 60) == 4
    recorded = first.to_status()
    # Times rounded up to the second: a window continued from them ends no earlier.
    assert recorded == [
        {"time": "1970-01-01T00:16:40Z", "replicas": 4},
        {"time": "1970-01-01T00:16:43Z", "replicas": 3},
    ]
    # Another operator, started at 1014: the window still holds 4 until 60 s after it was asked
    # for, and 3 (asked for until the first operator stopped, which the status cannot say)
    # until 60 s after the second one started.
    second = History()
    second.restore(recorded, now=1014.0)
    assert second.add(1016.0, 1, 60) == 4
    assert second.add(1059.0, 1, 60) == 4
    assert second.add(1061.0, 1, 60) == 3
    assert second.add(1073.0, 1, 60) == 3
    assert second.add(1075.0, 1, 60) == 1
    # Restored once, and only into an empty history; a malformed status is ignored.
    second.restore([{"time": "1970-01-01T00:16:40Z", "replicas": 9}], now=1080.0)
    assert second.add(1080.0, 1, 60) == 1
    third = History()
    third.restore([{"time": "yesterday", "replicas": 2}, {"replicas": 3}, "x"], now=0.0)
    assert third.values() == []


def test_the_window_keeps_only_what_can_still_be_its_highest() -> None:
    history = History()
    for at, value in [(0.0, 2), (1.0, 5), (2.0, 3), (3.0, 3), (4.0, 4), (5.0, 1)]:
        history.add(at, value, 100)
    assert history.values() == [5, 4, 1]
