"""A1111 prompt syntax in the engine: weighted and long prompts become the ``prompt_embeds`` a
diffusers pipeline takes instead of text (``engine.prompt_weights`` has the algorithm).

A call whose prompts are all plain (no weighting syntax, no BREAK, at most 75 tokens) keeps
diffusers' own text path, unchanged. Otherwise every row of the call is chunked, encoded with the
warm pipeline's (compiled or eager) text encoder(s), weighted, and padded with empty-prompt chunks
to the call's chunk count — the same for prompt and negative prompt (A1111's "pad prompt/negative
prompt" option), since the UNet reads one sequence length per call. On fixed-shape backends that
count is one the UNet was compiled for (``prompt_chunks``); the engine picks it per request.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .families import TEXT_ENCODER, TEXT_ENCODER_2
from .prompt_weights import (CHUNK_TOKENS, chunk_prompt, encode_chunks, encode_chunks_with_pooled, is_plain,
                             needed_chunks, pad_to_chunks)
from .errors import InvalidRequest
from .prompts import MAX_SHOWN, strip_extra_networks
from .registry import MAX_PROMPT_CHUNKS

CHUNKED_FAMILIES = ("sd15", "sd21", "sdxl")  # CLIP text encoders (PixArt-Sigma's T5 reads 300 tokens at once)
EAGER_MAX_CHUNKS = 8  # 600 tokens on the any-shape backend: longer prompts are cut, with a notice


def prompt_chunks_needed(tokenizer: Any, prompt: str, negative_prompt: str) -> int:
    """75-token chunks the longer of prompt and negative prompt needs (BREAK starts a chunk).
    Raises InvalidRequest for a weight that is not a number, such as ``(word:1.2.3)``."""
    try:
        return max(needed_chunks(tokenizer, strip_extra_networks(prompt)), needed_chunks(tokenizer, negative_prompt))
    except ValueError as exc:
        raise InvalidRequest(f"{exc}: write a weight as (word:1.3), or \\( \\) for brackets that are text") from None


def chunks_to_run(needed: int, compiled: Optional[tuple[int, ...]]) -> int:
    """The chunk count a request runs with: the smallest compiled count that holds ``needed`` (else
    the largest compiled: the rest is cut); on the any-shape backend (``compiled`` None) ``needed``,
    at most ``EAGER_MAX_CHUNKS``."""
    if compiled is None:
        return min(needed, EAGER_MAX_CHUNKS)
    return min((c for c in compiled if c >= needed), default=max(compiled))


def prompt_notices(tokenizer: Any, prompt: str, negative_prompt: str, needed: int, chunks: int, model: str,
                   compiled: Optional[tuple[int, ...]], registry: str) -> tuple[str, ...]:
    """What the user is told when a prompt needs more chunks than the request runs with: the words
    that were ignored (from the chunks themselves, so BREAK and weights count as A1111 reads them),
    and how to have them read (compile more ``prompt_chunks``, or shorten it)."""
    if needed <= chunks:
        return ()
    if compiled is None:
        fix = f"at most {_chunks(EAGER_MAX_CHUNKS)} of {CHUNK_TOKENS} tokens are read here: shorten it"
    elif needed > MAX_PROMPT_CHUNKS:
        fix = (f"{model} is compiled for prompts of up to {_chunks(chunks)} of {CHUNK_TOKENS} tokens and at most "
               f"{MAX_PROMPT_CHUNKS} can be compiled: shorten it")
    else:
        fix = (f"{model} is compiled for prompts of up to {_chunks(chunks)} of {CHUNK_TOKENS} tokens; to read it "
               f"all, add {needed} to prompt_chunks of {model} in {registry} and recompile")
    notices = []
    for label, text in (("prompt", strip_extra_networks(prompt)), ("negative prompt", negative_prompt)):
        pieces = chunk_prompt(tokenizer, text)
        if len(pieces) > chunks:
            total, dropped = _words(tokenizer, pieces), _text(tokenizer, pieces[chunks:])
            notices.append(f"the {label} is {total:,} tokens in {_chunks(len(pieces))} and the model reads "
                           f"{_chunks(chunks)}: these words were ignored: {_quoted(dropped)}. ({fix})")
    return tuple(notices)


def _chunks(count: int) -> str:
    return f"{count} chunk{'s' if count != 1 else ''}"


def _prompt_ids(tokenizer: Any, pieces: list[Any]) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [i for piece in pieces for i in piece.ids if i not in special]


def _words(tokenizer: Any, pieces: list[Any]) -> int:
    return len(_prompt_ids(tokenizer, pieces))


def _text(tokenizer: Any, pieces: list[Any]) -> str:
    return tokenizer.decode(_prompt_ids(tokenizer, pieces)).strip() or "(BREAK only)"


def _quoted(text: str) -> str:
    return f'"{text}"' if len(text) <= MAX_SHOWN else f'"{text[:MAX_SHOWN]}…" and {len(text) - MAX_SHOWN:,} more characters'


def with_prompt_embeds(components: dict[str, Any], family: str, kwargs: dict[str, Any], chunks: int,
                       force_zeros_for_empty: bool = False) -> dict[str, Any]:
    """``kwargs`` of a pipeline call with ``prompt`` / ``negative_prompt`` replaced by A1111-weighted
    embeddings of ``chunks`` chunks each, when any row needs them (else ``kwargs`` unchanged).
    ``force_zeros_for_empty``: SDXL's rule, an empty negative prompt is all zeros (as diffusers)."""
    prompts = _rows(kwargs.get("prompt"))
    negatives = _rows(kwargs.get("negative_prompt"), len(prompts))
    if family not in CHUNKED_FAMILIES or (chunks == 1 and all(map(is_plain, prompts + negatives))):
        return kwargs
    encoder = _TextEncoding(components, family, chunks)
    with torch.no_grad():
        conds = [encoder.encode(strip_extra_networks(text)) for text in prompts]
        unconds = [encoder.zeros_like(conds[0]) if force_zeros_for_empty and not text else encoder.encode(text)
                   for text in negatives]
    converted = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
    converted["prompt_embeds"] = torch.cat([c[0] for c in conds])
    converted["negative_prompt_embeds"] = torch.cat([u[0] for u in unconds])
    if family == "sdxl":
        converted["pooled_prompt_embeds"] = torch.cat([c[1] for c in conds])
        converted["negative_pooled_prompt_embeds"] = torch.cat([u[1] for u in unconds])
    return converted


