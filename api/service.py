"""A1111 requests → engine jobs → A1111 responses; shared by ``/sdapi/v1`` and ``/invocations``.

``generate`` checks the fields this server cannot honour (400 naming the field), turns the
request into engine ``GenerateRequest``s — one per A1111 batch (``n_iter``), or per image when
several init images are given — submits them all to the engine's queue, waits without holding a
thread, and builds the A1111 response: base64 PNGs with their infotext, the request echoed as
``parameters`` and ``info`` as a JSON string.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from engine import (Cancelled, Engine, GeneratedImage, GenerateRequest, GenerateResult, HiresFix, InvalidRequest,
                    ModelInfo, OutputStore, RateLimiter, Size, UnknownModel)
from engine.samplers import canonical_sampler
from engine.types import INPAINT_FILLS, RESIZE_MODES, Inpaint

from .auth import Credentials
from .images import FieldError, image_from_field, png_base64
from .schemas import MAX_IMAGES, MAX_SEED, GenerationFields, ImageResponse


@dataclass
class ApiContext:
    """What every route needs, built once by ``api.create_api``."""

    engine: Engine
    outputs: OutputStore
    credentials: Credentials = field(default_factory=Credentials)
    allow_image_urls: bool = False
    flags: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options set by clients (echoed by GET)
    startup_error: Optional[str] = None  # why the default model could not be warmed (for /ping)
    limiter: Optional[RateLimiter] = None  # --rate-limit: generation requests a minute per client


# Fields that would change the image and that this server cannot do: (field, is it asked for?, why).
_NOT_AVAILABLE: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("styles", bool, "prompt styles are not available here; put the style's words in the prompt"),
    ("subseed_strength", lambda v: v > 0, "variation seeds are not available here; send 0"),
    ("seed_resize_from_w", lambda v: v > 0, "seed resize is not available here; send -1"),
    ("seed_resize_from_h", lambda v: v > 0, "seed resize is not available here; send -1"),
    ("restore_faces", bool, "face restoration is not available here; send false"),
    ("tiling", bool, "tiling is not available here; send false"),
    ("eta", lambda v: v not in (None, 0, 1), "only the samplers' own eta (null, 0 or 1) is available here"),
    ("s_min_uncond", lambda v: v not in (None, 0), "not available here; send 0"),
    ("s_churn", lambda v: v not in (None, 0), "not available here; send 0"),
    ("s_tmin", lambda v: v not in (None, 0), "not available here; send 0"),
    ("s_tmax", lambda v: v not in (None, 0), "not available here; send 0"),
    ("s_noise", lambda v: v not in (None, 1), "not available here; send 1"),
    ("refiner_checkpoint", bool, "the SDXL refiner is not available here; send null"),
    ("script_name", bool, "A1111 scripts are not available here; send null"),
    ("alwayson_scripts", bool, "A1111 extensions (ControlNet, ADetailer, ...) are not available here; send {}"),
    ("hr_checkpoint_name", bool, "a different model for the hires pass is not available here; send null"),
    ("hr_sampler_name", bool, "a different sampler for the hires pass is not available here; send null"),
    ("hr_scheduler", lambda v: (v or "automatic").lower() != "automatic", "not available here; send null"),
    ("hr_prompt", bool, "a different prompt for the hires pass is not available here; send \"\""),
    ("hr_negative_prompt", bool, "a different negative prompt for the hires pass is not available here; send \"\""),
    ("firstpass_image", bool, "a given first pass is not available here; send null"),
    ("latent_mask", bool, "a separate latent mask is not available here; send null (the mask serves both)"),
    ("mask_round", lambda v: v is False, "an unrounded latent mask is not available here; send true"),
    ("resize_mode", lambda v: v == 3, "3 (just resize, latent upscale) is not available here; use 0, 1 or 2"),
    ("initial_noise_multiplier", lambda v: v not in (None, 1), "not available here; send 1"),
)

# override_settings / options that change the image: the values that mean "as usual".
_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (None, 1),
    "sd_vae": (None, "", "Automatic", "None"),
    "samples_format": (None, "png"),
}


@dataclass
class Generation:
    """The outcome of one API generation request."""

    request: GenerationFields
    mode: str
    images: list[GeneratedImage]
    results: list[GenerateResult]
    parts: list[GenerateRequest]
    warnings: list[str]
    backend: str = ""
    interrupted: bool = False
    started: float = field(default_factory=time.time)

    def response(self) -> ImageResponse:
        images = [png_base64(image.png) for image in self.images] if self.request.send_images else []
        return ImageResponse(images=images, parameters=_echo(self.request), info=json.dumps(self.info()),
                             warnings=self.warnings)

    def info(self) -> dict[str, Any]:
        """A1111's ``Processed.js()`` fields (plus ``backend`` and ``interrupted``)."""
        first = self.results[0] if self.results else None
        part = self.parts[0]
        seeds = [image.seed for image in self.images]
        size = first.size if first else part.size
        count = len(self.images)
        return {
            "prompt": part.prompt, "all_prompts": [part.prompt] * count,
            "negative_prompt": part.negative_prompt, "all_negative_prompts": [part.negative_prompt] * count,
            "seed": seeds[0] if seeds else part.seed, "all_seeds": seeds,
            "subseed": seeds[0] if seeds else part.seed, "all_subseeds": seeds, "subseed_strength": 0,
            "width": size.width if size else None, "height": size.height if size else None,
            "sampler_name": first.sampler if first else part.sampler,
            "scheduler": "Automatic",
            "cfg_scale": first.cfg_scale if first else part.cfg_scale,
            "steps": first.steps if first else part.steps,
            "batch_size": self.request.batch_size,
            "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": first.model if first else part.model, "sd_model_hash": None,
            "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": (part.strength if self.mode == "img2img"
                                   else part.hires.strength if part.hires is not None else None),
            "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": [image.infotext for image in self.images],
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(self.started)),
            "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "backend": self.backend,
            "interrupted": self.interrupted,
            "batch_requests": max((r.batch_requests for r in self.results), default=1),
            "version": "sdserve",
        }


