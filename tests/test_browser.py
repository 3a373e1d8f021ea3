"""The web app in a real browser: Debian's /usr/bin/chromium driven by Python Playwright.

Skipped when /usr/bin/chromium or playwright is missing (``apt-get install -y chromium`` and
``pip install playwright``; never ``playwright install``). Screenshots go to a tmp dir, or to
docs/screenshots/ when ``UI_SCREENSHOTS=1`` is set.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from PIL import Image

from engine.infotext import png_with_parameters

pytest_plugins = ["ui_server"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium is missing "
                                                     "(apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = playwright_api.expect


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, ui_server):
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(ui_server.url)
    page.wait_for_selector("#txt2img_generate")
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("UI_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("screenshots")


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's number box (what a user does to set an exact value)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_txt2img_in_the_browser(page, screenshots):
    page.locator("#txt2img_prompt textarea").fill("a red circle on a blue background")
    page.locator("#txt2img_neg_prompt textarea").fill("blurry")
    pick(page, "txt2img_sampling", "DPM++ 2M")
    set_number(page, "txt2img_steps", 6)
    pick(page, "txt2img_resolution", "64x96")
    page.locator("#txt2img_generate").click()
    expect(page.locator("#txt2img_gallery img").first).to_be_visible()
    info = page.locator("#txt2img_info textarea")
    expect(info).to_have_value(re.compile(r"Steps: 6, Sampler: DPM\+\+ 2M, .*Size: 64x96"))
    assert info.input_value().startswith("a red circle on a blue background\nNegative prompt: blurry\n")
    expect(page.locator("#txt2img_stats")).to_contain_text("it/s")
    seed = re.search(r"Seed: (\d+)", info.input_value()).group(1)
    page.locator("#txt2img_reuse_seed").click()  # ♻️ puts the last seed into the seed box
    expect(page.locator("#txt2img_seed input")).to_have_value(seed)
    page.screenshot(path=str(screenshots / "txt2img.png"))


def test_img2img_in_the_browser(page, screenshots, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (96, 64), (30, 90, 200)).save(source)
    open_tab(page, "img2img")
    page.locator("#img2img_image input[type=file]").set_input_files(str(source))
    expect(page.locator("#img2img_image img").first).to_be_visible()
    page.locator("#img2img_prompt textarea").fill("a yellow sun")
    set_number(page, "img2img_denoising_strength", 0.6)
    page.get_by_label("crop and resize").check()
    page.locator("#img2img_generate").click()
    expect(page.locator("#img2img_gallery img").first).to_be_visible()
    expect(page.locator("#img2img_info textarea")).to_have_value(re.compile(r"Denoising strength: 0\.6"))
    page.screenshot(path=str(screenshots / "img2img.png"), full_page=True)


def start_long_txt2img(page, prompt: str, batch_count: int) -> None:
    """Generate ``batch_count`` images of 150 steps: long enough to watch and interrupt."""
    page.locator("#txt2img_prompt textarea").fill(prompt)
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_count", batch_count)
    page.locator("#txt2img_generate").click()


def test_interrupt_a_long_generation(page, screenshots):
    start_long_txt2img(page, "a very long job", 16)
    # the progress bar reads "Image 2/16 · step 4/150 · 70.99 it/s": wait until one image is done
    page.wait_for_function("() => /Image ([2-9]|1[0-6])\\/16 · step \\d+\\/150 · [\\d.]+ it\\/s/"
                           ".test(document.body.innerText)")
    page.screenshot(path=str(screenshots / "progress.png"))
    page.locator("#txt2img_interrupt").click()
    stats = page.locator("#txt2img_stats")
    expect(stats).to_contain_text("Interrupted after")
    done = int(re.search(r"after (\d+) of 16 images", stats.inner_text()).group(1))
    assert 1 <= done < 16
    page.screenshot(path=str(screenshots / "interrupted.png"))

    # the app still serves: a short job runs to the end
    set_number(page, "txt2img_steps", 2)
    set_number(page, "txt2img_batch_count", 1)
    page.locator("#txt2img_generate").click()
    expect(stats).to_contain_text("2 steps")
    assert "Interrupted" not in stats.inner_text()


def test_png_info_sends_parameters_to_txt2img(page, screenshots, tmp_path):
    text = ("a castle on a hill\nNegative prompt: fog\n"
            "Steps: 7, Sampler: Euler, CFG scale: 5.5, Seed: 4242, Size: 64x96, Model: tiny-sd15, Backend: cpu")
    path = tmp_path / "from-a1111.png"
    path.write_bytes(png_with_parameters(Image.new("RGB", (64, 96), (120, 80, 40)), text))
    open_tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    expect(page.locator("#pnginfo_parameters textarea")).to_have_value(text)
    expect(page.locator("#pnginfo_table")).to_contain_text("4242")
    page.screenshot(path=str(screenshots / "pnginfo.png"))
    page.locator("#pnginfo_send_txt2img").click()
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("a castle on a hill")
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()  # the txt2img tab is showing
    expect(page.locator("#txt2img_neg_prompt textarea")).to_have_value("fog")
    expect(page.locator("#txt2img_seed input")).to_have_value("4242")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("7")
    expect(page.locator("#txt2img_sampling input")).to_have_value("Euler")
    expect(page.locator("#txt2img_resolution input")).to_have_value("64x96")


def test_models_tab_lists_and_loads(page, screenshots):
    open_tab(page, "Models")
    table = page.locator("#models_table")
    for model in ("tiny-sd15", "tiny-sd21", "tiny-sdxl"):
        expect(table).to_contain_text(model)
    pick(page, "models_model", "Tiny SD 2.1 (tiny-sd21)")
    page.locator("#models_load").click()
    expect(page.locator("#models_message")).to_contain_text("Loaded tiny-sd21@64x64")
    expect(page.locator("#models_status")).to_contain_text("tiny-sd21")
    page.screenshot(path=str(screenshots / "models.png"), full_page=True)


def test_model_defaults_batch_and_picking_an_image(page):
    """Picking a model fills its registry defaults; Ctrl+Enter generates; clicking a thumbnail
    shows that image's parameters."""
    pick(page, "sd_model_checkpoint", "Tiny SDXL (tiny-sdxl)")
    expect(page.locator("#txt2img_sampling input")).to_have_value("Euler")
    expect(page.locator("#txt2img_cfg_scale input[type=number]")).to_have_value("5")
    set_number(page, "txt2img_batch_count", 2)
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("two cats")
    prompt.press("Control+Enter")
    info = page.locator("#txt2img_info textarea")
    expect(info).to_have_value(re.compile(r"Model: tiny-sdxl"))
    first_seed = int(re.search(r"Seed: (\d+)", info.input_value()).group(1))
    thumbnails = page.locator("#txt2img_gallery .thumbnail-item")
    expect(thumbnails).to_have_count(2)
    thumbnails.nth(1).click()
    expect(info).to_have_value(re.compile(rf"Seed: {first_seed + 1},"))


