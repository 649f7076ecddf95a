"""``POST /v1/images/edits``: OpenAI's multipart form, read within bounds, into the checked
request a generation makes plus what the edit starts from.

Bounds, each a 400 (or 413) in the OpenAI error shape before anything is queued: the body's
size (``max_edit_body_bytes``, checked by the middleware), one image and at most one mask, the
known fields only and each under ``MAX_FIELD_BYTES``, an image's pixels from its header before
it is decoded (``max_upload_pixels``: a small file can hold a huge image), PNG, JPEG or WebP
only, and a mask of the image's own size that marks something to repaint. A body that never
ends is cut by the server's read timeout (``request_read_timeout_s``).
"""

from __future__ import annotations

import asyncio
import io
import json
import warnings
from typing import Any

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from zimage_server.core.config import SIZE_MULTIPLE, Settings
from zimage_server.core.errors import APIError, bad_request, describe_validation_error
from zimage_server.engine.engine import EditInput
from zimage_server.http.protocol import ImageGenerationRequest

IMAGE_FIELDS = ("image", "image[]")  # the openai client sends a list of images as image[]
MASK_FIELD = "mask"
MAX_FIELD_BYTES = 64 * 1024  # a text field (the prompt's 4000 characters are at most 16 KB)
FORMATS = ("PNG", "JPEG", "WEBP")
INPAINT_STRENGTH = 1.0  # inpainting redraws the masked area whole unless a request says otherwise


class EditForm(BaseModel):
    """The form's text fields, read as form values are (``"2"`` is 2, ``"true"`` is true)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    stream: bool | None = None
    partial_images: int | None = None
    stream_progress: bool | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    strength: float | None = None
    quality: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    input_fidelity: str | None = None  # OpenAI's; this model keeps what the mask leaves


class EditUpload:
    """The form's parts: its text fields and the bytes of its image and mask."""

    def __init__(self, fields: dict[str, str], image: bytes, mask: bytes | None) -> None:
        self.fields = fields
        self.image = image
        self.mask = mask


async def read_upload(request: Request) -> EditUpload:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request(
            "an edit is a multipart/form-data body with the image as a file (curl -F image=@in.png "
            "-F prompt=...), as OpenAI's images API takes it",
            code="invalid_body",
        )
    fields_allowed = len(EditForm.model_fields) + 2
    try:
        form = await request.form(max_files=2, max_fields=fields_allowed, max_part_size=MAX_FIELD_BYTES)
    except APIError:
        raise
    except Exception as exc:  # starlette's MultiPartException, or a body cut short
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise bad_request(f"the multipart body cannot be read: {detail}", code="invalid_body") from None
    try:
        fields: dict[str, str] = {}
        images: list[bytes] = []
        mask = None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name in IMAGE_FIELDS:
                    images.append(await value.read())
                elif name == MASK_FIELD and mask is None:
                    mask = await value.read()
                else:
                    raise bad_request(
                        f"'{name}' is a file; only 'image' and one 'mask' are",
                        param=name,
                        code="unknown_parameter",
                    )
            elif name in IMAGE_FIELDS or name == MASK_FIELD:
                raise bad_request(f"'{name}' must be a file, not a text field", param=name)
            elif name in fields:
                raise bad_request(f"'{name}' is given twice", param=name)
            else:
                fields[name] = value
    finally:
        await form.close()
    if not images:
        raise bad_request("'image' is required: the image to edit, as a file", param="image",
                          code="missing_required_parameter")  # fmt: skip
    if len(images) > 1:
        raise bad_request(
            f"{len(images)} images were sent; this server edits one image per request", param="image"
        )
    return EditUpload(fields, images[0], mask)