def _echo(request: GenerationFields) -> dict[str, Any]:
    """The request as A1111 echoes it: init images only with ``include_init_images``."""
    echoed = request.model_dump()
    if "init_images" in echoed and not echoed.get("include_init_images"):
        echoed["init_images"] = None
    return echoed


def find_model(engine: Engine, name: str) -> str:
    """A registry id from what A1111 clients send as ``sd_model_checkpoint``: the id or the model's
    display title, any case, with A1111's " [hash]" suffix and a checkpoint file extension tolerated
    ("deliberate.safetensors [9aba26abdf]" finds ``deliberate``)."""
    wanted = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", name.strip())
    wanted = re.sub(r"\.(safetensors|ckpt)$", "", wanted, flags=re.IGNORECASE).lower()
    for info in engine.models():
        if wanted in (info.id.lower(), info.title.lower()):
            return info.id
    known = ", ".join(info.id for info in engine.models())
    raise UnknownModel(f"model {name!r} not found; GET /sdapi/v1/sd-models lists them ({known})")


def check_available(request: GenerationFields) -> None:
    """400 naming the first field that asks for something this server cannot do."""
    for name, asked_for, why in _NOT_AVAILABLE:
        if name in type(request).model_fields and asked_for(getattr(request, name)):
            raise FieldError(name, why, status=400)
    for key, value in (request.override_settings or {}).items():
        if key in _NEUTRAL_OPTIONS and value not in _NEUTRAL_OPTIONS[key]:
            raise FieldError(f"override_settings.{key}", f"{value!r} is not available here", status=400)


def collect_warnings(request: GenerationFields) -> list[str]:
    """Fields accepted and not used: unknown ones and per-request options other than the model."""
    warnings = []
    if request.model_extra:
        warnings.append(f"ignored fields this server does not know: {', '.join(sorted(request.model_extra))}")
    ignored = sorted(k for k in (request.override_settings or {}) if k != "sd_model_checkpoint"
                     and k not in _NEUTRAL_OPTIONS)
    if ignored:
        warnings.append(f"ignored override_settings: {', '.join(ignored)}")
    return warnings


def model_of(ctx: ApiContext, request: GenerationFields) -> ModelInfo:
    checkpoint = (request.override_settings or {}).get("sd_model_checkpoint")
    model_id = find_model(ctx.engine, str(checkpoint)) if checkpoint else ctx.engine.default_model
    return next(info for info in ctx.engine.models() if info.id == model_id)


def plan_requests(ctx: ApiContext, request: GenerationFields, mode: str) -> list[GenerateRequest]:
    """The engine requests of an A1111 request: one per batch (``n_iter``), with seeds
    ``seed + i`` for image ``i`` as A1111 numbers them; one per image when several init images."""
    check_available(request)
    model = model_of(ctx, request)
    if request.batch_size * request.n_iter > MAX_IMAGES:
        raise FieldError("n_iter", f"batch_size * n_iter is {request.batch_size * request.n_iter}; "
                                   f"at most {MAX_IMAGES} images a request")
    sampler_name = request.sampler_name or request.sampler_index
    if sampler_name or (request.scheduler or "automatic").lower() != "automatic":
        sampler = canonical_sampler(sampler_name or model.defaults.sampler, request.scheduler or "automatic")
    else:
        sampler = None
    size = None
    if request.width is not None or request.height is not None:
        default = model.resolutions[0]
        size = Size(request.width or default.width, request.height or default.height)
    seed = random.SystemRandom().randrange(MAX_SEED - MAX_IMAGES) if request.seed == -1 else request.seed
    base = GenerateRequest(model=model.id, prompt=request.prompt, negative_prompt=request.negative_prompt,
                           sampler=sampler, steps=request.steps, cfg_scale=request.cfg_scale, seed=seed,
                           size=size, num_images=request.batch_size)
    if mode == "txt2img":
        base = replace(base, hires=hires_of(request))
        return [replace(base, seed=seed + i * request.batch_size) for i in range(request.n_iter)]
    return _img2img_parts(ctx, request, base)


