"""Request resolution: a ``GenerateRequest`` checked and completed into what a device worker runs.

Every check happens here, before a job is queued, so a bad request is refused at once with a
message that says what to change, and never reaches a device worker.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PIL import Image

from . import artifacts
from .backends.base import Backend
from .compile import expected_fingerprint
from .errors import InvalidRequest, UnsupportedResolution
from .families import FAMILIES
from .hires import HiresPlan
from .hires import plan_hires as plan_hires_fix
from .inpaint import InpaintInputs, check_inpaint, prepare
from .lora import select_variant
from .prompt_embeds import CHUNKED_FAMILIES, chunks_to_run, prompt_chunks_needed, prompt_notices
from .prompts import lora_tags
from .registry import ModelSpec, Registry
from .samplers import check_sampler_for, check_steps_for, sampler_max_steps
from .types import GenerateRequest, Size

MAX_STEPS = 150
MAX_IMAGES = 16
MAX_SEED = 2**32 - 1
EAGER_MAX_SIDE = 2048


@dataclass(frozen=True)
class Resolved:
    """A request's validated values: the model (its LoRA variant), sampler, steps, CFG, size, seed."""

    spec: ModelSpec
    sampler: str
    steps: int
    cfg_scale: float
    size: Size
    seed: int
    hires: Optional[HiresPlan] = None
    inpaint: Optional[InpaintInputs] = None  # the image and mask an inpaint request's pipeline reads
    prompt_chunks: int = 1  # 75-token chunks the text is encoded in (a compiled UNet prompt length)
    notices: tuple[str, ...] = ()  # the words of a too-long prompt that are not read, and how to fix it


@dataclass(frozen=True)
class Resolver:
    """Resolves requests against one registry on one backend (fixed-shape backends: compiled sizes)."""

    registry: Registry
    backend: Backend
    tokenizer_of: Optional[Callable[[ModelSpec], Any]] = None  # counts prompt chunks (None: one chunk)

    def resolve(self, request: GenerateRequest, default_model: str) -> Resolved:
        """``request`` checked and completed with the model's defaults (``default_model`` when it names
        none); raises EngineError subclasses that say what to change."""
        check_fields(request)
        spec = self.registry.get(request.model or default_model)
        spec = select_variant(self.registry, spec, lora_tags(request.prompt))  # <lora:name:w> picks a fused variant
        sampler = request.sampler or spec.defaults.sampler
        check_sampler_for(spec.family, spec.id, sampler)
        if request.init_image is not None and not FAMILIES[spec.family].has_img2img:
            raise InvalidRequest(
                f"{request.mode} is not available for {spec.id}: the {spec.family} family has no {request.mode} "
                f"pipeline (diffusers has none for it); use txt2img with this model, or pick another model for "
                f"{request.mode}")
        steps = spec.defaults.steps if request.steps is None else request.steps
        cfg = spec.defaults.cfg_scale if request.cfg_scale is None else request.cfg_scale
        check_range("steps", steps, 1, MAX_STEPS, whole=True)
        check_steps_for(sampler, int(steps))
        check_range("CFG scale", cfg, 0.0, 30.0)  # at most 1: no unconditional half (few-step models)
        cfg = float(cfg)
        check_range("number of images", request.num_images, 1, MAX_IMAGES, whole=True)
        if request.init_image is not None:
            check_range("denoising strength", request.strength, 0.0, 1.0)
            if int(steps * request.strength) < 1:
                raise InvalidRequest(
                    f"denoising strength {request.strength:g} with {steps} steps runs no denoising step "
                    f"(img2img runs strength x steps of them); raise the strength or the steps")
        seed = request.seed if request.seed not in (-1, None) else random.SystemRandom().randrange(MAX_SEED)
        check_range("seed", seed, 0, MAX_SEED, whole=True)
        size = self.check_size(spec, request.size or spec.default_size)
        hires = self.plan_hires(spec, request, size, int(steps)) if request.hires is not None else None
        if hires is not None:
            check_steps_for(sampler, hires.steps)
        self.check_partial_steps(sampler, int(steps), request, hires)
        inpaint = None
        if request.inpaint is not None:
            check_inpaint(request.inpaint, request.init_image)
            inpaint = prepare(request.init_image, request.inpaint, size, request.resize_mode)
        chunks, notices = self.prompt_chunks(spec, request)
        return Resolved(spec, sampler, int(steps), cfg, size, int(seed), hires, inpaint, chunks, notices)

    def prompt_chunks(self, spec: ModelSpec, request: GenerateRequest) -> tuple[int, tuple[str, ...]]:
        """The 75-token chunks the prompt runs with (a compiled prompt length on fixed-shape backends)
        and, when it needs more, the notices naming the words left out and the fix."""
        if self.tokenizer_of is None or spec.family not in CHUNKED_FAMILIES:
            return 1, ()
        tokenizer = self.tokenizer_of(spec)
        needed = prompt_chunks_needed(tokenizer, request.prompt, request.negative_prompt)
        compiled = spec.prompt_chunks if self.backend.fixed_shape else None
        chunks = chunks_to_run(needed, compiled)
        return chunks, prompt_notices(tokenizer, request.prompt, request.negative_prompt, needed, chunks, spec.id,
                                      compiled, str(self.registry.path))

    @staticmethod
    def check_partial_steps(sampler: str, steps: int, request: GenerateRequest, hires: Optional[HiresPlan]) -> None:
        """A sampler with a step limit (LCM) applies it to the denoised part of img2img: its timesteps
        come from the ``limit x strength`` last steps of its schedule."""
        limit = sampler_max_steps(sampler)
        for what, part_steps, strength in (("img2img", steps, request.strength if request.init_image else None),
                                           ("the hires pass", hires.steps if hires else 0, hires.strength if hires else None)):
            if limit is not None and strength is not None and part_steps > int(limit * strength):
                raise InvalidRequest(f"sampler {sampler!r} runs at most {int(limit * strength)} steps for {what} at "
                                     f"denoising strength {strength:g} ({limit} x strength); lower the steps or raise "
                                     "the strength")

    def plan_hires(self, spec: ModelSpec, request: GenerateRequest, size: Size, steps: int) -> HiresPlan:
        if request.init_image is not None:
            raise InvalidRequest("hires fix is for txt2img; for a larger img2img result, ask for a larger size")
        if not FAMILIES[spec.family].has_img2img:
            raise InvalidRequest(f"hires fix is not available for {spec.id}: its second pass is img2img, which the "
                                 f"{spec.family} family does not have")

        def second_size(target: Size) -> Size:
            try:
                return self.check_size(spec, target)
            except UnsupportedResolution as exc:
                raise UnsupportedResolution(f"hires fix to {target}: {exc}") from None

        return plan_hires_fix(request.hires, size, steps, check_range, second_size)

    def check_size(self, spec: ModelSpec, size: Size) -> Size:
        """A valid size (multiples of 8, at least 64; at most ``EAGER_MAX_SIDE`` on eager) that the
        fixed-shape backends also have compiled for ``spec``."""
        too_large = not self.backend.fixed_shape and max(size.width, size.height) > EAGER_MAX_SIDE
        if size.width % 8 or size.height % 8 or min(size.width, size.height) < 64 or too_large:
            raise UnsupportedResolution(
                f"{size} is not a valid size: width and height must be multiples of 8 between 64 and {EAGER_MAX_SIDE}")
        if not self.backend.fixed_shape:
            return size
        if size not in spec.resolutions:
            compiled = [str(s) for s in spec.resolutions if self.variant_state(spec, s) == "compiled"]
            raise UnsupportedResolution(
                f"{size} is not compiled for {spec.id}; compiled: {', '.join(compiled) or 'none'}. To add it, "
                f"list {size} under resolutions of {spec.id} in {self.registry.path} and run "
                f"`{artifacts.compile_command(spec.id, size, self.backend.name, self.registry.path)}`")
        return size

    def variant_state(self, spec: ModelSpec, size: Size) -> str:
        """"compiled" | "missing" | "stale" | "broken": the artifacts of ``spec`` at ``size``."""
        directory = artifacts.variant_dir(self.registry.artifacts_dir, spec.id, size, self.backend.name)
        return artifacts.variant_status(directory, expected_fingerprint(spec, size, self.backend)).state


