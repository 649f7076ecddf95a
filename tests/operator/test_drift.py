"""Drift: what differs from the rendering, whatever was added beside it, and the patch back."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from zimage_operator import builders
from zimage_operator.drift import foreign_changes
from zimage_operator.spec import ZImageServiceSpec, parse_spec

from .test_builders import OWNER, deployment


def _served(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as the API server gives it back: with defaults it adds."""
    live = copy.deepcopy(manifest)
    if manifest["kind"] == "Deployment":
        pod = live["spec"]["template"]["spec"]
        pod.update(dnsPolicy="ClusterFirst", schedulerName="default-scheduler", restartPolicy="Always")
        main = pod["containers"][0]
        main.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
        main["livenessProbe"]["successThreshold"] = 1
    else:
        live["spec"]["clusterIP"] = "127.96.0.10"
        live["spec"]["ports"][0]["nodePort"] = 30080
    return live


def _spec() -> ZImageServiceSpec:
    return parse_spec({})


def test_defaults_the_api_server_adds_are_not_drift() -> None:
    assert foreign_changes(_served(deployment()), deployment()) == []
    service = builders.build_service(OWNER, _spec())
    assert foreign_changes(_served(service), service) == []


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda c: c["env"].append({"name": "ZIMAGE_EXTRA", "value": "1"}), "/containers/0/env"),
        (lambda c: c["resources"]["limits"].update(cpu="2"), "/containers/0/resources"),
        (lambda c: c["ports"][0].update(containerPort=9000), "/containers/0/ports"),
        (lambda c: c["args"].append("--debug"), "/containers/0/args"),
    ],
    ids=["env-added", "limit-added", "port-changed", "arg-added"],
)
def test_hand_edits_to_the_container_are_put_back(edit: Any, path: str) -> None:
    want = deployment()
    live = _served(want)
    edit(live["spec"]["template"]["spec"]["containers"][0])
    changes = foreign_changes(live, want)
    assert [op["path"] for op in changes] == [f"/spec/template/spec{path}"]
    patched = jsonpatch.apply_patch(live, changes)
    assert foreign_changes(patched, want) == []


def test_a_container_added_by_hand_is_removed() -> None:
    want = deployment()
    live = _served(want)
    live["spec"]["template"]["spec"]["containers"].append({"name": "debug", "image": "busybox"})
    (op,) = foreign_changes(live, want)
    assert op["path"] == "/spec/template/spec/containers"
    assert [c["name"] for c in op["value"]] == ["server"]


def test_a_service_port_changed_by_hand_is_put_back_whole() -> None:
    service = builders.build_service(OWNER, _spec())
    live = _served(service)
    live["spec"]["ports"][0]["port"] = 8080
    (op,) = foreign_changes(live, service)
    assert (op["op"], op["path"], op["value"]) == ("replace", "/spec/ports", service["spec"]["ports"])


def test_a_toleration_added_by_hand_is_removed() -> None:
    want = deployment()
    live = _served(want)
    live["spec"]["template"]["spec"]["tolerations"] = [{"key": "x", "operator": "Exists"}]
    assert foreign_changes(live, want) == [{"op": "remove", "path": "/spec/template/spec/tolerations"}]


def test_a_rule_added_to_the_network_policy_is_put_back() -> None:
    want = builders.build_network_policy(OWNER)
    assert foreign_changes(copy.deepcopy(want), want) == []
    live = copy.deepcopy(want)
    live["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": builders.HEALTH_PORT_NAME}]})
    changes = foreign_changes(live, want)
    assert [op["path"] for op in changes] == ["/spec"]
    assert foreign_changes(jsonpatch.apply_patch(live, changes), want) == []


# Against the rendering as the API server stores it: anything added beside it is drift.

ADDED = [
    ("/spec/template/spec/containers/0/command", ["sh"]),
    ("/spec/template/spec/initContainers", [{"name": "sneak", "image": "busybox"}]),
    ("/spec/template/spec/hostNetwork", True),
    ("/spec/template/spec/containers/0/livenessProbe/initialDelaySeconds", 3600),
    ("/spec/paused", True),
]


@pytest.mark.parametrize(("path", "value"), ADDED, ids=[path for path, _ in ADDED])
def test_a_field_added_beside_the_rendering_is_put_back(path: str, value: Any) -> None:
    want = deployment()
    full = _served(want)
    live = jsonpatch.apply_patch(full, [{"op": "add", "path": path, "value": value}])
    ops = foreign_changes(live, want, full)
    assert ops, path
    repaired = jsonpatch.apply_patch(live, ops)
    assert jsonpatch.JsonPointer(path).resolve(repaired, None) is None, "the addition is gone"
    assert repaired["spec"]["template"]["spec"] in (
        want["spec"]["template"]["spec"],
        full["spec"]["template"]["spec"],
    )


def test_the_defaulted_rendering_itself_is_not_drift_and_allocated_fields_are_left_alone() -> None:
    want = deployment()
    assert foreign_changes(_served(want), want, _served(want)) == []
    service = builders.build_service(OWNER, _spec())
    full = _served(service)
    live = copy.deepcopy(full)
    live["spec"]["clusterIP"] = "127.96.0.99"  # allocated: the server's, not the operator's
    live["spec"]["ports"][0]["nodePort"] = 31000
    assert foreign_changes(live, service, full) == []
    live["spec"]["externalIPs"] = ["203.0.113.7"]
    assert foreign_changes(live, service, full) == [{"op": "remove", "path": "/spec/externalIPs"}]


def test_a_disruption_budget_edited_to_min_available_gets_its_rendered_spec_back() -> None:
    pdb = builders.build_pdb(OWNER, _spec())
    live = copy.deepcopy(pdb)
    del live["spec"]["maxUnavailable"]
    live["spec"]["minAvailable"] = "100%"
    assert foreign_changes(live, pdb, copy.deepcopy(pdb)) == [
        {"op": "replace", "path": "/spec", "value": pdb["spec"]}
    ]