def test_the_gallery_shows_a_live_preview_while_generating(page, screenshots):
    start_long_txt2img(page, "a preview", 3)
    # while the progress bar still counts steps, the gallery already holds the preview image
    page.wait_for_function("() => /step \\d+\\/150/.test(document.body.innerText)"
                           " && document.querySelector('#txt2img_gallery img') !== null")
    page.screenshot(path=str(screenshots / "preview.png"))
    page.locator("#txt2img_interrupt").click()
    expect(page.locator("#txt2img_stats")).to_contain_text("Interrupted")


def test_hires_fix_from_the_accordion(page, screenshots):
    page.locator("#txt2img_prompt textarea").fill("a hires square")
    set_number(page, "txt2img_steps", 3)
    set_number(page, "txt2img_batch_count", 1)
    page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()
    page.locator("#txt2img_enable_hr input[type=checkbox]").check()
    pick(page, "txt2img_hr_resize", "64x96")
    page.locator("#txt2img_generate").click()
    expect(page.locator("#txt2img_info textarea")).to_have_value(re.compile(r"Hires resize: 64x96, Hires upscaler: Latent"))
    expect(page.locator("#txt2img_stats")).to_contain_text("64x96")
    page.screenshot(path=str(screenshots / "hires-fix-tiny.png"))
    page.locator("#txt2img_enable_hr input[type=checkbox]").uncheck()


def test_inpaint_with_the_brush_in_the_browser(page, screenshots, tmp_path, ui_server):
    """img2img → Inpaint: drop an image into the editor, paint a stroke, generate: the stroke's area
    is redrawn, the corners are the input's own pixels (fitted to the generation size)."""
    import numpy as np
    from test_inpaint import textured
    from tools.screenshots import paint_patch
    from ui_server import last_outputs

    source = tmp_path / "inpaint-input.png"
    textured().resize((256, 256)).save(source)
    open_tab(page, "img2img")
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    expect(page.locator("#img2img_mask_blur")).to_be_visible()  # the settings show on the inpaint sub-tabs
    page.locator("#img2img_inpaint_editor input[type=file]").set_input_files(str(source))
    paint_patch(page, "img2img_inpaint_editor", width=60, rows=range(-8, 9, 8))
    page.locator("#img2img_prompt textarea").fill("a green circle")
    page.get_by_label("latent noise").check()
    page.locator("#img2img_generate").click()
    expect(page.locator("#img2img_gallery img").first).to_be_visible()
    info = page.locator("#img2img_info textarea")
    expect(info).to_have_value(re.compile(r"Mask blur: 4, Masked content: latent noise"))
    page.screenshot(path=str(screenshots / "inpaint.png"), full_page=True)
    saved, = last_outputs(ui_server, "img2img", 1)
    out = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
    fitted = np.asarray(textured().resize((256, 256)).resize((64, 64), Image.LANCZOS), dtype=np.int16)
    corners = (slice(0, 8), slice(0, 8)), (slice(-8, None), slice(-8, None))
    assert all(np.abs(out[c] - fitted[c]).max() <= 2 for c in corners)
    assert np.abs(out - fitted).max() > 20  # the stroke's area was redrawn

    page.get_by_role("tab", name="img2img", exact=True).last.click()  # back to plain img2img: settings hide
    expect(page.locator("#img2img_mask_blur")).to_be_hidden()
