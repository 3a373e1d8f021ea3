"""The SageMaker hosting contract: ``GET /ping`` and ``POST /invocations`` (seeds 001 and 003).

``/ping`` answers 200 once the default model is warm (SageMaker routes traffic only then) and 503
while it loads or when it failed, with the reason. ``/invocations`` takes the JSON bodies of the
reference articles and any A1111 field, runs it through the same service and queue as
``/sdapi/v1``, and answers with the PNG bytes (``Accept: image/png``, the default for one image)
or the txt2img JSON (``Accept: application/json``).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .auth import owner_for, rate_limit, require_user
from .errors import ERROR_RESPONSES
from .images import FieldError, is_url
from .schemas import ImageResponse, Img2ImgRequest, InvocationRequest, Txt2ImgRequest
from .service import ApiContext, generate

# Names other clients use for A1111 fields: diffusers' pipeline arguments and the Quick Kit's.
_ALIASES = {
    "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size",
    "count": "batch_size", "strength": "denoising_strength", "sampler": "sampler_name",
}
_TOP_LEVEL = ("prompt", "negative_prompt", "steps", "sampler", "seed", "height", "width", "count")


def create_router(ctx: ApiContext) -> APIRouter:
    user = require_user(ctx.credentials)
    router = APIRouter(tags=["sagemaker"], responses=ERROR_RESPONSES)

    @router.get("/ping", summary="Health check: 200 once the default model is warm, else 503",
                responses={503: {"description": "still loading the default model, or it failed (see detail)"}})
    def ping() -> JSONResponse:
        model = ctx.engine.default_model
        if ctx.engine.is_warm(model):
            return JSONResponse({"status": "ready", "model": model})
        if ctx.startup_error:
            return JSONResponse({"status": "failed", "model": model, "detail": ctx.startup_error}, status_code=503)
        return JSONResponse({"status": "loading", "model": model}, status_code=503)

    @router.post("/invocations", summary="SageMaker inference: txt2img, or img2img with input_image",
                 response_model=ImageResponse,
                 responses={200: {"content": {"image/png": {}}, "description": "PNG bytes (Accept: image/png) or JSON"},
                            406: {"description": "the Accept header asks for a type this route cannot give"}},
                 dependencies=[Depends(rate_limit(ctx.limiter, user))])
    async def invocations(body: InvocationRequest, accept: Optional[str] = Header(None),
                          username: Optional[str] = Depends(user)) -> Response:
        request = to_a1111(body, ctx.allow_image_urls)
        mode = "img2img" if isinstance(request, Img2ImgRequest) else "txt2img"
        generation = await generate(ctx, request, mode, owner_for(username))
        kind = response_kind(accept, len(generation.images))
        if kind == "image/png":
            return Response(generation.images[0].png, media_type="image/png")
        return JSONResponse(generation.response().model_dump())

    return router


def to_a1111(body: InvocationRequest, allow_urls: bool) -> Union[Txt2ImgRequest, Img2ImgRequest]:
    """An invocation body as an A1111 request: ``parameters`` first, top-level fields over them."""
    fields: dict[str, Any] = {_ALIASES.get(k, k): v for k, v in body.parameters.items()}
    fields.update({_ALIASES.get(k, k): v for k, v in (body.model_extra or {}).items()})
    fields.update({_ALIASES.get(k, k): getattr(body, k) for k in _TOP_LEVEL if getattr(body, k) is not None})
    input_image = body.input_image or fields.pop("input_image", None)
    if input_image is not None:
        if is_url(input_image) and not allow_urls:
            raise FieldError("input_image", "image URLs are not fetched by this server; send the image "
                                            "base64-encoded, or start the server with --allow-image-urls", status=400)
        fields["init_images"] = [input_image]
    model = Img2ImgRequest if "init_images" in fields else Txt2ImgRequest
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None


def response_kind(accept: Optional[str], images: int) -> str:
    """``image/png`` or ``application/json`` from the Accept header; exactly one image defaults to
    PNG, anything else to JSON; 406 when the header allows neither."""
    accepted = [part.split(";")[0].strip().lower() for part in (accept or "*/*").split(",")]
    json_ok = any(kind in accepted for kind in ("application/json", "application/*", "*/*"))
    png_ok = any(kind in accepted for kind in ("image/png", "image/*", "*/*"))
    prefers_json = "application/json" in accepted and (
        "image/png" not in accepted or accepted.index("application/json") < accepted.index("image/png"))
    if images == 1 and png_ok and not prefers_json:
        return "image/png"
    if json_ok:
        return "application/json"
    why = (f"{images} images cannot be sent as one image/png" if png_ok
           else f"cannot answer with {accept!r}")
    raise FieldError("accept", f"{why}; send Accept: application/json", status=406)
