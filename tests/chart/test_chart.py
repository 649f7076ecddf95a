"""The Helm chart: lint, render, the schema and the CRD copy, with the helm built for the tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zimage-operator"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(scope="module")
def helm(cluster_binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("helm-home")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(cluster_binaries / "helm"), *args], capture_output=True, text=True, env=env, timeout=120
        )

    return run


def render(helm: Any, *args: str, release: str = "zimage") -> list[dict[str, Any]]:
    result = helm("template", release, str(CHART), "--namespace", "zimage-system", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_crd_copy_is_identical_to_deploy() -> None:
    assert (CHART / "crds/zimage.dev_zimageservices.yaml").read_bytes() == (
        ROOT / "deploy/crds/zimage.dev_zimageservices.yaml"
    ).read_bytes()


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["default", *(v.stem for v in CI_VALUES)])
def test_lint_and_template_pass(helm: Any, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    lint = helm("lint", str(CHART), "--strict", *extra)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    kinds = {doc["kind"] for doc in render(helm, *extra)}
    assert {"Deployment", "ServiceAccount", "Service"} <= kinds


# Maps whose contents are Kubernetes fields passed through as they are.
FREE_FORM = {"resources", "podSecurityContext", "securityContext"}


def test_every_value_is_documented_by_a_comment_naming_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    parent = ""
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        if indent == 0:
            parent, name = key, key
        elif indent == 2 and parent not in FREE_FORM:
            name = f"{parent}.{key}"
        else:
            continue
        first = number
        while first > 0 and lines[first - 1].strip().startswith("#"):
            first -= 1  # the comment block above the key
        comment = lines[first].strip() if first < number else ""
        assert comment.startswith(f"# {name} --"), f"{name}: no comment starting with its name"


def test_namespaced_mode_uses_roles_not_cluster_roles(helm: Any) -> None:
    docs = render(helm, "--set", "watch.namespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role" and "leases" not in str(d["rules"])]
    assert sorted(d["metadata"]["namespace"] for d in roles) == ["team-a", "team-b"]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["zimage-zimage-operator-crds"]
    assert all(rule["apiGroups"] == ["apiextensions.k8s.io"] for rule in cluster_roles[0]["rules"])
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--namespaces",
        "team-a,team-b",
    ]


def test_the_chart_grants_what_deploy_grants(helm: Any) -> None:
    docs = render(helm)
    deploy = list(yaml.safe_load_all((ROOT / "deploy/operator/rbac.yaml").read_text()))
    key = lambda rule: (tuple(rule["apiGroups"]), tuple(rule["resources"]), tuple(rule["verbs"]))  # noqa: E731
    for kind in ("ClusterRole", "Role"):
        chart_rules = [r for d in docs if d["kind"] == kind for r in d["rules"]]
        deploy_rules = [r for d in deploy if d["kind"] == kind for r in d["rules"]]
        assert sorted(map(key, chart_rules)) == sorted(map(key, deploy_rules)), kind


def test_two_replicas_share_a_lease_spread_over_nodes_and_keep_one_through_a_drain(helm: Any) -> None:
    docs = render(helm)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deployment["spec"]["template"]["spec"]
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    assert env["ZIMAGE_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    (lease_role,) = [d for d in docs if d["kind"] == "Role"]
    assert lease_role["rules"][0]["resources"] == ["leases"]
    # One replica without election: no PDB (it would block every drain), Recreate.
    single = render(helm, "--set", "replicaCount=1", "--set", "leaderElection.enabled=false")
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]
    (deployment,) = [d for d in single if d["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # Several replicas without election would act at once: refused.
    refused = helm("template", "zimage", str(CHART), "--set", "leaderElection.enabled=false")
    assert refused.returncode != 0
    assert "replicaCount above 1 needs leaderElection.enabled" in refused.stderr


def test_names_fit_in_63_characters_and_selectors_leave_out_the_version(helm: Any) -> None:
    release = "a-release-name-as-long-as-helm-allows-fifty-three-chr"  # 53 characters
    docs = render(helm, release=release)
    assert all(len(doc["metadata"]["name"]) <= 63 for doc in docs)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector
    assert set(selector.items()) <= set(deployment["spec"]["template"]["metadata"]["labels"].items())


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
        ("logLevel=chatty", "at '/logLevel': value must be one of"),
        ("replicaCount=0", "at '/replicaCount': minimum"),
        ("watch.namespaces={Team_A}", "at '/watch/namespaces/0': 'Team_A' does not match pattern"),
        ("serviceMonitor.enabled=maybe", "at '/serviceMonitor/enabled': got string, want boolean"),
        ("serviceMonitor.interval=often", "at '/serviceMonitor/interval'"),
        ("leaderElection.leaseSeconds=2", "at '/leaderElection/leaseSeconds': minimum"),
        ("example.modelSource=s3://bucket/x", "at '/example/modelSource'"),
        ("rbac.create=yes", "at '/rbac/create': got string, want boolean"),
    ],
)
def test_the_values_schema_refuses_wrong_values(helm: Any, setting: str, words: str) -> None:
    result = helm("template", "zimage", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert words in result.stderr, result.stderr
