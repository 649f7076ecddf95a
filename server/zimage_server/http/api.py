"""HTTP routes. They stay thin: the service does the work, errors map in errors.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from zimage_server.core.errors import bad_request
from zimage_server.core.state import ServerState
from zimage_server.health import health
from zimage_server.http import edits
from zimage_server.http.openapi import IMAGE_ERRORS, PROBE_RESPONSES, errors
from zimage_server.http.protocol import (
    MEDIA_TYPES,
    ImageGenerationRequest,
    ImageGenerationResponse,
    SingleImageRequest,
)
from zimage_server.http.service import GenerationParams, ImageService
from zimage_server.http.streaming import ImageStream
from zimage_server.pipeline import compile_artifacts

router = APIRouter()


def _service(request: Request) -> ImageService:
    service: ImageService = request.app.state.service
    return service


@router.post(
    "/v1/images/generations", response_model=ImageGenerationResponse, tags=["images"], responses=IMAGE_ERRORS
)
async def create_images(body: ImageGenerationRequest, request: Request) -> Response:
    """Generate images; the OpenAI Images API shape, with ``seed`` and ``num_inference_steps``."""
    service = _service(request)
    return await _images(service, service.params(body), request)


@router.post(
    "/v1/images/edits",
    response_model=ImageGenerationResponse,
    tags=["images"],
    responses=IMAGE_ERRORS,
    openapi_extra=edits.form_schema(),
)
async def edit_images(request: Request) -> Response:
    """Edit an image: image to image, or inpainting where a mask says; OpenAI's images edit API
    (multipart), with ``seed``, ``strength`` and ``num_inference_steps``."""
    service = _service(request)
    req, edit = await edits.edit_request(request, service.settings)
    params = service.params(req)
    params = replace(params, edit=edits.start_images(edit, params.width, params.height))
    return await _images(service, params, request)


async def _images(service: ImageService, params: GenerationParams, request: Request) -> Response:
    """The images of checked work: streamed as server-sent events, or one JSON body."""
    if params.stream:
        stream = ImageStream(service, service.admit(params), params)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream.events(), media_type="text/event-stream", headers=headers)
    images = await service.generate(params, request)
    return sliced_response(await service.encode_response(images, params), "application/json")


@router.post(
    "/generate",
    tags=["images"],
    response_class=Response,
    responses={
        200: {
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()
            }
        },
        **IMAGE_ERRORS,
    },
)
async def generate(body: SingleImageRequest, request: Request) -> Response:
    """Generate one image and return its bytes (``curl ... -o out.png``)."""
    if body.n != 1:
        raise bad_request("POST /generate returns one image; use /v1/images/generations for n > 1", param="n")
    if body.stream:
        raise bad_request(
            "POST /generate returns the image's bytes; stream from /v1/images/generations", param="stream"
        )
    service = _service(request)
    params = service.params(body)
    images = await service.generate(params, request)
    (data,) = await service.encode(images, params)
    headers = {"X-Seed": str(params.seeds[0]), "X-Size": params.size}
    return sliced_response(data, MEDIA_TYPES[params.output_format], headers)


# Image bodies run to tens of megabytes. Handed to the transport in one piece, the copy into
# its buffer holds the event loop for milliseconds; in slices, flow control paces it and the
# probes get their turn.
_RESPONSE_SLICE = 2**19


def sliced_response(body: bytes, media_type: str, headers: dict[str, str] | None = None) -> Response:
    if len(body) <= _RESPONSE_SLICE:
        return Response(body, media_type=media_type, headers=headers)

    async def slices() -> AsyncIterator[bytes]:
        view = memoryview(body)
        for start in range(0, len(body), _RESPONSE_SLICE):
            yield bytes(view[start : start + _RESPONSE_SLICE])

    all_headers = {**(headers or {}), "Content-Length": str(len(body))}
    return StreamingResponse(slices(), media_type=media_type, headers=all_headers)


@router.get("/v1/models", tags=["images"], responses=errors(401))
async def list_models(request: Request) -> dict[str, Any]:
    """The served model, and each LoRA adapter loaded (as vLLM lists them: its base model as
    its ``parent``); a request names an adapter in ``lora``, or as its ``model``."""
    service = _service(request)
    base = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "zimage"}
    adapters = [
        {
            "id": adapter.name,
            "object": "model",
            "created": 0,
            "owned_by": "zimage",
            "parent": service.model_name,
            "lora": {"scale": adapter.scale, "rank": adapter.rank},
        }
        for adapter in service.engine.adapters.adapters.values()
    ]
    return {"object": "list", "data": [base, *adapters]}


def _probe(answer: tuple[int, dict[str, Any]]) -> JSONResponse:
    status, body = answer
    return JSONResponse(body, status_code=status)


@router.get("/healthz/live", tags=["health"], responses=PROBE_RESPONSES)
async def live(request: Request) -> JSONResponse:
    """Fails when the process can no longer serve: the model failed to load, the worker died,
    or GPU memory has stayed over the VRAM limit (the sampler's last verdict; no NVML call)."""
    state: ServerState = request.app.state.server_state
    return _probe(health.live(state, _service(request).engine.alive, request.app.state.vram))


@router.get("/healthz/ready", tags=["health"], responses=PROBE_RESPONSES)
async def ready(request: Request) -> JSONResponse:
    """503 until the model is loaded and warmed up, and again while draining."""
    return _probe(health.ready(request.app.state.server_state))


@router.get("/healthz/startup", tags=["health"], responses=PROBE_RESPONSES)
async def startup(request: Request) -> JSONResponse:
    """Passes once loading and warm-up are done; the kubelet holds other probes until then."""
    return _probe(health.startup(request.app.state.server_state))


@router.get("/load", tags=["health"])
async def load(request: Request) -> dict[str, Any]:
    """The load signal, cheap to poll: what an autoscaler needs to size the deployment."""
    service = _service(request)
    engine = service.engine
    state: ServerState = request.app.state.server_state
    artifacts = engine.artifacts
    return {
        "ready": state.ready,
        "draining": state.draining,
        "queue_depth": engine.waiting,
        "queue_images": engine.queued_images,
        "in_flight": engine.in_flight,
        "pending_gpu_seconds": round(engine.pending_gpu_seconds(), 4),
        "seconds_per_megapixel_step": round(engine.cost.rate, 6),
        # Where the compiled pipeline stands: off, compiling (requests run uncompiled, slower,
        # and are priced so), compiled, failed (uncompiled for good).
        "compile": engine.compile_state,
        "max_batch_size": service.settings.max_batch_size,
        "max_queue": service.settings.max_queue,
        # Pipeline workers behind the queue (one per GPU), and how many run a batch now.
        "workers": len(engine.workers),
        "busy_workers": sum(1 for worker in engine.workers if worker.jobs),
        "sequence_parallel": service.settings.sequence_parallel,
        # The LoRA adapters this replica loaded, and those it could not, with why.
        "adapters": {
            "loaded": list(engine.adapters.adapters),
            "failed": dict(engine.adapters.failed),
        },
        # What this replica did with the shared compile artifacts (off unless configured), and
        # the artifact's key, a digest of its GPU, versions and choices.
        "compile_artifacts": {
            "state": artifacts.state,
            "artifact": compile_artifacts.artifact_key(artifacts.path) if artifacts.path else None,
        },
    }


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