def check_range(name: str, value: Any, low: float, high: float, whole: bool = False) -> None:
    """``value`` is a number from ``low`` to ``high`` (NaN and infinities are not); with ``whole``
    an integer (2.0 passes, 2.5 does not: the engine never rounds what it was asked for)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {number_text(low)} and {number_text(high)}, got {value!r}")
    if whole and not float(value).is_integer():
        raise InvalidRequest(f"{name} must be a whole number, got {value!r}")


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_fields(request: GenerateRequest) -> None:
    """The request's fields have the types the engine works with: a bad one is refused here, with
    its name, instead of failing deep in a pipeline on a device worker."""
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not isinstance(text, str):
            raise InvalidRequest(f"the {name} must be text, got {type(text).__name__} {text!r}")
        try:
            text.encode("utf-8")  # it is written into the PNG's parameters as UTF-8
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"the {name} contains U+{ord(text[exc.start]):04X} at position {exc.start}, half "
                                 "of a UTF-16 surrogate pair and not a character; send valid UTF-8 text") from None
    for name, value in (("model", request.model), ("sampler", request.sampler)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a name, got {type(value).__name__} {value!r}")
    if request.size is not None and not isinstance(request.size, Size):
        raise InvalidRequest(f"size must be a Size such as Size(512, 512), got {request.size!r}")
    if request.init_image is not None and not isinstance(request.init_image, Image.Image):
        raise InvalidRequest(f"init_image must be a PIL image (engine.images.read_image reads a file), "
                             f"got {type(request.init_image).__name__}")


__all__ = ["EAGER_MAX_SIDE", "MAX_IMAGES", "MAX_SEED", "MAX_STEPS", "Resolved", "Resolver", "check_fields",
           "check_range"]
