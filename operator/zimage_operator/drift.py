"""Drift: how a live child differs from what the operator renders, and the patch that puts it back.

Server-side apply fixes values the operator sets, but leaves alone fields that another manager
added (``kubectl set env`` adds an env var under its own name; a port edited by hand becomes a
second port). In the sections the operator owns whole, such additions are drift too: they are
replaced with a JSON patch, so that what is rendered is exactly what runs.
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


def foreign_changes(live: dict[str, Any], want: dict[str, Any]) -> list[dict[str, Any]]:
    """JSON patch operations that put back the sections of ``live`` the operator owns whole."""
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
