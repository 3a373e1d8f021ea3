"""A1111 ``parameters`` text: what we write parses back, and A1111's own text parses."""
from __future__ import annotations

import pytest
from PIL import Image

from engine.infotext import format_infotext, parse_infotext, png_with_parameters, read_parameters

A1111_SAMPLE = (
    "masterpiece, a castle on a hill, (detailed:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model hash: abc123, '
    'Model: deliberate_v2, Lora hashes: "a: 1, b: 2", Version: v1.6.0'
)


def test_parse_a1111_text():
    params = parse_infotext(A1111_SAMPLE)
    assert params["Prompt"] == "masterpiece, a castle on a hill, (detailed:1.2)"
    assert params["Negative prompt"] == "blurry, lowres"
    assert params["Steps"] == "30" and params["Sampler"] == "DPM++ 2M Karras"
    assert params["CFG scale"] == "7.5" and params["Seed"] == "1234" and params["Size"] == "512x768"
    assert params["Lora hashes"] == "a: 1, b: 2"
    assert params["Version"] == "v1.6.0"


def test_round_trip_through_png():
    text = format_infotext("a red circle,\nsecond line", "green", {
        "Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 42, "Size": "64x64", "Model": "demo",
        "Note": 'with "quotes", commas', "Skipped": None})
    assert "CFG scale: 7," in text and "Skipped" not in text
    png = png_with_parameters(Image.new("RGB", (8, 8)), text)
    import io

    read_back = read_parameters(Image.open(io.BytesIO(png)))
    assert read_back == text
    params = parse_infotext(read_back)
    assert params["Prompt"] == "a red circle,\nsecond line"
    assert params["Negative prompt"] == "green"
    assert params["Note"] == 'with "quotes", commas'
    assert params["Seed"] == "42"


def test_prompt_only_text_has_no_parameters():
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


@pytest.mark.parametrize("value, written", [
    ('say "hi"', '"say \\"hi\\""'),          # a quote alone is quoted and escaped
    ("two\nlines", '"two\\nlines"'),          # a newline alone is quoted and escaped
    ("a, b", '"a, b"'),                       # a comma alone is quoted
    ("detail: 0123abcd", '"detail: 0123abcd"'),  # a colon alone is quoted (A1111's Lora hashes)
    ('back\\slash, "q"', '"back\\\\slash, \\"q\\""'),
    ("plain", "plain"),                       # nothing to protect: written as is
    (6.5, "6.5"), (7.0, "7"),
])
def test_each_character_that_breaks_a_field_is_quoted_and_comes_back(value, written):
    text = format_infotext("p", "", {"Steps": 2, "Note": value, "Seed": 1})
    assert text.splitlines()[-1] == f"Steps: 2, Note: {written}, Seed: 1"
    params = parse_infotext(text)
    assert params["Note"] == (value if isinstance(value, str) else written) and params["Seed"] == "1"


def test_parse_keeps_what_is_not_a_parameters_line():
    """A last line with fewer than three ``key: value`` pairs is prompt text; a multi-line negative
    prompt keeps its lines; a prompt starting with X keeps it (mutation survivors)."""
    assert parse_infotext("a cat\nlighting: soft")["Prompt"] == "a cat\nlighting: soft"
    text = "Xylophone\nNegative prompt: blurry\nlow contrast\nSteps: 2, Sampler: Euler, CFG scale: 7"
    params = parse_infotext(text)
    assert params["Prompt"] == "Xylophone" and params["Negative prompt"] == "blurry\nlow contrast"
    assert parse_infotext('p\nSteps: 2, Note: "", Seed: 1')["Note"] == ""  # an empty quoted value


def test_read_parameters_of_a_png_an_in_memory_image_and_an_image_without():
    import io

    png = Image.open(io.BytesIO(png_with_parameters(Image.new("RGB", (8, 8)), "a\nSteps: 1, Seed: 2, Size: 8x8")))
    assert read_parameters(png) == "a\nSteps: 1, Seed: 2, Size: 8x8"
    in_memory = Image.new("RGB", (8, 8))  # not a PNG file: no .text, parameters in .info (as PIL's WebP/JPEG)
    in_memory.info["parameters"] = "from info"
    assert read_parameters(in_memory) == "from info"
    assert read_parameters(Image.new("RGB", (8, 8))) == ""
