"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, mapped in one place."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client can act on. ``status`` is the HTTP status; the rest goes in the body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def draining_error(what: str) -> APIError:
    """503 ``draining``: the server is shutting down and ``what``."""
    return APIError(
        503,
        f"the server is shutting down and {what}; retry, another replica will answer",
        type="server_error",
        code="draining",
        headers={"Retry-After": "1"},
    )


def invalid_json(detail: str | None = None) -> APIError:
    return bad_request(
        f"the request body is not valid JSON{f' ({detail})' if detail else ''}; send a JSON object "
        'such as {"prompt": "a red fox"} with Content-Type: application/json',
        code="invalid_json",
    )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
    )


def describe_validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """Turn pydantic's first complaint into one sentence that names the field and the fix (a
    JSON body's, or a form's fields validated by hand, as the edits route does)."""
    errors = exc.errors()
    if not errors:
        return bad_request("the request is not valid")
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        ctx = first.get("ctx")
        return invalid_json(str(ctx["error"]) if isinstance(ctx, dict) and ctx.get("error") else None)
    if kind == "missing" and param:
        return bad_request(f"'{param}' is required", param=param, code="missing_required_parameter")
    if kind == "missing" or (kind in ("model_attributes_type", "dict_type") and not param):
        return bad_request(
            'the request body must be a JSON object such as {"prompt": "a red fox"}, '
            "sent with Content-Type: application/json",
            code="invalid_body",
        )
    if kind == "extra_forbidden" and param:
        return bad_request(
            f"unknown parameter '{param}'; check its spelling against the images API",
            param=param,
            code="unknown_parameter",
        )
    if param:
        return bad_request(f"invalid '{param}': {msg}", param=param)
    return bad_request(msg)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a body json.loads raised on
            return _response(invalid_json("it is not UTF-8, nests too deep or holds too long a number"))
        if exc.status_code == 413:  # middleware.BodyTooLargeError: the rest of the body stays unread
            return _response(
                APIError(413, str(exc.detail), code="request_too_large", headers={"Connection": "close"})
            )
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /openapi.json for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(
            exc.status_code, message, code=f"http_{exc.status_code}", headers=dict(exc.headers or {})
        )
        return _response(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        logger.exception("internal error %s on %s %s", error_id, request.method, request.url.path)
        return _response(
            APIError(
                500,
                f"internal server error (error id {error_id}); the server log has the details",
                type="server_error",
                code="internal_error",
            )
        )
