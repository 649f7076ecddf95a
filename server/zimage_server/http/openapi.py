"""The published OpenAPI document: FastAPI's, made true to what this server does.

FastAPI documents a 422 for every route with a body (this server answers bad input with 400),
and knows nothing of limits the settings set. Here the error statuses each route answers are
listed with the OpenAI error shape, and the request schemas carry the settings' limits, so
that a client (or schemathesis, in the tests) reading the document finds what the server does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from zimage_server.core.adapters import MAX_SCALE, MIN_SCALE
from zimage_server.core.config import SIZE_MULTIPLE, Settings
from zimage_server.http.edits import publish_form
from zimage_server.http.protocol import VISIBLE, ErrorResponse


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad input: the message names the parameter and the fix",
        401: "No API key, or not one of the server's keys",
        404: "A model that is not served here",
        413: "The request body is over the server's limit",
        429: "The queue is full; retry after Retry-After seconds",
        503: "Not ready yet, shutting down, or too many open connections; retry",
        504: "The request did not finish within the server's timeout",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}


IMAGE_ERRORS = errors(400, 401, 404, 413, 429, 503, 504)
PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Not passing; the body says why",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _publish_limits(properties: dict[str, Any], settings: Settings, max_n: int) -> None:
    """The limits this server's settings set, written into the request's schema, so that what
    the document admits is what the server admits (ImageService.params checks the same)."""
    sides = "|".join(str(side) for side in range(settings.min_size, settings.max_size + 1, SIZE_MULTIPLE))
    properties["prompt"].update(maxLength=settings.max_prompt_chars, pattern=VISIBLE)
    properties["n"].update(minimum=1, maximum=max_n)
    properties["size"] = _nullable(
        {
            "type": "string",
            "pattern": f"^(auto|({sides})[xX]({sides}))$",
            "description": properties["size"].get("description", ""),
        }
    )
    steps = {"type": "integer", "minimum": 1, "maximum": settings.max_steps}
    properties["num_inference_steps"] = _nullable({**steps, "description": "Denoising steps"})
    properties["response_format"] = _nullable({"type": "string", "enum": ["b64_json"]})
    # The adapters this server was started with, and how many a request may combine (a name
    # given twice, or ranks past the ceiling, are still refused with a 400 that says so).
    names = [adapter.name for adapter in settings.loras]
    choice: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": names} if names else {"type": "string"},
            "scale": _nullable({"type": "number", "minimum": MIN_SCALE, "maximum": MAX_SCALE}),
        },
    }
    most = min(settings.lora_max_per_request, len(names))
    properties["lora"] = _nullable(
        {
            "type": "array",
            "items": choice,
            "maxItems": most,
            "description": properties["lora"].get("description", ""),
        }
    )
    for name, values in (("background", ["auto", "opaque"]), ("moderation", ["low"])):
        description = properties[name].get("description", "")
        properties[name] = _nullable({"type": "string", "enum": values, "description": description})


# One server-sent event of a streamed answer (streaming.py); its data is JSON.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "with stream: each server-sent event (docs/server.md)",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": [
                "image_generation.partial_image",
                "image_generation.completed",
                "image_edit.partial_image",
                "image_edit.completed",
                "zimage.queue",
                "zimage.progress",
                "error",
            ],
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def _publish_streaming(schemas: dict[str, Any]) -> None:
    """``partial_images`` and ``stream_progress`` only with ``stream: true``, and /generate
    (which answers bytes) never streams: what ImageService.params and the route refuse."""
    streaming = schemas["ImageGenerationRequest"]
    streaming["allOf"] = [
        {
            "if": {"required": [name], "properties": {name: {"not": {"type": "null"}}}},
            "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
        }
        for name in ("partial_images", "stream_progress")
    ]
    single = schemas["SingleImageRequest"]["properties"]
    single["stream"] = _nullable({"type": "boolean", "const": False})
    for name in ("partial_images", "stream_progress"):
        single[name] = {"type": "null"}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with this server's limits, less what it never answers: bad input is
    400 in the error shape (errors.py), never FastAPI's 422."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in document["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        schemas = document.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        for name, most in (("ImageGenerationRequest", app.state.settings.max_n), ("SingleImageRequest", 1)):
            _publish_limits(schemas[name]["properties"], app.state.settings, most)
        _publish_streaming(schemas)
        edit = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
        publish_form(edit["schema"], schemas["ImageGenerationRequest"])
        for path in ("/v1/images/generations", "/v1/images/edits"):
            answer = document["paths"][path]["post"]["responses"]["200"]
            answer["content"]["text/event-stream"] = {"schema": SSE_EVENT}
        app.openapi_schema = document
    return app.openapi_schema
