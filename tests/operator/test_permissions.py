"""The permissions the operator checks for are the ones its manifests grant, no more."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from zimage_operator.permissions import NEEDS, Missing, PermissionReport

ROOT = Path(__file__).resolve().parents[2]


def granted() -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for doc in yaml.safe_load_all((ROOT / "deploy/operator/rbac.yaml").read_text()):
        if doc["kind"] != "ClusterRole":
            continue  # the Role of the Lease: the test below
        for rule in doc.get("rules", []):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_the_manifests_grant_exactly_what_the_operator_checks_for() -> None:
    rules = granted()
    rules.pop(("apiextensions.k8s.io", "customresourcedefinitions"))  # Kopf's, cluster-scoped
    needed = {
        (need.group, f"{need.resource}/{need.subresource}" if need.subresource else need.resource): set(
            need.verbs
        )
        for need in NEEDS
    }
    assert rules == needed


def test_the_chart_grants_the_same_rules() -> None:
    helpers = (ROOT / "charts/zimage-operator/templates/_helpers.tpl").read_text()
    chart = helpers.split('{{- define "zimage-operator.rules" -}}\n', 1)[1].split("{{- end }}", 1)[0]
    deploy = yaml.safe_load_all((ROOT / "deploy/operator/rbac.yaml").read_text())
    (cluster_role,) = [doc for doc in deploy if doc["kind"] == "ClusterRole"]
    rules = [rule for rule in cluster_role["rules"] if rule["apiGroups"] != ["apiextensions.k8s.io"]]
    assert yaml.safe_load(chart) == rules


def test_the_lease_role_grants_what_leader_election_calls() -> None:
    """election.py reads, creates, replaces (update) and, giving it up, patches the Lease."""
    (role,) = [
        d for d in yaml.safe_load_all((ROOT / "deploy/operator/rbac.yaml").read_text()) if d["kind"] == "Role"
    ]
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update", "patch"],
        }
    ]
    source = (ROOT / "operator/zimage_operator/election.py").read_text()
    calls = {"read_namespaced_lease": "get", "create_namespaced_lease": "create"}
    calls |= {"replace_namespaced_lease": "update", "patch_namespaced_lease": "patch"}
    assert {verb for call, verb in calls.items() if call in source} == set(role["rules"][0]["verbs"])


def test_a_missing_watch_fails_liveness_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    report = PermissionReport()
    pods = next(need for need in NEEDS if need.resource == "pods")
    events = next(need for need in NEEDS if need.resource == "events")
    with caplog.at_level(logging.INFO, "zimage_operator.permissions"):
        report.update([Missing(events, ("create",), "shop")])
        assert report.health_problem() is None, "events are best effort: liveness holds"
        report.update([Missing(pods, ("list", "watch"), "shop")])
        report.update([Missing(pods, ("list", "watch"), "shop")])
        problem = report.health_problem()
        assert problem is not None
        assert "list, watch on pods in namespace shop" in problem
        report.update([])
        assert report.health_problem() is None
    said = [r.getMessage() for r in caplog.records]
    assert sum("lacks permissions" in line for line in said) == 2, said
    assert "now has every permission" in said[-1]
