"""Inpaint: latent masking with the compiled 4-channel UNet of any model, and natively with a
9-channel inpainting UNet — pixels outside the (blurred) mask stay the input's, inside they change,
and the result equals plain diffusers' inpaint pipeline plus A1111's overlay."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw

from engine import GenerateRequest, InvalidRequest, Size
from engine.types import INPAINT_FILLS, Inpaint

SIZE = Size(64, 64)
SEED, STEPS, CFG, STRENGTH = 21, 4, 6.5, 0.8


def textured(width: int = 64, height: int = 64) -> Image.Image:
    """A non-uniform image: gradients plus a checker, so any change to a pixel shows."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 8 + y // 8) % 2) * 200 + 30], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask(box=(20, 20, 44, 44), width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def request(inpaint: Inpaint, image: Image.Image | None = None, **changes) -> GenerateRequest:
    fields = dict(model="tiny-sd15", prompt="a red ball", negative_prompt="blurry", sampler="Euler", steps=STEPS,
                  cfg_scale=CFG, seed=SEED, size=SIZE, init_image=image or textured(), strength=STRENGTH,
                  inpaint=inpaint)
    fields.update(changes)
    return GenerateRequest(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def untouched_area(mask: Image.Image, blur: int) -> np.ndarray:
    """Where the blurred mask is exactly 0: A1111's overlay keeps the input there."""
    from engine.inpaint import blur as blur_mask

    return np.asarray(blur_mask(mask, blur)) == 0


@pytest.mark.parametrize("fill", INPAINT_FILLS)
@pytest.mark.parametrize("only_masked", [False, True])
def test_outside_the_mask_stays_the_input_and_inside_changes(cpu_engine, fill, only_masked):
    mask = square_mask()
    result = cpu_engine.generate(request(Inpaint(mask, blur=4, fill=fill, only_masked=only_masked, padding=8)))
    out, original = pixels(result.images[0].image), pixels(textured())
    keep = untouched_area(mask, 4)
    assert keep.sum() > 2000  # most of the image is outside the mask
    assert np.abs(out - original)[keep].max() <= 2
    inside = np.asarray(mask) == 255
    assert np.abs(out - original)[inside].mean() > 10


def test_whole_picture_equals_diffusers_inpaint_with_a1111s_overlay(cpu_engine, compiled_registry):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    mask = square_mask((10, 30, 50, 60))
    ours = pixels(cpu_engine.generate(request(Inpaint(mask, blur=3))).images[0].image)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        compiled_registry.get("tiny-sd15").source.ref, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    blurred = mask.filter(__import__("PIL.ImageFilter", fromlist=["GaussianBlur"]).GaussianBlur(3))
    made = pipe(prompt="a red ball", negative_prompt="blurry", image=textured(), mask_image=blurred,
                strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=CFG, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    overlay_mask = Image.fromarray(np.clip(np.asarray(blurred, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    expected = VaeImageProcessor().apply_overlay(overlay_mask, textured(), made)
    assert np.abs(ours - pixels(expected)).max() <= 1


def test_only_masked_redraws_the_region_at_the_compiled_size_and_keeps_the_full_size(cpu_engine):
    big = textured(160, 120)  # not a compiled size: only the mask's region is denoised, at 64x64
    mask = square_mask((70, 50, 90, 70), 160, 120)
    result = cpu_engine.generate(request(Inpaint(mask, blur=2, only_masked=True, padding=16), image=big))
    out = pixels(result.images[0].image)
    assert out.shape == (120, 160, 3) and result.size == SIZE
    keep = untouched_area(mask, 2)
    assert np.abs(out - pixels(big))[keep].max() <= 2
    assert np.abs(out - pixels(big))[np.asarray(mask) == 255].mean() > 10


def test_invert_repaints_the_black_area(cpu_engine):
    mask = square_mask()
    out = pixels(cpu_engine.generate(request(Inpaint(mask, blur=0, invert=True))).images[0].image)
    inside = np.asarray(mask) == 255
    assert np.abs(out - pixels(textured()))[inside].max() == 0  # the white square is now the kept part
    assert np.abs(out - pixels(textured()))[~inside].mean() > 10


def test_masked_content_choices_start_from_different_latents(cpu_engine):
    mask = square_mask()
    images = {fill: pixels(cpu_engine.generate(request(Inpaint(mask, fill=fill), strength=0.6)).images[0].image)
              for fill in INPAINT_FILLS}
    inside = np.asarray(mask) == 255
    for a in INPAINT_FILLS:
        for b in INPAINT_FILLS:
            if a < b:
                assert np.abs(images[a] - images[b])[inside].mean() > 1, (a, b)


def test_a_transparent_brush_layer_is_read_as_the_mask(cpu_engine):
    """Gradio's image editor sends the strokes as an RGBA layer: opaque where painted."""
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((20, 20, 44, 44), fill=(255, 255, 255, 255))
    from_layer = cpu_engine.generate(request(Inpaint(layer))).images[0].image
    from_mask = cpu_engine.generate(request(Inpaint(square_mask()))).images[0].image
    assert np.array_equal(pixels(from_layer), pixels(from_mask))


def test_inpaint_requests_batched_together_equal_each_alone(cpu_engine):
    masks = [square_mask((8, 8, 30, 30)), square_mask((30, 20, 60, 50))]
    alone = [pixels(cpu_engine.generate(request(Inpaint(m), seed=SEED + i)).images[0].image)
             for i, m in enumerate(masks)]
    jobs = [cpu_engine.submit(request(Inpaint(m), seed=SEED + i)) for i, m in enumerate(masks)]
    together = [job.result() for job in jobs]
    for result, expected in zip(together, alone):
        assert np.abs(pixels(result.images[0].image) - expected).max() <= 1


@pytest.mark.parametrize("inpaint, image, message", [
    (Inpaint(square_mask(width=32)), textured(), "the mask is 32x64 and the image 64x64: they must be the same size"),
    (Inpaint(Image.new("L", (64, 64), 0)), textured(), r"the mask is empty \(all black\): paint the area"),
    (Inpaint(Image.new("L", (64, 64), 255), invert=True), textured(), "or turn off 'invert mask'"),
    (Inpaint(square_mask(), fill="noise"), textured(), "unknown masked content 'noise'; choose one of: fill, original"),
    (Inpaint(square_mask(), blur=65), textured(), "mask blur must be a whole number of pixels from 0 to 64, got 65"),
    (Inpaint(square_mask(), padding=-1), textured(), "only-masked padding must be a whole number of pixels from 0"),
    (Inpaint("mask.png"), textured(), "the inpaint mask must be an image, got str"),
])
def test_bad_inpaint_settings_are_refused_before_queueing(cpu_engine, inpaint, image, message):
    with pytest.raises(InvalidRequest, match=message):
        cpu_engine.submit(request(inpaint, image=image))


def test_inpaint_without_an_image_is_refused(cpu_engine):
    with pytest.raises(InvalidRequest, match="inpainting needs an init image"):
        cpu_engine.submit(GenerateRequest(model="tiny-sd15", inpaint=Inpaint(square_mask())))


def test_infotext_and_outputs_folder_are_img2img_as_in_a1111(cpu_engine, tmp_path):
    from engine.infotext import parse_infotext
    from engine.outputs import OutputStore

    result = cpu_engine.generate(request(Inpaint(square_mask(), blur=5, fill="latent noise", only_masked=True)))
    info = parse_infotext(result.images[0].infotext)
    assert info["Denoising strength"] == "0.8" and info["Mask blur"] == "5"
    assert info["Masked content"] == "latent noise" and info["Inpaint area"] == "Only masked"
    assert info["Masked area padding"] == "32" and "Mask mode" not in info
    path = OutputStore(tmp_path).save(result.request.mode, result.images[0])
    assert path.parent.parent.name == "img2img-images"


# --- a 9-channel inpainting UNet -------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_engine(tiny_dir, tmp_path_factory):
    """tiny-sd15 with a 9-channel UNet (an SD inpainting checkpoint's layout), compiled for cpu."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from engine import Engine, EngineSettings
    from engine.backends import make_backend
    from engine.compile import compile_all
    from engine.registry import load_registry

    directory = tmp_path_factory.mktemp("inpainting")
    base = StableDiffusionInpaintPipeline.from_pretrained(tiny_dir / "tiny-sd15", safety_checker=None,
                                                          requires_safety_checker=False)
    torch.manual_seed(9)
    config = dict(base.unet.config, in_channels=9)
    base.unet = UNet2DConditionModel.from_config(config).eval()
    base.save_pretrained(directory / "tiny-sd15-inpainting", safe_serialization=True)
    entry = {"id": "tiny-inpainting", "title": "Tiny SD 1.5 inpainting", "family": "sd15",
             "source": {"local": "tiny-sd15-inpainting"}, "resolutions": ["64x64"],
             "defaults": {"sampler": "Euler", "steps": 4, "cfg_scale": 7}}
    path = directory / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "default_model": "tiny-inpainting",
                                    "models": [entry]}))
    registry = load_registry(path)
    outcomes = compile_all(registry, make_backend("cpu"), log=lambda line: None)
    assert [o.state for o in outcomes] == ["compiled"], outcomes
    engine = Engine(registry, make_backend("cpu"), EngineSettings(max_warm=1))
    yield engine, directory / "tiny-sd15-inpainting"
    engine.close()


def reference_inpainting(source: Path, **kwargs) -> Image.Image:
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red ball", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=CFG,
                width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED), **kwargs).images[0]


def test_an_inpainting_unet_reads_the_mask_natively(inpainting_engine):
    engine, source = inpainting_engine
    mask = square_mask()
    ours = pixels(engine.generate(request(Inpaint(mask, blur=0), model="tiny-inpainting")).images[0].image)
    made = reference_inpainting(source, image=textured(), mask_image=mask, strength=STRENGTH)
    expected = VaeImageProcessor().apply_overlay(mask, textured(), made)
    assert np.abs(ours - pixels(expected)).max() <= 1
    assert np.abs(ours - pixels(textured()))[np.asarray(mask) == 0].max() == 0


def test_an_inpainting_model_also_makes_txt2img_images(inpainting_engine):
    """As A1111: everything masked, an encoded blank as the masked image, strength 1."""
    engine, source = inpainting_engine
    ours = pixels(engine.generate(GenerateRequest(model="tiny-inpainting", prompt="a red ball", negative_prompt="blurry",
                                                  sampler="Euler", steps=STEPS, cfg_scale=CFG, seed=SEED,
                                                  size=SIZE)).images[0].image)
    made = reference_inpainting(source, image=Image.new("RGB", (64, 64), (127, 127, 127)),
                                mask_image=Image.new("L", (64, 64), 255), strength=1.0)
    assert np.abs(ours - pixels(made)).max() <= 1


def test_the_ui_turns_its_sub_tabs_into_the_request_image_and_inpaint():
    from ui.inpaint import INPAINT, INPAINT_UPLOAD, inpaint_input

    image, mask = textured(), square_mask()
    assert inpaint_input("img2img", image, None, None, None, 4, None, None, None, 32) == (image, None)
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (20, 20, 45, 45))
    editor = {"background": image.convert("RGBA"), "layers": [stroke], "composite": None}
    got, inpaint = inpaint_input(INPAINT, None, editor, None, None, 6, "Inpaint not masked", "latent nothing",
                                 "Only masked", 16)
    assert np.array_equal(pixels(got), pixels(image)) and np.array_equal(np.asarray(inpaint.mask), np.asarray(mask))
    assert (inpaint.blur, inpaint.fill, inpaint.only_masked, inpaint.padding, inpaint.invert) == (
        6, "latent nothing", True, 16, True)
    got, inpaint = inpaint_input(INPAINT_UPLOAD, None, None, image, mask, 4, "Inpaint masked", "fill",
                                 "Whole picture", 32)
    assert got is image and inpaint.mask is mask and not inpaint.only_masked and not inpaint.invert
    with pytest.raises(InvalidRequest, match="Inpaint upload needs both an image and a mask"):
        inpaint_input(INPAINT_UPLOAD, None, None, image, None, 4, None, None, None, 32)
    with pytest.raises(InvalidRequest, match="Inpaint needs an image: drop one into the editor"):
        inpaint_input(INPAINT, None, {"background": None, "layers": []}, None, None, 4, None, None, None, 32)
