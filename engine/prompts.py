"""What the text encoder sees of a prompt: CLIP reads at most 75 tokens (77 with start and end),
PixArt-Sigma's T5 299 (300 with its end token).

A longer prompt is cut by the pipeline without a word; ``truncation_notices`` says which words were
dropped, so the UI and the API can tell the user (A1111 prints the same warning).
"""
from __future__ import annotations

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
    for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        cut = dropped_words(tokenizer, text, max_length)
        if cut is not None:
            total, kept, dropped = cut
            shown = (f'"{dropped}"' if len(dropped) <= MAX_SHOWN
                     else f'"{dropped[:MAX_SHOWN]}…" and {len(dropped) - MAX_SHOWN:,} more characters')
            notices.append(f"the {label} is {total:,} tokens and the model reads {kept}: "
                           f"these words were ignored: {shown}")
    return tuple(notices)


__all__ = ["dropped_words", "truncation_notices"]
