"""The CRD's defaults are the operator's: each default the schema gives a spec field is the one
the spec's model takes when the field is absent (the API server fills in the first, the
builders' tests run on the second), and the chart ships the same CRD."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from zimage_operator.spec import ZImageServiceSpec

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy/crds/zimage.dev_zimageservices.yaml"


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def _defaults(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, prop in (schema.get("properties") or {}).items():
        here = (*path, name)
        if "default" in prop and prop["default"] != {}:
            found.append((here, prop["default"]))
        if prop.get("type") == "object":
            found += _defaults(prop, here)
    return found


def _model_default(model: type[BaseModel], path: tuple[str, ...]) -> Any:
    """The default the model's field at ``path`` takes (objects below optional ones included)."""
    for depth, name in enumerate(path):
        fields = {field.alias or key: field for key, field in model.model_fields.items()}
        field = fields[name]
        if depth == len(path) - 1:
            value = field.get_default(call_default_factory=True)
            return value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value
        (model,) = [
            arg for arg in (typing.get_args(field.annotation) or (field.annotation,)) if arg is not type(None)
        ]
    raise AssertionError("an empty path")


def test_every_crd_default_is_the_spec_models_default() -> None:
    defaults = _defaults(_schema())
    assert len(defaults) >= 35, "the walk found the schema's defaults"
    differ = {
        ".".join(path): (default, _model_default(ZImageServiceSpec, path))
        for path, default in defaults
        if _model_default(ZImageServiceSpec, path) != default
    }
    assert differ == {}


def test_the_chart_ships_the_same_crd() -> None:
    chart = ROOT / "charts/zimage-operator/crds/zimage.dev_zimageservices.yaml"
    assert chart.read_text() == CRD.read_text()
