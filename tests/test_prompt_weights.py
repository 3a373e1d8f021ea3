"""engine.prompt_weights: A1111's prompt weighting, BREAK and 75-token chunking.

Every expected value is written out by hand from A1111's algorithm (modules/prompt_parser.py,
modules/sd_hijack_clip.py, modules/sd_emphasis.py, modules/sd_samplers_cfg_denoiser.py).

The tokenizer is tests/make_tiny_models.py's character-level CLIP vocabulary, so ids are easy to
work out: start 0, end 1; the character at index i of CHARS ("a".."z", "0".."9", ".,!?'-()") is
2 + i inside a word and 46 + i at a word's end. Every one-letter word below is therefore
a=46, b=47, c=48, d=49; the comma ",</w>" is 83; "!" (SD2's pad token) is 40.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.prompt_weights import (
    PromptChunk, chunk_count, chunk_prompt, encode_chunks, encode_chunks_with_pooled, is_plain, needed_chunks,
    pad_to_chunks, pad_to_same_chunks, parse_attention,
)

START, END, SD2_PAD = 0, 1, 40
A, B, C, D, COMMA = 46, 47, 48, 49, 83
DOWN = 0.9090909090909091  # 1 / 1.1, A1111's square-bracket multiplier


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_tiny_models import write_tokenizer

    directory = tmp_path_factory.mktemp("clip-tokenizer")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def sd1_tokenizer(tokenizer_files: Path):
    """As diffusers' SD1 tokenizer: pads with the end token."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_files)


@pytest.fixture(scope="module")
def sd2_tokenizer(tokenizer_files: Path):
    """As diffusers' SD2 / SDXL tokenizer_2: pads with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"), pad_token="!")


def words(letter: str, count: int) -> str:
    return " ".join([letter] * count)


# ---------------------------------------------------------------------------------------------
# parse_attention


A1111_DOCSTRING_EXAMPLES = [  # parse_prompt_attention's own doctests, verbatim
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

OWN_CASES = [
    ("", [("", 1.0)]),
    ("[word]", [("word", DOWN)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("a (word:0.5) b", [("a ", 1.0), ("word", 0.5), (" b", 1.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:0)", [("word", 0.0)]),
    ("((word))", [("word", 1.2100000000000002)]),  # 1.1 * 1.1
    ("[[word]]", [("word", 0.8264462809917354)]),  # (1 / 1.1) * (1 / 1.1)
    ("([word])", [("word", 1.0)]),  # (1 / 1.1) * 1.1 is exactly 1.0
    ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),  # equal weights merge only when neighbours
    ("[a][b]", [("ab", DOWN)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),  # \\ is a backslash
    ("\\[a\\] \\(b\\)", [("[a] (b)", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),  # escaped characters take their brackets' weight
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("a) b] c", [("a) b] c", 1.0)]),  # a closing bracket with no opener is text
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # so is a weighted close with no opener
    ("[a:1.2) b]", [("a:1.2) b", DOWN)]),  # ":1.2)" closes round brackets only
    ("a: b", [("a: b", 1.0)]),
    ("(a:1e3)", [("a:1e3", 1.1)]),  # "1e3" is no weight: ":" and "1e3" are text, ")" closes at 1.1
    ("[a", [("a", DOWN)]),
    ("(a [b", [("a ", 1.1), ("b", 1.0)]),  # unclosed: round first, then square, over the rest
    ("[a:b:0.5]", [("a:b:0.5", DOWN)]),  # prompt editing is not parsed here: text in square brackets
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK (b)", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ("aBREAK b BREAKS break", [("aBREAK b BREAKS break", 1.0)]),  # only the whole, upper-case word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 quirk: BREAK's -1 is scaled too
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING_EXAMPLES + OWN_CASES)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:-.)"])
def test_a_weight_that_is_not_a_number_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="is not a number"):
        parse_attention(text)


@pytest.mark.parametrize("text, plain", [
    ("a cat, on a mat", True), ("", True), ("a: b", True), ("a cat!", True), ("a) b", True),
    ("a (cat)", False), ("a [cat]", False), ("(cat:1)", False), ("(cat:1.0)", False), ("a BREAK b", False),
    ("BREAK", False), ("a \\(cat\\)", False), ("a\\b", False), ("[a:b:0.5]", False), ("(a", False),
])
def test_is_plain(text: str, plain: bool) -> None:
    assert is_plain(text) is plain


# ---------------------------------------------------------------------------------------------
# chunk_prompt


def test_a_short_prompt_is_one_chunk_padded_with_the_end_token(sd1_tokenizer) -> None:
    assert chunk_prompt(sd1_tokenizer, "a b, c") == [
        PromptChunk(ids=(START, A, B, COMMA, C, *[END] * 72), weights=(1.0,) * 77)]


def test_the_sd2_tokenizer_pads_with_its_pad_token_after_the_end_token(sd2_tokenizer) -> None:
    assert chunk_prompt(sd2_tokenizer, "a b, c") == [
        PromptChunk(ids=(START, A, B, COMMA, C, END, *[SD2_PAD] * 71), weights=(1.0,) * 77)]


@pytest.mark.parametrize("tokenizer_name, ids", [
    ("sd1_tokenizer", (START, *[END] * 76)),
    ("sd2_tokenizer", (START, END, *[SD2_PAD] * 75)),
])
def test_an_empty_prompt_is_one_chunk(tokenizer_name: str, ids: tuple[int, ...], request) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    assert chunk_prompt(tokenizer, "") == [PromptChunk(ids=ids, weights=(1.0,) * 77)]
    assert needed_chunks(tokenizer, "") == 1


@pytest.mark.parametrize("tokenizer_name", ["sd1_tokenizer", "sd2_tokenizer"])
@pytest.mark.parametrize("prompt", ["", "a cat, on a mat", words("a", 75), words("a", 80)])
def test_a_plain_prompt_gets_the_ids_the_diffusers_pipeline_gives_its_first_75_tokens(
        tokenizer_name: str, prompt: str, request) -> None:
    """Diffusers' encode_prompt: tokenizer(padding="max_length", max_length=77, truncation=True)."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    diffusers_ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert list(chunk_prompt(tokenizer, prompt)[0].ids) == diffusers_ids