def hires_of(request: Any) -> Optional[HiresFix]:
    """A1111's hires fields (``enable_hr``, ``hr_scale`` or ``hr_resize_x/y``, ``hr_upscaler``,
    ``hr_second_pass_steps``, ``denoising_strength``) as the engine's ``HiresFix``."""
    if not request.enable_hr:
        return None
    size = None
    if request.hr_resize_x or request.hr_resize_y:
        width, height = request.width or 0, request.height or 0  # a missing one follows the aspect ratio
        x = request.hr_resize_x or (request.hr_resize_y * width // height if height else request.hr_resize_y)
        y = request.hr_resize_y or (request.hr_resize_x * height // width if width else request.hr_resize_x)
        size = Size(x, y)
    strength = HiresFix.strength if request.denoising_strength is None else request.denoising_strength
    return HiresFix(scale=request.hr_scale, upscaler=request.hr_upscaler or "Latent",
                    steps=request.hr_second_pass_steps or None, strength=strength, size=size)


def _img2img_parts(ctx: ApiContext, request: Any, base: GenerateRequest) -> list[GenerateRequest]:
    images = [image_from_field(text, f"init_images[{i}]", ctx.allow_image_urls)
              for i, text in enumerate(request.init_images)]
    strength = 0.75 if request.denoising_strength is None else request.denoising_strength
    base = replace(base, strength=strength, resize_mode=RESIZE_MODES[request.resize_mode],
                   inpaint=inpaint_of(ctx, request))
    if len(images) == 1:
        return [replace(base, init_image=images[0], seed=base.seed + i * request.batch_size)
                for i in range(request.n_iter)]
    total = request.batch_size * request.n_iter
    return [replace(base, init_image=images[i % len(images)], seed=base.seed + i, num_images=1) for i in range(total)]


def inpaint_of(ctx: ApiContext, request: Any) -> Optional[Inpaint]:
    """A1111's inpaint fields (``mask``, ``mask_blur``, ``inpainting_fill``, ``inpaint_full_res``,
    ``inpaint_full_res_padding``, ``inpainting_mask_invert``) as the engine's ``Inpaint``."""
    if not request.mask:
        return None
    blur = request.mask_blur
    if blur is None:
        if request.mask_blur_x != request.mask_blur_y:
            raise InvalidRequest(f"mask_blur_x {request.mask_blur_x} and mask_blur_y {request.mask_blur_y} differ: "
                                 "one blur for both directions is available here; send mask_blur")
        blur = request.mask_blur_x
    return Inpaint(image_from_field(request.mask, "mask", ctx.allow_image_urls), blur=blur,
                   fill=INPAINT_FILLS[request.inpainting_fill], only_masked=bool(request.inpaint_full_res),
                   padding=request.inpaint_full_res_padding, invert=bool(request.inpainting_mask_invert))


async def generate(ctx: ApiContext, request: GenerationFields, mode: str, owner: str) -> Generation:
    """Run an A1111 txt2img/img2img request through the engine's queue; an interrupt returns the
    images finished before it (as A1111 does)."""
    parts = plan_requests(ctx, request, mode)
    jobs = [ctx.engine.submit(part, owner=owner) for part in parts]
    generation = Generation(request, mode, [], [], parts, collect_warnings(request), ctx.engine.backend.name)
    save = request.save_images and not request.do_not_save_samples
    try:
        for job in jobs:
            try:
                result = await asyncio.wrap_future(job.future)
                generation.results.append(result)
                images = result.images
            except Cancelled as exc:
                generation.interrupted = True
                images = exc.images
            generation.images.extend(images)
            for image in images if save else ():  # saved as each part finishes: a crash loses no finished image
                ctx.outputs.save(mode, image)
    except BaseException:  # a failed part (or a dropped connection) stops the request's other parts
        for job in jobs:
            job.interrupt()
        raise
    generation.warnings.extend(dict.fromkeys(n for r in generation.results for n in r.notices))
    if generation.interrupted:
        generation.warnings.append(f"interrupted: {len(generation.images)} of "
                                   f"{request.batch_size * request.n_iter} images were finished")
    return generation
