"""A1111-compatible ``parameters`` text: write it for our PNGs, parse it from ours and A1111's.

Format (as A1111 writes it)::

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: deliberate
"""
from __future__ import annotations

import io
import re
from typing import Any, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
_NEGATIVE = "Negative prompt:"
# key: value pairs; a value is either a quoted string (may contain commas) or runs to the next comma.
_PAIR_RE = re.compile(r'\s*([\w][\w \-/+()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def format_number(value: float) -> str:
    return f"{value:g}"


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """``params`` are written in order as ``Key: value``; values with commas are quoted."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    text = format_number(value) if isinstance(value, float) else str(value)
    if "," in text or "\n" in text or '"' in text or ":" in text:  # A1111 quotes a ':' too (Lora hashes)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        body = text[1:-1]
        return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), body)
    return text


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111 parameters into a flat dict with ``Prompt`` and ``Negative prompt`` keys added."""
    lines = text.strip("\n").split("\n")
    params_line = ""
    if lines and _PAIR_RE.match(lines[-1]) and len(_PAIR_RE.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines).strip(), "Negative prompt": "\n".join(negative_lines).strip()}
    for key, value in _PAIR_RE.findall(params_line):
        result[key.strip()] = _unquote(value)
    return result


def png_with_parameters(image: Image.Image, infotext: str) -> bytes:
    """PNG bytes of ``image`` with a ``parameters`` text chunk, as A1111 writes them."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(image: Image.Image) -> str:
    """The ``parameters`` text of a PNG opened with PIL ('' when it has none)."""
    return str(getattr(image, "text", {}).get(PARAMETERS_KEY) or image.info.get(PARAMETERS_KEY, ""))
