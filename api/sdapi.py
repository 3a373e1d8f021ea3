"""AUTOMATIC1111's ``/sdapi/v1`` routes on the engine: field names, defaults and response shapes
as A1111 has them, so ``webuiapi``, Krita/Photoshop plug-ins and bots work unchanged.

Generation waits in the engine's one queue with the UI's jobs. Interrupt and skip reach only the
caller's own jobs when auth identifies users (A1111's global interrupt is a known complaint);
without auth every API caller is one anonymous owner, and browser sessions are never touched.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

import psutil
from fastapi import APIRouter, Depends, Query

from engine.infotext import PARAMETERS_KEY, parse_infotext
from engine.samplers import SCHEDULES, sampler_aliases, sampler_names

from .auth import owner_for, rate_limit, require_user
from .errors import ERROR_RESPONSES
from .images import decode_base64, open_image, png_base64, png_bytes
from .schemas import (ImageResponse, Img2ImgRequest, LoraItem, MemoryResponse, OptionsUpdate, PngInfoRequest,
                      PngInfoResponse, ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem,
                      Txt2ImgRequest, UpscalerItem)
from .service import ApiContext, find_model, generate

PREFIX = "/sdapi/v1"

# A1111 routes of features this server does not have: they answer what A1111 answers when none is
# installed, so clients that probe them on connect (webuiapi asks for /scripts) carry on.
_EMPTY_LISTS = ("sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "latent-upscale-modes",
                "extensions", "script-info", "realesrgan-models", "sd-modules")


def create_router(ctx: ApiContext) -> APIRouter:
    """The ``/sdapi/v1`` routes, all behind the server's credentials when auth is on."""
    user = require_user(ctx.credentials)
    router = APIRouter(prefix=PREFIX, tags=["sdapi"], dependencies=[Depends(user)], responses=ERROR_RESPONSES)
    _generation_routes(router, ctx, user, rate_limit(ctx.limiter, user))
    _listing_routes(router, ctx)
    _state_routes(router, ctx, user)
    return router


def _generation_routes(router: APIRouter, ctx: ApiContext, user: Any, limit: Any) -> None:
    @router.post("/txt2img", response_model=ImageResponse, summary="Text to image", dependencies=[Depends(limit)])
    async def txt2img(request: Txt2ImgRequest, username: Optional[str] = Depends(user)) -> ImageResponse:
        return (await generate(ctx, request, "txt2img", owner_for(username))).response()

    @router.post("/img2img", response_model=ImageResponse, summary="Image to image", dependencies=[Depends(limit)])
    async def img2img(request: Img2ImgRequest, username: Optional[str] = Depends(user)) -> ImageResponse:
        return (await generate(ctx, request, "img2img", owner_for(username))).response()

    @router.post("/png-info", response_model=PngInfoResponse, summary="Read the generation parameters of a PNG")
    def png_info(request: PngInfoRequest) -> PngInfoResponse:
        image = open_image(decode_base64(request.image, "image"), "image")
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        info = items.pop(PARAMETERS_KEY, "")
        return PngInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})


def _listing_routes(router: APIRouter, ctx: ApiContext) -> None:
    @router.get("/sd-models", response_model=list[SDModelItem], summary="Models in the registry")
    def sd_models() -> list[SDModelItem]:
        return [SDModelItem(title=m.id, model_name=m.id, filename=m.source, family=m.family,
                            resolutions=[str(s) for s in m.resolutions],
                            compiled=[str(s) for s in m.compiled_sizes()]) for m in ctx.engine.models()]

    @router.get("/loras", response_model=list[LoraItem], summary="LoRAs fused into registry models at compile time")
    def loras() -> list[LoraItem]:
        return [LoraItem(name=lora.name, alias=lora.name, path=lora.path, metadata=lora.metadata, scale=lora.scale,
                         models=list(lora.models), hash=lora.short_hash) for lora in ctx.engine.loras()]

    @router.get("/samplers", response_model=list[SamplerItem], summary="Samplers (A1111 names and aliases)")
    def samplers() -> list[SamplerItem]:
        return [SamplerItem(name=name, aliases=sampler_aliases(name)) for name in sampler_names()]

    @router.get("/schedulers", response_model=list[SchedulerItem], summary="Schedule types")
    def schedulers() -> list[SchedulerItem]:
        return [SchedulerItem(name="automatic", label="Automatic"),
                *(SchedulerItem(name=name, label=label, default_rho=7.0 if name == "karras" else -1)
                  for name, (_, label) in SCHEDULES.items())]

    @router.get("/upscalers", response_model=list[UpscalerItem], summary="Upscalers (none yet)")
    def upscalers() -> list[UpscalerItem]:
        return [UpscalerItem(name="None")]

    @router.get("/scripts", summary="A1111 scripts (none)")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @router.get("/embeddings", summary="Textual inversion embeddings (none)")
    def embeddings() -> dict[str, dict[str, Any]]:
        return {"loaded": {}, "skipped": {}}

    for name in _EMPTY_LISTS:
        router.add_api_route(f"/{name}", _empty_list, methods=["GET"], summary=f"{name} (none here)",
                             response_model=list[Any], name=f"list_{name.replace('-', '_')}")

    @router.get("/cmd-flags", summary="The server's settings")
    def cmd_flags() -> dict[str, Any]:
        return ctx.flags

    @router.get("/memory", response_model=MemoryResponse, summary="Host RAM, accelerator memory, warm pipelines")
    def memory() -> MemoryResponse:
        ram = psutil.virtual_memory()
        status = ctx.engine.status()
        cuda = status.get("cuda") or {"error": f"no CUDA device on the {status['backend']} backend"}
        return MemoryResponse(ram={"free": ram.available, "used": ram.total - ram.available, "total": ram.total,
                                   "process_rss": psutil.Process().memory_info().rss},
                              cuda=cuda, engine=status)


