"""Pydantic models of the HTTP API, with AUTOMATIC1111's field names and defaults.

The OpenAPI schema at ``/openapi.json`` is generated from these models; the SageMaker route reuses
them. Request models accept every field A1111 has (and unknown ones, reported back in
``warnings``); which of them change the image and cannot be honoured here is decided in
``api.service``, which answers 400 naming the field.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_IMAGES = 16  # batch_size * n_iter, as the engine allows per request
MAX_SEED = 2**32 - 1


class _NonFinite(str):
    """NaN or ±infinity from a request body, as its JSON spelling: FastAPI cannot write the float back."""


def _finite_only(value: Any) -> Any:
    """``value`` with NaN and ±infinity (JSON has neither, Python's parser reads ``NaN`` and
    ``Infinity`` anyway) replaced by ``_NonFinite`` text: "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NonFinite("NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))
    if isinstance(value, dict):
        return {key: _finite_only(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_only(item) for item in value]
    return value


class _Body(BaseModel):
    """A request body: a NaN or infinite number in a field is a 422 naming the field ("Input should
    be a finite number, got NaN"), never a value the engine sees or a 500 when FastAPI writes the
    error (its JSON encoder refuses NaN, so the offending input is kept as text). In a field this
    server does not know, it is kept as that text."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nan(cls, data: Any) -> Any:
        return _finite_only(data)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, _NonFinite):
            raise PydanticCustomError("finite_number", "Input should be a finite number, got {value}",
                                      {"value": str(value)})
        return value


class _Lenient(_Body):
    """Accepts fields it does not declare (``model_extra``), so A1111 clients never get a 422 for them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class GenerationFields(_Lenient):
    """Fields txt2img and img2img share (A1111's ``StableDiffusionProcessing`` API fields)."""

    prompt: str = Field("", description="What to draw. A1111 prompt syntax is passed through as text.")
    negative_prompt: str = Field("", description="What to avoid.")
    styles: list[str] = Field(default_factory=list, description="A1111 styles: not available here; must be empty.")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 draws a random seed; image i of the request uses seed + i.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Accepted; variation seeds need subseed_strength, which must be 0.")
    subseed_strength: float = Field(0.0, ge=0, le=1, description="Variation strength: not available here; must be 0.")
    seed_resize_from_h: int = Field(-1, ge=-1, description="Not available here; -1 or 0.")
    seed_resize_from_w: int = Field(-1, ge=-1, description="Not available here; -1 or 0.")
    sampler_name: Optional[str] = Field(None, description="A1111 sampler name or alias (see /sdapi/v1/samplers); default: the model's.")
    sampler_index: Optional[str] = Field(None, description="Legacy name of sampler_name (used when sampler_name is absent).")
    scheduler: Optional[str] = Field(None, description="A1111 schedule type: automatic (the sampler's own), karras or sgm_uniform (see /sdapi/v1/schedulers).")
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES, description="Images per batch (batch_size * n_iter images in all, at most 16).")
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of batches.")
    steps: Optional[int] = Field(None, ge=1, le=150, description="Sampling steps; default: the model's.")
    cfg_scale: Optional[float] = Field(None, ge=0, le=30, description="Classifier-free guidance scale (at most 1: no unconditional half, as few-step models use); default: the model's.")
    width: Optional[int] = Field(None, ge=64, le=2048, description="Default: the model's first compiled size. Fixed-shape backends accept compiled sizes only.")
    height: Optional[int] = Field(None, ge=64, le=2048, description="See width.")
    restore_faces: Optional[bool] = Field(None, description="Not available here; false or null.")
    tiling: Optional[bool] = Field(None, description="Not available here; false or null.")
    do_not_save_samples: bool = Field(False, description="With save_images, still do not save.")
    do_not_save_grid: bool = Field(False, description="Accepted; grids are never saved.")
    eta: Optional[float] = Field(None, description="Sampler eta: only null, 0 and 1 (the samplers' own values) are accepted.")
    denoising_strength: Optional[float] = Field(None, ge=0, le=1, description="img2img: how much to change the input (default 0.75). txt2img: used by hires fix only.")
    s_min_uncond: Optional[float] = Field(None, description="Not available here; 0 or null.")
    s_churn: Optional[float] = Field(None, description="Not available here; 0 or null.")
    s_tmax: Optional[float] = Field(None, description="Not available here; 0 or null.")
    s_tmin: Optional[float] = Field(None, description="Not available here; 0 or null.")
    s_noise: Optional[float] = Field(None, description="Not available here; 1 or null.")
    override_settings: Optional[dict[str, Any]] = Field(None, description="Per-request options; sd_model_checkpoint switches the model for this request.")
    override_settings_restore_afterwards: bool = Field(True, description="Accepted; overrides never outlive the request here.")
    refiner_checkpoint: Optional[str] = Field(None, description="Not available here; null.")
    refiner_switch_at: Optional[float] = Field(None, description="Not available here; null.")
    disable_extra_networks: bool = Field(False, description="Accepted; there are no extra networks yet.")
    comments: Optional[dict[str, Any]] = Field(None, description="Accepted and ignored.")
    script_name: Optional[str] = Field(None, description="A1111 scripts are not available here; null or empty.")
    script_args: list[Any] = Field(default_factory=list, description="Arguments of script_name.")
    send_images: bool = Field(True, description="Return the images in the response.")
    save_images: bool = Field(False, description="Also save the PNGs in the server's outputs directory.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="A1111 extensions are not available here; must be empty.")
    force_task_id: Optional[str] = Field(None, description="Accepted; progress reports the caller's own job.")
    infotext: Optional[str] = Field(None, description="Accepted and ignored (A1111 parses it into fields).")


class Txt2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = Field(False, description="Hires fix: generate at width x height, upscale, then img2img at the "
                                               "larger size with denoising_strength (default 0.7). On fixed-shape "
                                               "backends both sizes must be compiled.")
    firstphase_width: int = Field(0, description="Deprecated in A1111; accepted and ignored.")
    firstphase_height: int = Field(0, description="Deprecated in A1111; accepted and ignored.")
    hr_scale: float = Field(2.0, description="Hires fix: the second pass is this many times larger (1 to 4), "
                                             "unless hr_resize_x/y give its size.")
    hr_upscaler: Optional[str] = Field(None, description="Hires fix: Latent (default), Latent (nearest), Lanczos or "
                                                         "Nearest.")
    hr_second_pass_steps: int = Field(0, description="Hires fix: steps of the second pass (0: the same as steps).")
    hr_resize_x: int = Field(0, description="Hires fix: the second pass's width (0: from hr_scale).")
    hr_resize_y: int = Field(0, description="Hires fix: the second pass's height (0: from hr_scale).")
    hr_checkpoint_name: Optional[str] = Field(None, description="Not available here: must be null.")
    hr_sampler_name: Optional[str] = Field(None, description="Not available here: must be null.")
    hr_scheduler: Optional[str] = Field(None, description="Not available here: must be null or Automatic.")
    hr_prompt: str = Field("", description="Not available here: must be empty (the second pass uses the prompt).")
    hr_negative_prompt: str = Field("", description="Not available here: must be empty.")
    firstpass_image: Optional[str] = Field(None, description="Not available here: must be null.")


class Img2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/img2img``."""

    init_images: list[str] = Field(..., min_length=1, description="Base64 images (a data: URI prefix is allowed); image i of the request starts from init_images[i % len].")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill (3, latent upscale, is not available).")
    image_cfg_scale: Optional[float] = Field(None, description="instruct-pix2pix only; accepted and ignored.")
    mask: Optional[str] = Field(None, description="Inpainting: a base64 mask image the size of init_images[0], white where to repaint (an RGBA image's alpha counts); null: plain img2img.")
    mask_blur_x: int = Field(4, ge=0, le=64, description="Inpainting: mask blur in pixels (must equal mask_blur_y).")
    mask_blur_y: int = Field(4, ge=0, le=64, description="Inpainting: mask blur in pixels (must equal mask_blur_x).")
    mask_blur: Optional[int] = Field(None, ge=0, le=64, description="Inpainting: mask blur in pixels (sets both mask_blur_x and mask_blur_y).")
    mask_round: bool = Field(True, description="Inpainting: the latent mask is rounded (only true is available).")
    inpainting_fill: int = Field(0, ge=0, le=3, description="Inpainting, masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: Union[bool, int] = Field(True, description="Inpainting area: true (1) only masked (the region around the mask at the request's size, pasted back), false (0) whole picture.")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256, description="Inpainting, only masked: pixels around the mask's region.")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="Inpainting: 1 repaints the black (unmasked) area instead.")
    initial_noise_multiplier: Optional[float] = Field(None, description="Only null or 1.")
    latent_mask: Optional[str] = Field(None, description="Not available here: must be null (the mask serves both).")
    include_init_images: bool = Field(False, description="Echo init_images in the response's parameters.")


class ErrorResponse(BaseModel):
    """Every refusal: ``detail`` says what to change (422s list the fields, as FastAPI does)."""

    detail: Any


class ImageResponse(BaseModel):
    """What txt2img and img2img (and ``/invocations`` with ``Accept: application/json``) return."""

    images: list[str] = Field(description="Base64 PNGs, each with its A1111 'parameters' text chunk.")
    parameters: dict[str, Any] = Field(description="The request as received.")
    info: str = Field(description="A JSON string: seed, all_seeds, prompt, sampler_name, steps, cfg_scale, infotexts, ...")
    warnings: list[str] = Field(default_factory=list, description="Fields accepted but not used, and why.")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any] = Field(default_factory=dict)


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str = Field(description="What sd_model_checkpoint takes (the registry id).")
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str = Field(description="Where the weights come from (hub id, directory or file).")
    config: Optional[str] = None
    family: str
    resolutions: list[str] = Field(description="Sizes listed in the registry.")
    compiled: list[str] = Field(description="Sizes this backend can generate now.")


class LoraItem(BaseModel):
    """A1111's ``/sdapi/v1/loras`` item (name, alias, path, metadata), plus where it is fused."""

    name: str = Field(description="What <lora:name:weight> in a prompt calls it.")
    alias: str
    path: str = Field(description="The .safetensors file.")
    metadata: dict[str, str] = Field(default_factory=dict, description="The file's safetensors metadata.")
    scale: float = Field(description="The weight it is fused at: write <lora:name:scale>.")
    models: list[str] = Field(description="The models it is fused into at this scale.")
    hash: str = Field(description="A1111's short hash (the 'Lora hashes' infotext value).")


class UpscalerItem(BaseModel):
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = Field(0, description="Jobs running and waiting in the engine's queue.")
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_position: int = Field(0, description="The caller's job: 0 running (or none), n waiting behind n-1 others.")
    batch_requests: int = Field(0, description="Requests sharing the reported job's device call (1: alone).")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the reported job.")
    eta_relative: float = Field(description="Seconds left for the reported job (estimate).")
    state: ProgressState
    current_image: Optional[str] = Field(None, description="Live preview of the job's current image (base64 PNG, the "
                                         "cheap latent approximation, every --preview-every steps); null before the first "
                                         "preview, when previews are off or with skip_current_image=true.")
    textinfo: Optional[str] = None


class PngInfoRequest(_Body):
    image: str = Field(description="A base64 PNG (a data: URI prefix is allowed).")


class PngInfoResponse(BaseModel):
    info: str = Field(description="The 'parameters' text chunk ('' when there is none).")
    items: dict[str, Any] = Field(description="The PNG's other text chunks.")
    parameters: dict[str, Any] = Field(description="'info' parsed into fields (A1111 infotext keys).")


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]
    engine: dict[str, Any] = Field(description="Backend, warm pipelines and, on Neuron, the NeuronCores.")


class OptionsUpdate(_Lenient):
    """``POST /sdapi/v1/options``: ``sd_model_checkpoint`` switches (and warms) the default model;
    other A1111 options are stored and echoed by GET but do not change generation."""

    sd_model_checkpoint: Optional[str] = None


class InvocationRequest(_Lenient):
    """``POST /invocations`` (SageMaker). Takes the body of seed 001 (``{"prompt", "parameters"}``),
    the Stable Diffusion Quick Kit's (prompt, negative_prompt, steps, sampler, seed, height, width,
    count, input_image) and any txt2img/img2img field, at the top level or in ``parameters``."""

    prompt: str = ""
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    sampler: Optional[str] = Field(None, description="Sampler name or alias such as euler_a.")
    seed: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    count: Optional[int] = Field(None, ge=1, le=MAX_IMAGES, description="Number of images.")
    input_image: Optional[str] = Field(None, description="img2img input: base64 (or an http(s) URL with --allow-image-urls).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="More fields: A1111 names or diffusers names "
                                       "(num_inference_steps, guidance_scale, num_images_per_prompt, strength).")