def _rows(value: Any, rows: int = 1) -> list[str]:
    if isinstance(value, list):
        return [text or "" for text in value]
    return [value or ""] * rows


class _TextEncoding:
    """Encodes texts to ``(embeds [1, 77 * chunks, dim], pooled or None)`` with a pipeline's text
    encoder(s): SD 1.x/2.x the last hidden state, SDXL both encoders' penultimate hidden states
    side by side and the second encoder's pooled output (diffusers' ``encode_prompt`` layers)."""

    def __init__(self, components: dict[str, Any], family: str, chunks: int):
        self.chunks = chunks
        self.sdxl = family == "sdxl"
        self.tokenizers = [components["tokenizer"]] + ([components["tokenizer_2"]] if self.sdxl else [])
        self.encoders = [components[TEXT_ENCODER]] + ([components[TEXT_ENCODER_2]] if self.sdxl else [])
        self._empty: list[torch.Tensor] = []

    def encode(self, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden, pooled = [], None
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.encoders)):
            chunks = chunk_prompt(tokenizer, text)[:self.chunks]
            if self.sdxl and index == 1:
                embeds, pooled = encode_chunks_with_pooled(self._hidden_and_pooled(encoder), chunks)
            else:
                embeds = encode_chunks(self._hidden(encoder), chunks)
            hidden.append(pad_to_chunks(embeds, self.chunks, self._empty_chunk(index)))
        return torch.cat(hidden, dim=-1), pooled

    def zeros_like(self, encoded: tuple[torch.Tensor, Optional[torch.Tensor]]) -> tuple[torch.Tensor, Any]:
        embeds, pooled = encoded
        return torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)

    def _empty_chunk(self, index: int) -> torch.Tensor:
        """The encoding of the empty prompt: what A1111 pads a shorter conditioning with."""
        while len(self._empty) <= index:
            i = len(self._empty)
            chunks = chunk_prompt(self.tokenizers[i], "")
            if self.sdxl and i == 1:
                self._empty.append(encode_chunks_with_pooled(self._hidden_and_pooled(self.encoders[i]), chunks)[0])
            else:
                self._empty.append(encode_chunks(self._hidden(self.encoders[i]), chunks))
        return self._empty[index]

    def _hidden(self, encoder: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        device = _device_of(encoder)
        if self.sdxl:
            return lambda ids: encoder(ids.to(device), output_hidden_states=True).hidden_states[-2]
        return lambda ids: encoder(ids.to(device))[0]

    def _hidden_and_pooled(self, encoder: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        device = _device_of(encoder)

        def run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = encoder(ids.to(device), output_hidden_states=True)
            return out.hidden_states[-2], out[0]

        return run


def _device_of(module: Any) -> Any:
    return getattr(module, "device", torch.device("cpu"))


__all__ = ["CHUNKED_FAMILIES", "EAGER_MAX_CHUNKS", "chunks_to_run", "prompt_chunks_needed", "prompt_notices",
           "with_prompt_embeds"]
