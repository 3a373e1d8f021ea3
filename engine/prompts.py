"""What the text encoder sees of a prompt: CLIP reads at most 75 tokens (77 with start and end),
PixArt-Sigma's T5 299 (300 with its end token).

A longer prompt is cut by the pipeline without a word; ``truncation_notices`` says which words were
dropped, so the UI and the API can tell the user (A1111 prints the same warning).
"""
from __future__ import annotations

import re
from typing import Any, Optional

MAX_SHOWN = 300  # characters of the dropped text a notice quotes (a pasted essay must not fill the screen)


def dropped_words(tokenizer: Any, text: str, max_length: Optional[int] = None) -> Optional[tuple[int, int, str]]:
    """(tokens in ``text``, tokens kept, the dropped text) when ``text`` is too long, else None.
    ``max_length``: the token length the pipeline pads / cuts to (default: the tokenizer's)."""
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    # the special tokens take their places: CLIP's start and end, T5's end
    kept = (max_length or tokenizer.model_max_length) - tokenizer.num_special_tokens_to_add()
    if len(ids) <= kept:
        return None
    return len(ids), kept, tokenizer.decode(ids[kept:]).strip()


def truncation_notices(tokenizer: Any, prompt: str, negative_prompt: str,
                       max_length: Optional[int] = None) -> tuple[str, ...]:
    """One sentence per prompt that is cut, naming the words the model never saw."""
    notices = []
    for label, text in (("prompt", strip_extra_networks(prompt)), ("negative prompt", negative_prompt)):
        cut = dropped_words(tokenizer, text, max_length)
        if cut is not None:
            total, kept, dropped = cut
            shown = (f'"{dropped}"' if len(dropped) <= MAX_SHOWN
                     else f'"{dropped[:MAX_SHOWN]}…" and {len(dropped) - MAX_SHOWN:,} more characters')
            notices.append(f"the {label} is {total:,} tokens and the model reads {kept}: "
                           f"these words were ignored: {shown}")
    return tuple(notices)


# A1111's extra-network syntax, ``<lora:name:0.8>``: the tag selects a network and is not prompt text.
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")  # A1111's LyCORIS extension writes <lyco:...> for the same networks


def strip_extra_networks(prompt: str) -> str:
    """The prompt the text encoder reads: A1111 removes every ``<type:...>`` tag before encoding."""
    return _EXTRA_NETWORK_RE.sub("", prompt) if "<" in prompt else prompt


def lora_tags(prompt: str) -> "list[LoraTag]":
    """The ``<lora:name>`` / ``<lora:name:weight>`` tags of ``prompt`` (weight 1 when left out, as
    A1111's default multiplier). Raises InvalidRequest for a weight that is not a number, for
    A1111's separate text-encoder / UNet weights unless they are equal, and for extra-network types
    other than LoRA (hypernetworks are not supported)."""
    from .errors import InvalidRequest
    from .lora import LoraTag

    tags = []
    for kind, body in _EXTRA_NETWORK_RE.findall(prompt):
        if kind not in LORA_TYPES:
            raise InvalidRequest(f"<{kind}:{body}> in the prompt: only <lora:name:weight> extra networks are "
                                 f"supported (fused into a model at compile time); remove the tag")
        name, *weights = [part.strip() for part in body.split(":")]
        try:
            values = {float(w) for w in weights if "=" not in w} or {1.0}
        except ValueError:
            raise InvalidRequest(f"<{kind}:{body}> in the prompt: the weight must be a number, such as "
                                 f"<lora:{name}:0.8>") from None
        if len(values) > 1:
            raise InvalidRequest(f"<{kind}:{body}> in the prompt gives the text encoder and the UNet different "
                                 "weights; a fused LoRA has one scale: write one weight")
        tags.append(LoraTag(name, values.pop()))
    return tags


__all__ = ["dropped_words", "lora_tags", "strip_extra_networks", "truncation_notices"]
