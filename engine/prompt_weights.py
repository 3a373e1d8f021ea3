"""A1111 prompt weighting and long prompts, for CLIP text encoders (SD1.x, SD2.x, SDXL).

AUTOMATIC1111's stable-diffusion-webui reads ``(word)`` as weight x1.1, ``[word]`` as /1.1 and
``(word:1.3)`` as x1.3, splits a prompt into chunks of 75 tokens (77 with start and end) instead of
cutting it at 75, and starts a new chunk at ``BREAK``. This module reproduces that, so the engine
can hand diffusers ``prompt_embeds`` that match A1111's conditioning:

1. ``parse_attention(text)``: the prompt as (text, weight) segments (A1111's
   ``modules/prompt_parser.py: parse_prompt_attention``).
2. ``chunk_prompt(tokenizer, text)``: the segments tokenized into ``PromptChunk``s of 77 token
   ids and 77 weights (``modules/sd_hijack_clip.py: tokenize_line``; padding as
   ``process_tokens`` and ``modules/sd_hijack_open_clip.py``).
3. ``encode_chunks(encode, chunks)``: every chunk through the caller's text encoder, weighted with
   A1111's "Original" emphasis (``modules/sd_emphasis.py: EmphasisOriginal``: scale each token's
   hidden state by its weight, then rescale the chunk so its mean is the unweighted mean), the
   chunks concatenated along the sequence axis: ``[1, 77 * chunks, dim]``.
4. ``pad_to_chunks`` / ``pad_to_same_chunks``: a shorter conditioning extended with the encoding
   of the empty prompt (``modules/sd_samplers_cfg_denoiser.py: pad_cond``), so prompt and
   negative prompt have one length, or reach a compiled chunk count.
5. ``is_plain(text)``: no weighting syntax, no BREAK: the plain diffusers path gives the same.

SDXL has two text encoders: chunk and encode the prompt once per encoder (each with its own
tokenizer: CLIP-L pads with its end token, OpenCLIP-bigG with id 0), weight each encoder's hidden
states on their own (A1111 runs the emphasis per embedder), concatenate the two along the last axis,
and take the pooled embedding of the second encoder's FIRST chunk, unweighted
(``encode_chunks_with_pooled``; A1111 returns ``zs[0].pooled``).

Not covered: prompt editing ``[a:b:0.5]`` and alternation ``[a|b]`` (the text is read as attention
syntax only, ``[a:b:0.5]`` becoming the text "a:b:0.5" at weight 1/1.1), ``AND`` composition,
textual-inversion embeddings, and the extra-network tags ``<lora:...>`` (strip them first with
``engine.prompts.strip_extra_networks``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

CHUNK_TOKENS = 75  # prompt tokens per chunk (A1111's chunk_length)
CHUNK_LENGTH = CHUNK_TOKENS + 2  # with the start and end tokens: what CLIP reads
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack" (modules/shared_options.py)
ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1  # A1111 multiplies by this constant (not divides by 1.1): same floats
BREAK = ("BREAK", -1.0)  # the segment parse_attention gives for the BREAK keyword

# One match per piece of a prompt; the alternatives and their order are A1111's re_attention.
_ATTENTION_PIECE = re.compile(r"""
      \\[()\[\]\\]                   # an escaped bracket or backslash: that character, as text
    | \\                             # any other backslash: dropped
    | \(                             # opens a round bracket (x1.1, or x the weight at its close)
    | \[                             # opens a square bracket (/1.1)
    | :(?P<weight>[+-]?[.\d]+)\)     # ":1.3)" closes a round bracket with an explicit weight
    | \)                             # closes a round bracket
    | ]                              # closes a square bracket
    | [^\\()\[\]:]+                  # plain text
    | :                              # a colon that closes nothing: text
