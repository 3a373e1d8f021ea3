"""Take the README's screenshots of a running app (the shipped model) in Debian's chromium.

    python app.py --port 7860 &                      # the shipped demo model
    python tools/screenshots.py --url http://127.0.0.1:7860/ --out docs/screenshots

Each tab is used as a user would: txt2img with a weighted prompt, img2img, inpaint with the brush,
PNG Info reading the last txt2img image, the Models tab. Needs ``pip install playwright`` and
``apt-get install -y chromium`` (never ``playwright install``).
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
GENERATION_TIMEOUT_MS = 120_000


def set_number(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page: Page, tab: str, pattern: str) -> None:
    page.locator(f"#{tab}_generate").click()
    expect(page.locator(f"#{tab}_info textarea")).to_have_value(re.compile(pattern), timeout=GENERATION_TIMEOUT_MS)
    page.wait_for_timeout(1500)  # the gallery swaps its last live preview for the image


def txt2img(page: Page, out: Path) -> None:
    page.locator("#txt2img_prompt textarea").fill("a (red:1.3) circle on a [blue] background")
    set_number(page, "txt2img_seed", 1234)
    generate(page, "txt2img", r"Seed: 1234")
    page.screenshot(path=str(out / "txt2img.png"))


def img2img(page: Page, out: Path, source: Path) -> None:
    page.get_by_role("tab", name="img2img", exact=True).first.click()
    page.locator("#img2img_image input[type=file]").set_input_files(str(source))
    page.locator("#img2img_prompt textarea").fill("a green circle on a yellow background")
    set_number(page, "img2img_denoising_strength", 0.6)
    set_number(page, "img2img_seed", 7)
    generate(page, "img2img", r"Denoising strength: 0\.6")
    page.screenshot(path=str(out / "img2img.png"), full_page=True)


def inpaint(page: Page, out: Path, source: Path) -> None:
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    page.locator("#img2img_inpaint_editor input[type=file]").set_input_files(str(source))
    paint_patch(page, "img2img_inpaint_editor", width=80, rows=range(-20, 21, 8))
    page.locator("#img2img_prompt textarea").fill("a red circle")
    page.get_by_label("latent noise").check()
    set_number(page, "img2img_denoising_strength", 1.0)
    generate(page, "img2img", r"Mask blur: 4, Masked content: latent noise")
    page.screenshot(path=str(out / "inpaint.png"), full_page=True)


def paint_patch(page: Page, editor_id: str, width: int, rows: range) -> None:
    """Brush strokes across the middle of an image editor's canvas, one per offset in ``rows``."""
    canvas = page.locator(f"#{editor_id} canvas").first
    expect(canvas).to_be_visible()
    page.wait_for_timeout(500)  # the editor sizes its canvas to the image
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for row in rows:
        page.mouse.move(x - width / 2, y + row)
        page.mouse.down()
        page.mouse.move(x + width / 2, y + row, steps=8)
        page.mouse.up()


def png_info(page: Page, out: Path, image: Path) -> None:
    page.get_by_role("tab", name="PNG Info", exact=True).click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(image))
    expect(page.locator("#pnginfo_table")).to_contain_text("Seed")
    page.screenshot(path=str(out / "pnginfo.png"))


def models(page: Page, out: Path) -> None:
    page.get_by_role("tab", name="Models", exact=True).click()
    expect(page.locator("#models_table")).to_contain_text("demo-shapes")
    page.screenshot(path=str(out / "models.png"), full_page=True)


def input_picture(folder: Path) -> Path:
    """A picture of the shipped model's world: a yellow circle on a blue background."""
    image = Image.new("RGB", (256, 256), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((64, 64, 192, 192), fill=(240, 210, 40))
    path = folder / "input.png"
    image.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(args.url)
        page.wait_for_selector("#txt2img_generate")
        txt2img(page, args.out)
        made = Path(tmp) / "txt2img.png"  # the gallery's PNG, parameters included, for PNG Info
        made.write_bytes(page.request.get(page.locator("#txt2img_gallery img").first.get_attribute("src")).body())
        source = input_picture(Path(tmp))
        img2img(page, args.out, source)
        inpaint(page, args.out, source)
        png_info(page, args.out, made)
        models(page, args.out)
        browser.close()
    print(f"screenshots written to {args.out}")


if __name__ == "__main__":
    main()