def request_from(fields: dict[str, str]) -> tuple[ImageGenerationRequest, float | None]:
    """The fields as the request a generation makes, and the strength asked for."""
    try:
        form = EditForm.model_validate(fields)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None
    values = form.model_dump(exclude_none=True, exclude={"strength", "input_fidelity"})
    try:
        return ImageGenerationRequest.model_validate(values), form.strength
    except ValidationError as exc:
        raise describe_validation_error(exc) from None


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """The upload decoded, its size checked from its header first; a 400 for anything else."""
    if not data:
        raise bad_request(f"'{param}' is an empty file", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise bad_request(
                    f"'{param}' is {image.format or 'an unknown format'}; send PNG, JPEG or WebP", param=param
                )
            width, height = image.size
            if width * height > max_pixels:
                raise bad_request(
                    f"'{param}' is {width}x{height} ({width * height} pixels); the limit is {max_pixels} "
                    "pixels (max_upload_pixels): send a smaller image",
                    param=param,
                )
            image.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        message = (
            f"'{param}' has more pixels than Pillow will open; the limit is {max_pixels} pixels "
            "(max_upload_pixels): send a smaller image"
        )
        raise bad_request(message, param=param) from None
    except UnidentifiedImageError:
        raise bad_request(
            f"'{param}' is not an image this server reads; send PNG, JPEG or WebP", param=param
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_request(
            f"'{param}' cannot be decoded ({exc}); send a whole PNG, JPEG or WebP file", param=param
        ) from None
    return image


def repaint_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask as a mode-L mask, 255 where the image is repainted: where the mask is
    transparent (its alpha below half), or, for a mask without alpha, where it is white."""
    if mask.size != size:
        raise bad_request(
            f"the mask is {mask.size[0]}x{mask.size[1]} and the image {size[0]}x{size[1]}; they must match",
            param="mask",
        )
    has_alpha = mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info)
    if has_alpha:
        marked = mask.convert("RGBA").getchannel("A").point(lambda a: 255 if a < 128 else 0)
    else:
        marked = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if marked.getbbox() is None:
        raise bad_request(
            "the mask marks nothing to edit: make the area to edit transparent (alpha 0), or white in a "
            "mask without alpha",
            param="mask",
        )
    return marked


def auto_size(width: int, height: int, settings: Settings) -> str:
    """The output size for ``size: auto``: the image's, within the server's sides, in
    multiples of 16, its aspect kept as nearly as those allow."""
    scale = min(1.0, settings.max_size / max(width, height))

    def side(value: int) -> int:
        rounded = round(value * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return max(settings.min_size, min(settings.max_size, rounded))

    return f"{side(width)}x{side(height)}"


async def edit_request(request: Request, settings: Settings) -> tuple[ImageGenerationRequest, EditInput]:
    """Read, decode and check an edit; the request (its size resolved) and the edit's start."""
    if settings.sequence_parallel > 1:
        raise bad_request(
            "this replica makes each image across GPUs (sequence_parallel), which serves generations "
            "only; send edits to a replica with sequence_parallel 1",
            code="unsupported_value",
        )
    upload = await read_upload(request)
    req, strength = request_from(upload.fields)
    image = await asyncio.to_thread(decode_image, upload.image, "image", settings.max_upload_pixels)
    mask = None
    if upload.mask is not None:
        decoded = await asyncio.to_thread(decode_image, upload.mask, "mask", settings.max_upload_pixels)
        mask = repaint_mask(decoded, image.size)
    if req.size in (None, "auto"):
        req = req.model_copy(update={"size": auto_size(*image.size, settings)})
    kind = "inpaint" if mask is not None else "img2img"
    if strength is None:
        strength = INPAINT_STRENGTH if mask is not None else settings.edit_strength
    if not 0 < strength <= 1:
        raise bad_request(f"'strength' must be above 0 and at most 1, got {strength:g}", param="strength")
    return req, EditInput(kind, strength, image, mask)


def start_images(edit: EditInput, width: int, height: int) -> EditInput:
    """The edit's image (and mask) at the output size, as the pipeline takes them."""
    image = edit.image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    mask = edit.mask
    if mask is not None and mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    return EditInput(edit.kind, edit.strength, image, mask)


def form_schema() -> dict[str, Any]:
    """The route's body in the published document: the multipart form, its files binary (the
    text fields' schemas are the generation's, written in with the server's limits by
    ``openapi.openapi_document``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "prompt"],
                        "properties": {},
                        "additionalProperties": False,
                    },
                    "encoding": {
                        "image": {"contentType": "image/png, image/jpeg, image/webp"},
                        "mask": {"contentType": "image/png"},
                    },
                }
            },
        }
    }


def publish_form(form: dict[str, Any], generation: dict[str, Any]) -> None:
    """The edit form's fields in ``form`` (its schema): the generation's own (``generation``,
    with the server's limits; not ``lora``, a JSON list: an edit names an adapter as its
    ``model``), the two files and ``strength``."""
    properties = {
        name: _present(schema)
        for name, schema in generation["properties"].items()
        if name in EditForm.model_fields
    }
    properties["image"] = {
        "type": "string",
        "format": "binary",
        "description": "The image to edit: PNG, JPEG or WebP, at most max_upload_pixels pixels",
    }
    properties["mask"] = {
        "type": "string",
        "format": "binary",
        "description": "Where to repaint: transparent (alpha 0), or white in a mask without alpha; the "
        "image's size. Without a mask the whole image is redrawn at 'strength'",
    }
    properties["strength"] = {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "How much of the image is redrawn: the share of the steps that run (default "
        "edit_strength, 0.6; 1.0 with a mask)",
    }
    form["properties"] = properties
    if "allOf" in generation:  # partial_images and stream_progress only with stream
        form["allOf"] = json.loads(
            json.dumps(generation["allOf"]).replace('"const": true', '"const": "true"')
        )


def _present(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON field's schema for a form field, which is there or not but never null, and whose
    true and false are the words."""
    choices = [choice for choice in schema.get("anyOf", []) if choice.get("type") != "null"]
    if len(choices) == 1:
        rest = {key: value for key, value in schema.items() if key != "anyOf"}
        schema = {**choices[0], **rest}
    if schema.get("type") == "boolean":
        schema = {**schema, "type": "string", "enum": ["true", "false"]}
    return schema