""", re.VERBOSE)
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_SYNTAX_CHARACTERS = frozenset("()[]\\")


# ---------------------------------------------------------------------------------------------
# 1. Parsing


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) segments, exactly as A1111's ``parse_prompt_attention``.

    ``(a)`` x1.1, ``[a]`` /1.1, ``(a:1.3)`` x1.3, nested brackets multiply, ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are the literal characters (another backslash is dropped), a closing bracket
    with no opener is text, an opener never closed applies to the rest of the prompt, ``BREAK``
    (a whole word) becomes the segment ``("BREAK", -1.0)``, neighbours of equal weight are merged,
    and an empty prompt is ``[("", 1.0)]``. A1111 quirk kept: a BREAK inside brackets has its -1
    multiplied too (``(a BREAK b)`` gives ``("BREAK", -1.1)``), and is then read as the word.

    Raises ValueError for an explicit weight that is not a number, such as ``(a:1.2.3)`` (A1111
    fails there too, on ``float()``)."""
    segments: list[list[Any]] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index of the first segment inside each open bracket
    open_square: list[int] = []
    for match in _ATTENTION_PIECE.finditer(text):
        piece, weight = match.group(0), match.group("weight")
        if piece.startswith("\\"):
            segments.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(segments))
        elif piece == "[":
            open_square.append(len(segments))
        elif weight is not None and open_round:
            _scale_from(segments, open_round.pop(), _weight_number(weight, text))
        elif piece == ")" and open_round:
            _scale_from(segments, open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif piece == "]" and open_square:
            _scale_from(segments, open_square.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            segments.extend(_split_break(piece))
    for start in open_round:  # A1111 closes the unclosed: round first, outermost first
        _scale_from(segments, start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        _scale_from(segments, start, SQUARE_BRACKET_WEIGHT)
    return _merge_equal_neighbours(segments or [["", 1.0]])


def _weight_number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"the prompt weight {weight!r} is not a number (in {text[:200]!r})") from None


def _scale_from(segments: list[list[Any]], start: int, multiplier: float) -> None:
    """Multiply the weight of every segment from ``start`` on (those inside a closing bracket)."""
    for segment in segments[start:]:
        segment[1] *= multiplier


def _split_break(plain: str) -> list[list[Any]]:
    """A run of plain text, split at each BREAK keyword into text, BREAK, text, ..."""
    pieces: list[list[Any]] = []
    for index, part in enumerate(_BREAK_KEYWORD.split(plain)):
        if index > 0:
            pieces.append(list(BREAK))
        pieces.append([part, 1.0])
    return pieces


def _merge_equal_neighbours(segments: list[list[Any]]) -> list[tuple[str, float]]:
    merged: list[list[Any]] = []
    for segment_text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += segment_text
        else:
            merged.append([segment_text, weight])
    return [(segment_text, weight) for segment_text, weight in merged]


def is_plain(text: str) -> bool:
    """True when A1111 reads ``text`` as one weight-1.0 segment equal to the text itself (no
    brackets that weigh, no escapes, no BREAK): then the plain diffusers encoding is A1111's, as
    long as the prompt fits one chunk (``needed_chunks(...) == 1``; the plain path cuts the rest)."""
    if "BREAK" not in text and _SYNTAX_CHARACTERS.isdisjoint(text):
        return True
    return parse_attention(text) == [(text, 1.0)]


# ---------------------------------------------------------------------------------------------
# 2. Chunking


@dataclass(frozen=True)
class PromptChunk:
    """One CLIP input of a prompt: 77 token ids (start, 75 prompt or padding tokens, end) and the
    weight of each (1.0 for start, end and padding)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != CHUNK_LENGTH or len(self.weights) != CHUNK_LENGTH:
            raise ValueError(f"a prompt chunk has {CHUNK_LENGTH} ids and weights, "
                             f"not {len(self.ids)} and {len(self.weights)}")


@dataclass(frozen=True)
class _SpecialIds:
    start: int
    end: int
    pad: int
    comma: int | None  # the id of ",</w>", where the comma backtracking looks; None: no backtracking

    @classmethod
    def of(cls, tokenizer: Any) -> "_SpecialIds":
        """The tokenizer's ids. ``pad_token_id`` decides the padding: diffusers' SD1 (and SDXL
        CLIP-L) tokenizers pad with the end token, SD2 (and SDXL OpenCLIP) ones with "!" (id 0),
        as A1111 (``id_pad = 0`` in sd_hijack_open_clip.py)."""
        end = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        if comma is None or tokenizer.convert_ids_to_tokens(comma) != ",</w>":
            comma = None
        return cls(start=tokenizer.bos_token_id, end=end, pad=end if pad is None else pad, comma=comma)


class _ChunkBuilder:
    """Fills chunks token by token as A1111's ``tokenize_line``."""

    def __init__(self, special: _SpecialIds, comma_backtrack: int) -> None:
        self.special = special
        self.comma_backtrack = comma_backtrack
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1  # position of the last comma in the current chunk

    def add(self, token: int, weight: float) -> None:
        """Append one prompt token; a full chunk is closed first, and then, when the chunk's last
        comma is at most ``comma_backtrack`` tokens back, the tokens after it move to the next one."""
        if token == self.special.comma:
            self.last_comma = len(self.ids)
        elif self._full() and self._comma_close_enough():
            self._move_words_after_comma()
        if self._full():
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def close(self) -> None:
        """The current chunk, padded to 75 tokens and framed by start and end, joins the list."""
        padding = CHUNK_TOKENS - len(self.ids)
        ids = [self.special.start, *self.ids, *[self.special.end] * padding, self.special.end]
        weights = [1.0, *self.weights, *[1.0] * padding, 1.0]
        self.chunks.append(PromptChunk(tuple(_pad_after_end(ids, self.special)), tuple(weights)))
        self.ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> list[PromptChunk]:
        """All chunks: the last one closed when it holds tokens, or when there is no chunk yet."""
        if self.ids or not self.chunks:
            self.close()
        return self.chunks

    def _full(self) -> bool:
        return len(self.ids) == CHUNK_TOKENS

    def _comma_close_enough(self) -> bool:
        return (self.comma_backtrack != 0 and self.last_comma != -1
                and len(self.ids) - self.last_comma <= self.comma_backtrack)

    def _move_words_after_comma(self) -> None:
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.close()
        self.ids, self.weights = moved_ids, moved_weights


def _pad_after_end(ids: list[int], special: _SpecialIds) -> list[int]:
    """A1111's ``process_tokens``: where padding differs from the end token (SD2, SDXL's OpenCLIP),
    every id after the first end token becomes the pad id."""
    if special.pad == special.end:
        return ids
    first_end = ids.index(special.end)
    return ids[:first_end + 1] + [special.pad] * (len(ids) - first_end - 1)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without start/end tokens and without a length limit."""
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def chunk_prompt(tokenizer: Any, text: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """The prompt as A1111 feeds it to a CLIP text encoder: one ``PromptChunk`` per 75 tokens.

    ``tokenizer``: a Hugging Face ``CLIPTokenizer`` (the pipeline's). Each weighted segment is
    tokenized on its own; BREAK closes the current chunk (padding it, even when empty); a chunk
    that fills up while its last comma is at most ``comma_backtrack`` tokens back gives the tokens
    after that comma to the next chunk; an empty prompt is one chunk."""
    segments = parse_attention(text)
    builder = _ChunkBuilder(_SpecialIds.of(tokenizer), comma_backtrack)
    for tokens, (segment_text, weight) in zip(_tokenize(tokenizer, [t for t, _ in segments]), segments):
        if (segment_text, weight) == BREAK:
            builder.close()
            continue
        for token in tokens:
            builder.add(token, weight)
    return builder.finish()


def needed_chunks(tokenizer: Any, text: str) -> int:
    """How many 77-token chunks A1111 encodes ``text`` into (1 for a prompt of up to 75 tokens)."""
    return len(chunk_prompt(tokenizer, text))


def chunk_ids(chunks: Sequence[PromptChunk]) -> torch.Tensor:
    """The chunks' token ids, ``LongTensor[len(chunks), 77]`` (on the CPU)."""
    return torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long)


def chunk_weights(chunks: Sequence[PromptChunk]) -> torch.Tensor:
    """The chunks' token weights, ``float32[len(chunks), 77]`` (on the CPU)."""
    return torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# 3. Encoding


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on ``hidden`` ``[chunks, 77, dim]`` with ``weights``
    ``[chunks, 77]``: per chunk, ``z * weight``, then rescaled by ``mean(z) / mean(z * weight)``
    (means over the whole chunk, all tokens and channels; A1111 encodes one chunk per call).
    Computed in float32 (A1111's float32 multipliers promote a half-precision z), returned in
    ``hidden``'s dtype.

    A chunk whose weights are all 1.0 is returned as it is: bit for bit what A1111 computes
    (``z * 1 * (m / m)``) unless its mean ``m`` is exactly 0, where A1111 divides 0 by 0 (NaN). For
    the same reason a weighted chunk whose weighted mean is exactly 0 is not rescaled. Neither
    happens with trained encoders; a random-weight one's final layer norm (weight 1, bias 0)
    gives a mean of 0."""
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights[..., None]
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    rescale = torch.where(weighted_mean == 0, torch.ones_like(weighted_mean), original_mean / weighted_mean)
    weighted = (weighted * rescale).to(hidden.dtype)
    unweighted_chunks = (weights == 1.0).all(dim=1)[:, None, None]
    return torch.where(unweighted_chunks, hidden, weighted)


def _concatenate_chunks(hidden: torch.Tensor) -> torch.Tensor:
    """``[chunks, 77, dim]`` -> ``[1, chunks * 77, dim]``: the chunks one after the other."""
    return hidden.reshape(1, hidden.shape[0] * hidden.shape[1], hidden.shape[2])


def encode_chunks(encode: Callable[[torch.Tensor], torch.Tensor],
                  chunks: Sequence[PromptChunk]) -> torch.Tensor:
    """The weighted conditioning of one prompt, ``[1, 77 * len(chunks), dim]``.

    ``encode(ids)``: the caller's text encoder, ``LongTensor[n, 77]`` (on the CPU: move it) to the
    chosen hidden layer ``[n, 77, dim]`` (the last layer for SD1, the penultimate one for clip skip
    2, SD2 and SDXL, with or without the final layer norm as the pipeline does); called once, with
    all chunks as the batch."""
    return _concatenate_chunks(apply_weights(encode(chunk_ids(chunks)), chunk_weights(chunks)))


def encode_chunks_with_pooled(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                              chunks: Sequence[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """For SDXL's second text encoder: ``encode(ids)`` returns ``(hidden [n, 77, dim], pooled
    [n, pooled_dim])``; the result is the weighted conditioning ``[1, 77 * len(chunks), dim]`` and
    the pooled embedding of the first chunk, unweighted, ``[1, pooled_dim]`` (as A1111)."""
    hidden, pooled = encode(chunk_ids(chunks))
    return _concatenate_chunks(apply_weights(hidden, chunk_weights(chunks))), pooled[:1]


# ---------------------------------------------------------------------------------------------
# 4. Padding to a chunk count


def chunk_count(embeds: torch.Tensor) -> int:
    """How many 77-token chunks a conditioning ``[batch, 77 * chunks, dim]`` holds."""
    if embeds.dim() != 3 or embeds.shape[1] % CHUNK_LENGTH:
        raise ValueError(f"a conditioning is [batch, 77 * chunks, dim], not {list(embeds.shape)}")
    return embeds.shape[1] // CHUNK_LENGTH


def pad_to_chunks(embeds: torch.Tensor, chunks: int, empty_chunk_embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` ``[batch, 77 * k, dim]`` extended to ``chunks`` chunks with copies of
    ``empty_chunk_embeds`` ``[1, 77, dim]``, the encoding of the empty prompt "" (A1111's
    ``pad_cond``; for SDXL both encoders' encodings of "", concatenated, not zeros). Raises
    ValueError when ``embeds`` already has more than ``chunks`` chunks."""
    missing = chunks - chunk_count(embeds)
    if missing < 0:
        raise ValueError(f"the conditioning has {chunk_count(embeds)} chunks, more than {chunks}")
    if missing == 0:
        return embeds
    if tuple(empty_chunk_embeds.shape) != (1, CHUNK_LENGTH, embeds.shape[2]):
        raise ValueError(f"the empty prompt's encoding is [1, 77, {embeds.shape[2]}], "
                         f"not {list(empty_chunk_embeds.shape)}")
    padding = empty_chunk_embeds.to(embeds).repeat(embeds.shape[0], missing, 1)
    return torch.cat([embeds, padding], dim=1)


def pad_to_same_chunks(cond: torch.Tensor, uncond: torch.Tensor,
                       empty_chunk_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and negative prompt conditionings, the shorter one padded to the other's chunk count
    (A1111's ``pad_cond_uncond``, its "Pad prompt/negative prompt" option)."""
    chunks = max(chunk_count(cond), chunk_count(uncond))
    return pad_to_chunks(cond, chunks, empty_chunk_embeds), pad_to_chunks(uncond, chunks, empty_chunk_embeds)


__all__ = [
    "BREAK", "CHUNK_LENGTH", "CHUNK_TOKENS", "COMMA_BACKTRACK", "PromptChunk", "apply_weights", "chunk_count",
    "chunk_ids", "chunk_prompt", "chunk_weights", "encode_chunks", "encode_chunks_with_pooled", "is_plain",
    "needed_chunks", "pad_to_chunks", "pad_to_same_chunks", "parse_attention",
]