def _empty_list() -> list[Any]:
    return []


def _state_routes(router: APIRouter, ctx: ApiContext, user: Any) -> None:
    @router.get("/options", summary="Options (sd_model_checkpoint is the default model)")
    def get_options() -> dict[str, Any]:
        return {**ctx.options, "sd_model_checkpoint": ctx.engine.default_model, "sd_checkpoint_hash": None,
                "samples_format": "png", "outdir_samples": str(ctx.outputs.root)}

    @router.post("/options", summary="Set options; sd_model_checkpoint switches the default model and warms it")
    async def set_options(update: OptionsUpdate) -> dict[str, Any]:
        warnings = []
        if update.sd_model_checkpoint:
            model = find_model(ctx.engine, update.sd_model_checkpoint)
            await asyncio.to_thread(ctx.engine.load, model)
            ctx.engine.set_default_model(model)
        if update.model_extra:
            ctx.options.update(update.model_extra)
            warnings.append(f"stored but not used by this server: {', '.join(sorted(update.model_extra))}")
        return {"sd_model_checkpoint": ctx.engine.default_model, "warnings": warnings}

    @router.post("/refresh-checkpoints", summary="Re-read the model registry")
    async def refresh_checkpoints() -> dict[str, Any]:
        registry = await asyncio.to_thread(ctx.engine.reload_registry)
        return {"models": [spec.id for spec in registry.models]}

    @router.get("/progress", response_model=ProgressResponse, summary="Progress of the current job and the queue")
    def progress(skip_current_image: bool = Query(False), username: Optional[str] = Depends(user)) -> ProgressResponse:
        return _progress(ctx, owner_for(username) if ctx.credentials.enabled else None, not skip_current_image)

    @router.post("/interrupt", summary="Stop the caller's jobs at the next step")
    def interrupt(username: Optional[str] = Depends(user)) -> dict[str, Any]:
        return {"interrupted": ctx.engine.interrupt(owner_for(username))}

    @router.post("/skip", summary="Skip the image the caller's job is making")
    def skip(username: Optional[str] = Depends(user)) -> dict[str, Any]:
        return {"skipped": ctx.engine.skip(owner_for(username))}


def _progress(ctx: ApiContext, owner: Optional[str], with_image: bool = True) -> ProgressResponse:
    """The caller's first job when users are known (else the first running job) and the queue length;
    ``current_image``: its latest live preview (base64 PNG) unless the caller skips it."""
    queue = ctx.engine.queue()
    jobs = [job for job in (*queue.running, *queue.waiting) if owner is None or job.owner == owner]
    job = jobs[0] if jobs else None
    state = ProgressState(job_count=queue.job_count)
    if job is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=state)
    state.job, state.job_no, state.queue_position = job.id, job.number, job.position
    state.interrupted = job.interrupted
    state.job_timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.submitted))
    fraction, eta, image = 0.0, 0.0, None
    if job.progress is not None:
        p = job.progress
        state.sampling_step, state.sampling_steps, state.batch_requests = p.step, p.total_steps, p.batch
        fraction = p.fraction
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        if with_image and p.preview is not None:
            image = png_base64(png_bytes(p.preview))
    return ProgressResponse(progress=round(fraction, 4), eta_relative=round(eta, 3), state=state, current_image=image,
                            textinfo=f"{job.state}: {job.id}" + (f" (batch of {state.batch_requests})"
                                                                 if state.batch_requests > 1 else ""))
