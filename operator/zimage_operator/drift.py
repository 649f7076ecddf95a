"""Drift: how a live child differs from what the operator renders, and the patch that puts it back.

Server-side apply fixes values the operator sets, but leaves alone fields that another manager
added (``kubectl set env`` adds an env var under its own name, ``kubectl patch`` can add a
``command``, ``hostNetwork`` or ``paused``). Such additions are drift too. The live object is
compared with the rendering as the API server would store it (a dry run fills in its
defaults), so anything beside what is rendered shows, and is replaced with a JSON patch: what
is rendered is exactly what runs.
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity


def contains(live: Any, want: Any) -> bool:
    """Whether everything in ``want`` is in ``live`` (the server adds defaults; that is fine)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            key in live and contains(live[key], value) for key, value in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b) for a, b in zip(live, want, strict=True))
        )
    if isinstance(want, str) and isinstance(live, str) and want != live:
        return _same_quantity(live, want)
    return bool(live == want)


def _same_quantity(a: str, b: str) -> bool:
    try:
        return bool(parse_quantity(a) == parse_quantity(b))
    except ValueError:
        return False


def exactly(live: Any, want: Any) -> bool:
    """Equal, quantities compared by value: for sections the API server adds no defaults to."""
    return contains(live, want) and contains(want, live)


# Sections of a container the API server leaves as written: anything else there is a hand edit.
_CONTAINER_EXACT = ("args", "env", "ports", "resources", "volumeMounts")
_POD_EXACT = ("volumes", "nodeSelector", "tolerations", "affinity")


def _at(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _replace(path: str, live: Any, value: Any) -> dict[str, Any]:
    if value is None:
        return {"op": "remove", "path": path}
    return {"op": "replace" if live is not None else "add", "path": path, "value": value}


# Service fields the API server allocates: never the operator's to set or put back.
_ALLOCATED = frozenset({"clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "healthCheckNodePort"})
# Deployment fields owned elsewhere: the replica count (an autoscaler's), the immutable selector,
# and the pod template (compared on its own).
_DEPLOYMENT_ELSEWHERE = frozenset({"replicas", "selector", "template"})


def foreign_changes(
    live: dict[str, Any], want: dict[str, Any], defaulted: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """JSON patch operations that make ``live`` run what ``want`` renders, whatever was added
    beside it. ``defaulted`` is ``want`` as the API server stores it (its defaults filled in):
    what the live object is compared with, field for field. Without it, only the sections the
    operator owns whole are compared."""
    if defaulted is None:
        return _owned_section_changes(live, want)
    kind = want["kind"]
    live_spec, want_spec, full_spec = (_at(obj, "spec") or {} for obj in (live, want, defaulted))
    if kind == "Deployment":
        ops = []
        live_pod = _at(live_spec, "template", "spec")
        if not exactly(live_pod, _at(full_spec, "template", "spec")):
            ops.append(_replace("/spec/template/spec", live_pod, _at(want_spec, "template", "spec")))
        return ops + _field_changes(live_spec, want_spec, full_spec, skip=_DEPLOYMENT_ELSEWHERE)
    if kind == "Service":
        ops = []
        live_ports, full_ports = live_spec.get("ports"), full_spec.get("ports")
        if not exactly(_without_node_ports(live_ports), _without_node_ports(full_ports)):
            ops.append(_replace("/spec/ports", live_ports, want_spec.get("ports")))
        return ops + _field_changes(live_spec, want_spec, full_spec, skip=_ALLOCATED | {"ports"})
    if kind in ("PodDisruptionBudget", "NetworkPolicy"):
        return [] if exactly(live_spec, full_spec) else [_replace("/spec", live_spec, want_spec)]
    return []


def _field_changes(
    live: dict[str, Any], want: dict[str, Any], full: dict[str, Any], *, skip: frozenset[str]
) -> list[dict[str, Any]]:
    """Each top-level field of a spec that differs from the defaulted rendering: set to what is
    rendered (or its default), or removed where the rendering has no such field."""
    ops = []
    for key in sorted((set(live) | set(full)) - skip):
        if exactly(live.get(key), full.get(key)):
            continue
        value = want.get(key, full.get(key))
        ops.append(_replace(f"/spec/{_escape(key)}", live.get(key), value))
    return ops


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _without_node_ports(ports: Any) -> Any:
    if not isinstance(ports, list):
        return ports
    return [
        {key: value for key, value in port.items() if key != "nodePort"} if isinstance(port, dict) else port
        for port in ports
    ]


def _owned_section_changes(live: dict[str, Any], want: dict[str, Any]) -> list[dict[str, Any]]:
    kind = want["kind"]
    if kind == "Deployment":
        return _pod_template_changes(live, want)
    if kind == "Service":
        ops = []
        live_ports, want_ports = _at(live, "spec", "ports"), _at(want, "spec", "ports")
        # One way only: the API server fills in node ports for NodePort and LoadBalancer.
        if not contains(live_ports, want_ports):
            ops.append(_replace("/spec/ports", live_ports, want_ports))
        live_selector, want_selector = _at(live, "spec", "selector"), _at(want, "spec", "selector")
        if not exactly(live_selector, want_selector):
            ops.append(_replace("/spec/selector", live_selector, want_selector))
        return ops
    if kind == "NetworkPolicy":  # the whole spec: a rule someone added would open the health port
        live_spec, want_spec = _at(live, "spec"), _at(want, "spec")
        return [] if exactly(live_spec, want_spec) else [_replace("/spec", live_spec, want_spec)]
    return []


def _pod_template_changes(live: dict[str, Any], want: dict[str, Any]) -> list[dict[str, Any]]:
    base = "/spec/template/spec"
    live_pod = _at(live, "spec", "template", "spec") or {}
    want_pod = _at(want, "spec", "template", "spec") or {}
    live_containers = live_pod.get("containers") or []
    want_containers = want_pod.get("containers") or []
    if [c.get("name") for c in live_containers] != [c.get("name") for c in want_containers]:
        return [_replace(f"{base}/containers", live_containers, want_containers)]
    ops = []
    for index, (have, wanted) in enumerate(zip(live_containers, want_containers, strict=True)):
        for key in _CONTAINER_EXACT:
            if not exactly(have.get(key), wanted.get(key)):
                ops.append(_replace(f"{base}/containers/{index}/{key}", have.get(key), wanted.get(key)))
    for key in _POD_EXACT:
        if not exactly(live_pod.get(key), want_pod.get(key)):
            ops.append(_replace(f"{base}/{key}", live_pod.get(key), want_pod.get(key)))
    return ops