def test_weights_follow_their_tokens(sd1_tokenizer) -> None:
    assert chunk_prompt(sd1_tokenizer, "a (b) [c] (d:1.5)") == [PromptChunk(
        ids=(START, A, B, C, D, *[END] * 72), weights=(1.0, 1.0, 1.1, DOWN, 1.5, *[1.0] * 72))]


def test_75_tokens_fill_one_chunk_and_the_76th_starts_the_next(sd1_tokenizer) -> None:
    assert chunk_prompt(sd1_tokenizer, words("a", 75)) == [PromptChunk((START, *[A] * 75, END), (1.0,) * 77)]
    assert chunk_prompt(sd1_tokenizer, words("a", 76)) == [
        PromptChunk((START, *[A] * 75, END), (1.0,) * 77),
        PromptChunk((START, A, *[END] * 75), (1.0,) * 77),
    ]


@pytest.mark.parametrize("count, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (225, 3), (226, 4)])
def test_needed_chunks(sd1_tokenizer, count: int, chunks: int) -> None:
    assert needed_chunks(sd1_tokenizer, words("a", count)) == chunks


def test_break_pads_the_chunk_and_starts_a_new_one(sd1_tokenizer, sd2_tokenizer) -> None:
    assert chunk_prompt(sd1_tokenizer, "a BREAK b") == [
        PromptChunk((START, A, *[END] * 75), (1.0,) * 77),
        PromptChunk((START, B, *[END] * 75), (1.0,) * 77),
    ]
    assert chunk_prompt(sd2_tokenizer, "a BREAK b") == [
        PromptChunk((START, A, END, *[SD2_PAD] * 74), (1.0,) * 77),
        PromptChunk((START, B, END, *[SD2_PAD] * 74), (1.0,) * 77),
    ]


def test_break_at_the_start_gives_an_empty_chunk_and_at_the_end_nothing(sd1_tokenizer) -> None:
    empty = PromptChunk((START, *[END] * 76), (1.0,) * 77)
    assert chunk_prompt(sd1_tokenizer, "BREAK a") == [empty, PromptChunk((START, A, *[END] * 75), (1.0,) * 77)]
    assert chunk_prompt(sd1_tokenizer, "a BREAK") == [PromptChunk((START, A, *[END] * 75), (1.0,) * 77)]
    assert chunk_prompt(sd1_tokenizer, "BREAK") == [empty]
    assert needed_chunks(sd1_tokenizer, "a BREAK BREAK b") == 3


def test_a_break_inside_brackets_is_read_as_the_word_with_its_scaled_weight(sd1_tokenizer) -> None:
    """A1111 quirk: "(a BREAK b)" parses BREAK at -1.1, which is no BREAK: "break" is tokenized."""
    b, r, e, a, k = 3, 19, 6, 2, 56  # "b", "r", "e", "a" inside a word, "k</w>" at its end
    assert chunk_prompt(sd1_tokenizer, "(a BREAK b)") == [PromptChunk(
        ids=(START, A, b, r, e, a, k, B, *[END] * 69),
        weights=(1.0, 1.1, -1.1, -1.1, -1.1, -1.1, -1.1, 1.1, *[1.0] * 69))]


def test_a_comma_20_tokens_back_moves_the_words_after_it_to_the_next_chunk(sd1_tokenizer, sd2_tokenizer) -> None:
    """55 a, a comma at position 55, 19 weighted b: the chunk is full; "c" arrives, the comma is
    75 - 55 = 20 tokens back: the 19 b (with their weights) move to the next chunk."""
    prompt = f"{words('a', 55)}, ({words('b', 19)}) c"
    assert chunk_prompt(sd1_tokenizer, prompt) == [
        PromptChunk((START, *[A] * 55, COMMA, *[END] * 20), (1.0,) * 77),
        PromptChunk((START, *[B] * 19, C, *[END] * 56), (1.0, *[1.1] * 19, *[1.0] * 57)),
    ]
    assert chunk_prompt(sd2_tokenizer, prompt) == [
        PromptChunk((START, *[A] * 55, COMMA, END, *[SD2_PAD] * 19), (1.0,) * 77),
        PromptChunk((START, *[B] * 19, C, END, *[SD2_PAD] * 55), (1.0, *[1.1] * 19, *[1.0] * 57)),
    ]


def test_a_comma_21_tokens_back_stays(sd1_tokenizer) -> None:
    prompt = f"{words('a', 54)}, ({words('b', 20)}) c"
    assert chunk_prompt(sd1_tokenizer, prompt) == [
        PromptChunk((START, *[A] * 54, COMMA, *[B] * 20, END), (1.0,) * 56 + (1.1,) * 20 + (1.0,)),
        PromptChunk((START, C, *[END] * 75), (1.0,) * 77),
    ]


def test_comma_backtracking_can_be_turned_off(sd1_tokenizer) -> None:
    prompt = f"{words('a', 55)}, {words('b', 19)} c"
    assert chunk_prompt(sd1_tokenizer, prompt, comma_backtrack=0) == [
        PromptChunk((START, *[A] * 55, COMMA, *[B] * 19, END), (1.0,) * 77),
        PromptChunk((START, C, *[END] * 75), (1.0,) * 77),
    ]


def test_a_prompt_that_ends_on_a_full_chunk_does_not_backtrack(sd1_tokenizer) -> None:
    """Backtracking happens only when a 76th token arrives."""
    assert chunk_prompt(sd1_tokenizer, f"{words('a', 60)}, {words('b', 14)}") == [
        PromptChunk((START, *[A] * 60, COMMA, *[B] * 14, END), (1.0,) * 77)]


def test_a_comma_that_arrives_on_a_full_chunk_starts_the_next(sd1_tokenizer) -> None:
    assert chunk_prompt(sd1_tokenizer, f"{words('a', 75)}, b") == [
        PromptChunk((START, *[A] * 75, END), (1.0,) * 77),
        PromptChunk((START, COMMA, B, *[END] * 74), (1.0,) * 77),
    ]


def test_a_chunk_is_77_ids_and_77_weights() -> None:
    with pytest.raises(ValueError):
        PromptChunk(ids=(START, END), weights=(1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# encode_chunks


def constant_per_chunk(ids: torch.Tensor) -> torch.Tensor:
    """A fake text encoder: chunk i's hidden states are all i + 1, two channels."""
    return torch.arange(1, ids.shape[0] + 1, dtype=torch.float32)[:, None, None].expand(-1, 77, 2).clone()


def test_weighting_restores_each_chunks_mean(sd1_tokenizer) -> None:
    """Chunk 0 is all 1.0 with weight 2 on token 1: the weighted mean is (76 + 2) / 77 = 78/77, so
    everything is scaled by 77/78: 77/78 for weight 1, 154/78 for weight 2. Chunk 1 (all 2.0,
    weights 1) is untouched: the mean is taken per chunk, not over the prompt."""
    chunks = chunk_prompt(sd1_tokenizer, "(b:2) BREAK a")
    received = []
    embeds = encode_chunks(lambda ids: received.append(ids) or constant_per_chunk(ids), chunks)
    assert received[0].tolist() == [[START, B, *[END] * 75], [START, A, *[END] * 75]]
    expected = torch.full((1, 154, 2), 77 / 78)
    expected[0, 1, :] = 154 / 78
    expected[0, 77:, :] = 2.0
    torch.testing.assert_close(embeds, expected)


def test_weighting_scales_every_channel_by_the_same_factor(sd1_tokenizer) -> None:
    """Tokens [1, 3]: mean 2; weight 2 on token 1: the weighted mean is (77 * 4 + 4) / 154 = 312/154,
    the factor 2 / (312/154) = 77/78, for both channels."""
    hidden = torch.tensor([1.0, 3.0]).expand(1, 77, 2).clone()
    embeds = encode_chunks(lambda ids: hidden, chunk_prompt(sd1_tokenizer, "(b:2)"))
    expected = torch.tensor([77 / 78, 231 / 78]).expand(1, 77, 2).clone()
    expected[0, 1] = torch.tensor([154 / 78, 462 / 78])
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(embeds.mean(), torch.tensor(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_of_one_leave_the_encoder_output_exactly(sd1_tokenizer, dtype: torch.dtype) -> None:
    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    embeds = encode_chunks(lambda ids: hidden, chunk_prompt(sd1_tokenizer, f"{words('a', 80)}, b c"))
    assert embeds.dtype == dtype
    assert torch.equal(embeds, hidden.reshape(1, 154, 8))


def test_a_chunk_with_a_mean_of_zero_gives_no_nan(sd1_tokenizer) -> None:
    """Every token [1, -1] (mean 0, as after a random encoder's final layer norm): A1111 would
    divide 0 by 0. Unweighted chunks come back as they are; a weighted one whose weighted mean is
    still 0 is weighted but not rescaled."""
    hidden = torch.tensor([1.0, -1.0]).expand(2, 77, 2).clone()
    embeds = encode_chunks(lambda ids: hidden, chunk_prompt(sd1_tokenizer, "(b:2) BREAK a"))
    expected = torch.tensor([1.0, -1.0]).expand(1, 154, 2).clone()
    expected[0, 1] = torch.tensor([2.0, -2.0])
    assert torch.equal(embeds, expected)


@pytest.mark.parametrize("tokenizer_name", ["sd1_tokenizer", "sd2_tokenizer"])
def test_a_plain_prompt_encodes_exactly_as_the_diffusers_pipeline(tokenizer_name: str, request) -> None:
    """Through a real (tiny, random) CLIP text encoder: the same ids and weights of 1.0 give the
    diffusers pipeline's prompt_embeds bit for bit."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = request.getfixturevalue(tokenizer_name)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=90, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=START, eos_token_id=END, pad_token_id=END)).eval()
    prompt = "a cat, on a mat"
    with torch.no_grad():
        diffusers_ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        expected = encoder(diffusers_ids).last_hidden_state
        embeds = encode_chunks(lambda ids: encoder(ids).last_hidden_state, chunk_prompt(tokenizer, prompt))
    assert torch.equal(embeds, expected)


def test_sdxl_pooled_is_the_first_chunks_unweighted(sd2_tokenizer) -> None:
    def encode(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])[: ids.shape[0]]
        return constant_per_chunk(ids), pooled

    embeds, pooled = encode_chunks_with_pooled(encode, chunk_prompt(sd2_tokenizer, "(b:2) BREAK a"))
    assert pooled.tolist() == [[10.0, 11.0, 12.0]]
    expected = torch.full((1, 154, 2), 77 / 78)
    expected[0, 1, :] = 154 / 78
    expected[0, 77:, :] = 2.0
    torch.testing.assert_close(embeds, expected)


# ---------------------------------------------------------------------------------------------
# pad_to_chunks


def test_pad_to_chunks_appends_the_empty_prompts_encoding() -> None:
    embeds = torch.zeros(2, 77, 3)
    empty = torch.ones(1, 77, 3)
    padded = pad_to_chunks(embeds, 3, empty)
    assert padded.shape == (2, 231, 3)
    assert torch.equal(padded[:, :77], torch.zeros(2, 77, 3))
    assert torch.equal(padded[:, 77:], torch.ones(2, 154, 3))
    assert pad_to_chunks(embeds, 1, empty) is embeds
    assert chunk_count(padded) == 3


def test_pad_to_same_chunks_pads_the_shorter_of_prompt_and_negative_prompt() -> None:
    cond = torch.full((1, 154, 3), 5.0)
    uncond = torch.zeros(1, 77, 3)
    empty = torch.full((1, 77, 3), 7.0)
    padded_cond, padded_uncond = pad_to_same_chunks(cond, uncond, empty)
    assert padded_cond is cond
    assert torch.equal(padded_uncond, torch.cat([torch.zeros(1, 77, 3), torch.full((1, 77, 3), 7.0)], dim=1))
    padded_uncond, padded_cond = pad_to_same_chunks(uncond, cond, empty)
    assert padded_uncond.shape == padded_cond.shape == (1, 154, 3)


def test_pad_to_chunks_refuses_to_shorten_and_checks_shapes() -> None:
    with pytest.raises(ValueError, match="more than"):
        pad_to_chunks(torch.zeros(1, 154, 3), 1, torch.ones(1, 77, 3))
    with pytest.raises(ValueError):
        pad_to_chunks(torch.zeros(1, 77, 3), 2, torch.ones(1, 77, 4))
    with pytest.raises(ValueError):
        chunk_count(torch.zeros(1, 76, 3))
