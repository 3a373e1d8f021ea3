"""The engine against plain diffusers, for every family, every sampler, txt2img and img2img, with a
negative prompt and a fractional CFG scale; and the few-step samplers without guidance (CFG <= 1).

The expected side is written from diffusers' own documentation of the A1111 sampler names (the
"A1111 / k-diffusion -> diffusers" table in the schedulers overview, and its "Noise schedules and
schedule types" table: sgm_uniform -> timestep_spacing="trailing"), independently of the engine's
table in engine/samplers.py: a wrong entry there (or a dropped Karras or trailing option) fails here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerateRequest

# A1111 name -> (diffusers scheduler class, the options that make it that sampler)
DIFFUSERS_DOCS_TABLE = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler SGM Uniform": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler a SGM Uniform": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SGM Uniform": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ 2M SDE SGM Uniform": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "timestep_spacing": "trailing"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    # A1111's LCM sampler; the LCM-LoRA model cards: LCMScheduler.from_config(pipe.scheduler.config)
    "LCM": ("LCMScheduler", {}),
}
# Few-step samplers and the CFG scales few-step models run at: 0 (sd-turbo / sdxl-turbo model cards) and
# 1 (LCM-LoRA); at CFG <= 1 diffusers runs no unconditional half (the negative prompt is not used).
NO_GUIDANCE_SAMPLERS = ("LCM", "Euler a SGM Uniform")
NO_GUIDANCE_CFGS = (0.0, 1.0)
FAMILIES = {"sd15": "tiny-sd15", "sd21": "tiny-sd21", "sdxl": "tiny-sdxl"}
SEED, STEPS, CFG, STRENGTH = 21, 3, 6.5, 0.75
PROMPT, NEGATIVE = "a red square", "blurry, green"


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (20, 40, 200))
    image.paste((250, 200, 0), (8, 20, 40, 56))
    return image


@pytest.fixture(scope="module")
def reference_pipelines(compiled_registry):
    """Plain diffusers pipelines (txt2img and img2img) per family, loaded once, with the model's own
    scheduler config: each sampler is built from that, never from the scheduler the previous test set
    (its options, e.g. trailing timesteps, would leak into the next sampler)."""
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    classes = {"sd15": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
               "sd21": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
               "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)}
    pipes = {}
    for family, model in FAMILIES.items():
        source = compiled_registry.get(model).source.ref
        extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        txt2img = classes[family][0].from_pretrained(source, **extra)
        img2img = classes[family][1](**txt2img.components)
        for pipe in (txt2img, img2img):
            pipe.set_progress_bar_config(disable=True)
        pipes[family] = (txt2img, img2img, dict(txt2img.scheduler.config))
    return pipes


def reference(pipes, sampler: str, img2img: bool, cfg: float = CFG) -> np.ndarray:
    import diffusers

    name, options = DIFFUSERS_DOCS_TABLE[sampler]
    pipe, model_config = pipes[int(img2img)], pipes[2]
    config = {k: v for k, v in model_config.items()
              if k not in ("algorithm_type", "use_karras_sigmas", "skip_prk_steps")}
    # Stable Diffusion never clips the predicted sample: real checkpoints say clip_sample: false in
    # their scheduler config (and StableDiffusionPipeline corrects a scheduler passed to it); the
    # tiny test models' config leaves it out, so DDIM would fall back to its class default (True).
    config.setdefault("clip_sample", False)
    if name == "DPMSolverSDEScheduler":
        options = {**options, "noise_sampler_seed": [SEED]}  # A1111 seeds the SDE noise from the image seed
    pipe.scheduler = getattr(diffusers, name).from_config(config, **options)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=cfg,
                  generator=torch.Generator("cpu").manual_seed(SEED))
    if img2img:
        kwargs.update(image=init_image(), strength=STRENGTH)
    else:
        kwargs.update(height=64, width=64)
    return np.asarray(pipe(**kwargs).images[0].convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_DOCS_TABLE))
def test_engine_equals_plain_diffusers(cpu_engine, reference_pipelines, family, sampler, img2img):
    extra = {"init_image": init_image(), "strength": STRENGTH} if img2img else {}
    result = cpu_engine.generate(GenerateRequest(model=FAMILIES[family], prompt=PROMPT, negative_prompt=NEGATIVE,
                                                 sampler=sampler, steps=STEPS, cfg_scale=CFG, seed=SEED, **extra))
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    expected = reference(reference_pipelines[family], sampler, img2img)
    assert np.abs(ours - expected).max() <= 1, f"{family} {sampler} {'img2img' if img2img else 'txt2img'}"


@pytest.mark.parametrize("cfg", NO_GUIDANCE_CFGS)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sampler", NO_GUIDANCE_SAMPLERS)
def test_few_step_samplers_without_guidance_equal_plain_diffusers(cpu_engine, reference_pipelines, family, sampler,
                                                                   img2img, cfg):
    extra = {"init_image": init_image(), "strength": STRENGTH} if img2img else {}
    result = cpu_engine.generate(GenerateRequest(model=FAMILIES[family], prompt=PROMPT, negative_prompt=NEGATIVE,
                                                 sampler=sampler, steps=STEPS, cfg_scale=cfg, seed=SEED, **extra))
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    expected = reference(reference_pipelines[family], sampler, img2img, cfg)
    label = f"{family} {sampler} {'img2img' if img2img else 'txt2img'} CFG {cfg:g}"
    assert np.abs(ours - expected).max() <= 1, label
    if cfg == NO_GUIDANCE_CFGS[-1]:  # CFG 0 and CFG 1 both run the conditional half alone: the same pixels
        other = reference(reference_pipelines[family], sampler, img2img, NO_GUIDANCE_CFGS[0])
        assert np.array_equal(other, expected), label
