"""The web playground at ``/``: a page, its script and stylesheet, and the settings it needs.

Everything it loads comes from this server (the Content-Security-Policy allows nothing else),
so it works offline, through a Service and through ``kubectl port-forward``. It calls the
same streamed images API as any client, with the key the user enters (kept in the browser).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from zimage_server.core.config import Settings

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# Offered in the size list where the server's limits allow them (the warm-up sizes first).
PRESET_SIZES = (
    "1024x1024", "1152x896", "896x1152", "1280x720", "720x1280", "1344x768", "768x1344",
    "768x768", "512x512", "256x256",
)  # fmt: skip

router = APIRouter(include_in_schema=False)


def offered_sizes(settings: Settings) -> list[str]:
    sizes: list[str] = []
    for size in [*settings.warmup_sizes, settings.default_size, *PRESET_SIZES]:
        try:
            width, height = settings.check_size(size)
        except ValueError:
            continue
        if f"{width}x{height}" not in sizes:
            sizes.append(f"{width}x{height}")
    return sizes


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/config")
async def playground_config(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    return {
        "model": settings.served_model_names[0],
        "sizes": offered_sizes(settings),
        "default_size": settings.default_size,
        "default_steps": settings.default_steps,
        "max_steps": settings.max_steps,
        "max_n": settings.max_n,
        "auth": settings.authenticated,
        # The adapters configured, each with its default scale (one that failed to load is
        # refused by the API with the reason, which the page shows).
        "adapters": [{"name": adapter.name, "scale": adapter.scale} for adapter in settings.loras],
    }


def _asset(name: str) -> Any:
    async def serve() -> FileResponse:
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)

    return serve


for _name in ASSETS:
    router.add_api_route(f"/playground/{_name}", _asset(_name), methods=["GET"])
