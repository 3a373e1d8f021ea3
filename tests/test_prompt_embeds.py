"""A1111 prompt syntax through the engine: weighted and long prompts on the compiled (TorchScript)
and eager backends equal plain diffusers fed with embeddings built here by hand, from the tokens
(not with the engine's chunker); long prompts need compiled ``prompt_chunks`` on fixed shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine import GenerateRequest, InvalidRequest, Size

SEED, STEPS, CFG = 17, 4, 6.5
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def long_prompt(tokens: int) -> str:
    """One-letter words: one token each in the tiny character-level vocabulary (checked below)."""
    return " ".join(LETTERS[i % 26] for i in range(tokens))


@pytest.fixture(scope="module")
def chunk_dir(tiny_dir, tmp_path_factory) -> Path:
    """tiny-sd15 / tiny-sdxl compiled with prompt_chunks [1, 2] (and tiny-sd15 with [1] only)."""
    from engine.backends import make_backend
    from engine.compile import compile_all
    from engine.registry import load_registry

    directory = tmp_path_factory.mktemp("chunks")
    biased_text_encoder(tiny_dir / "tiny-sd15", directory / "tiny-sd15-biased")
    models = [
        {"id": "sd15-2chunks", "family": "sd15", "source": {"local": str(directory / "tiny-sd15-biased")},
         "resolutions": ["64x64"], "batch_sizes": [1, 2], "prompt_chunks": [2],
         "defaults": {"sampler": "Euler", "steps": STEPS, "cfg_scale": CFG}},
        {"id": "sd15-1chunk", "family": "sd15", "source": {"local": str(directory / "tiny-sd15-biased")},
         "resolutions": ["64x64"], "defaults": {"sampler": "Euler", "steps": STEPS, "cfg_scale": CFG}},
        {"id": "sdxl-2chunks", "family": "sdxl", "source": {"local": str(tiny_dir / "tiny-sdxl")},
         "resolutions": ["64x64"], "prompt_chunks": [1, 2],
         "defaults": {"sampler": "Euler", "steps": STEPS, "cfg_scale": CFG}},
    ]
    path = directory / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "default_model": "sd15-2chunks", "models": models}))
    outcomes = compile_all(load_registry(path), make_backend("cpu"), log=lambda line: None)
    assert [o.state for o in outcomes] == ["compiled"] * 3, outcomes
    return directory


def biased_text_encoder(source: Path, target: Path) -> None:
    """tiny-sd15 with a bias on the text encoder's final layer norm: random weights give hidden
    states of mean ~1e-8 (A1111's mean restoration would divide by it); a real CLIP's is not 0."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm.bias += 0.3  # transformers 4 / 5
    pipe.save_pretrained(target, safe_serialization=True)


@pytest.fixture(scope="module")
def engines(chunk_dir):
    from engine import Engine, EngineSettings
    from engine.backends import make_backend
    from engine.registry import load_registry

    registry = load_registry(chunk_dir / "model_registry.yaml")
    made = {name: Engine(registry, make_backend(name), EngineSettings(max_warm=3, batch_wait_s=0.3))
            for name in ("cpu", "eager")}
    yield made
    for engine in made.values():
        engine.close()


@pytest.fixture(scope="module")
def sd15(chunk_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(chunk_dir / "tiny-sd15-biased", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ids_of(tokenizer, words: str) -> list[int]:
    return tokenizer(words, add_special_tokens=False).input_ids


def chunk(tokenizer, ids: list[int]) -> torch.Tensor:
    """One 77-token chunk as A1111 lays it out for SD1: start, the ids, end, padded with end."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    return torch.tensor([[start, *ids, end] + [end] * (75 - len(ids))])


def encode(pipe, ids: torch.Tensor, weights: dict[int, float] | None = None) -> torch.Tensor:
    """The last hidden state, token ``i`` scaled by ``weights[i]``, the chunk's mean restored."""
    with torch.no_grad():
        z = pipe.text_encoder(ids)[0]
    if not weights:
        return z
    mean = z.mean()
    for position, weight in weights.items():
        z[:, position] = z[:, position] * weight
    return z * (mean / z.mean())


def by_hand(pipe, cond: torch.Tensor, uncond: torch.Tensor) -> np.ndarray:
    image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=CFG,
                 width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image, dtype=np.int16)


def ours(engine, prompt: str, negative: str = "", model: str = "sd15-2chunks"):
    result = engine.generate(GenerateRequest(model=model, prompt=prompt, negative_prompt=negative, sampler="Euler",
                                             steps=STEPS, cfg_scale=CFG, seed=SEED, size=Size(64, 64)))
    return np.asarray(result.images[0].image, dtype=np.int16), result


def test_the_test_words_are_one_token_each(sd15):
    assert len(ids_of(sd15.tokenizer, long_prompt(100))) == 100


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_weighted_word_equals_diffusers_with_that_tokens_embedding_scaled(engines, sd15, backend):
    tok = sd15.tokenizer
    ids = ids_of(tok, "a b c")
    cond = encode(sd15, chunk(tok, ids), {2: 1.5})  # position 0 is the start token: "b" is at 2
    uncond = encode(sd15, chunk(tok, ids_of(tok, "blurry")))
    image, _ = ours(engines[backend], "a (b:1.5) c", "blurry")
    assert np.abs(image - by_hand(sd15, cond, uncond)).max() <= 1
    heavy, _ = ours(engines[backend], "(a b c:3) d e f", "blurry")  # the mean restoration matters here
    cond = encode(sd15, chunk(tok, ids_of(tok, "a b c d e f")), {1: 3.0, 2: 3.0, 3: 3.0})
    assert np.abs(heavy - by_hand(sd15, cond, uncond)).max() <= 1
    nested, _ = ours(engines[backend], "a ((b)) c", "blurry")  # x1.1 x1.1
    cond = encode(sd15, chunk(tok, ids), {2: 1.1 * 1.1})
    assert np.abs(nested - by_hand(sd15, cond, uncond)).max() <= 1


def test_escaped_brackets_are_text_and_plain_prompts_keep_diffusers_own_path(engines, sd15):
    tok = sd15.tokenizer
    plain, _ = ours(engines["cpu"], "a red ball", "blurry")
    expected = sd15(prompt="a red ball", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=CFG,
                    width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(plain - np.asarray(expected, dtype=np.int16)).max() <= 1
    escaped, _ = ours(engines["cpu"], r"a \(red\) ball", "blurry")
    cond = encode(sd15, chunk(tok, ids_of(tok, "a (red) ball")))
    assert np.abs(escaped - by_hand(sd15, cond, encode(sd15, chunk(tok, ids_of(tok, "blurry"))))).max() <= 1
    weighted, _ = ours(engines["cpu"], "a (red) ball", "blurry")
    assert np.abs(weighted - escaped).max() > 0


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_long_prompt_is_read_in_two_chunks_as_a1111(engines, sd15, backend):
    """100 tokens: chunk 1 holds 75, chunk 2 the other 25; the negative prompt (one chunk) is padded
    with the empty prompt's chunk to the same length."""
    tok = sd15.tokenizer
    ids = ids_of(tok, long_prompt(100))
    cond = torch.cat([encode(sd15, chunk(tok, ids[:75])), encode(sd15, chunk(tok, ids[75:]))], dim=1)
    uncond = torch.cat([encode(sd15, chunk(tok, ids_of(tok, "blurry"))), encode(sd15, chunk(tok, []))], dim=1)
    image, result = ours(engines[backend], long_prompt(100), "blurry")
    assert result.notices == ()
    assert np.abs(image - by_hand(sd15, cond, uncond)).max() <= 1
    cut, _ = ours(engines[backend], long_prompt(75), "blurry")
    assert np.abs(image - cut).max() > 0  # the last 25 words count


def test_break_starts_a_new_chunk(engines, sd15):
    tok = sd15.tokenizer
    image, _ = ours(engines["cpu"], "castle river BREAK dragon", "")
    cond = torch.cat([encode(sd15, chunk(tok, ids_of(tok, "castle river"))),
                      encode(sd15, chunk(tok, ids_of(tok, "dragon")))], dim=1)  # BREAK is not text
    empty = encode(sd15, chunk(tok, []))
    assert np.abs(image - by_hand(sd15, cond, torch.cat([empty, empty], dim=1))).max() <= 1


def test_more_chunks_than_compiled_are_cut_with_a_notice_naming_prompt_chunks(engines, chunk_dir):
    image, result = ours(engines["cpu"], long_prompt(100), model="sd15-1chunk")
    registry = chunk_dir / "model_registry.yaml"
    assert result.notices == (
        'the prompt is 100 tokens in 2 chunks and the model reads 1 chunk: these words were ignored: "'
        + long_prompt(100).split(" ", 75)[-1] + '". (sd15-1chunk is compiled for prompts of up to 1 chunk of 75 '
        f"tokens; to read it all, add 2 to prompt_chunks of sd15-1chunk in {registry} and recompile)",)
    cut, _ = ours(engines["cpu"], long_prompt(75), model="sd15-1chunk")
    assert np.array_equal(image, cut)
    _, result = ours(engines["cpu"], " BREAK ".join(["castle", "river", "dragon"]), model="sd15-2chunks")
    assert result.notices == (
        'the prompt is 17 tokens in 3 chunks and the model reads 2 chunks: these words were ignored: "dragon". '
        "(sd15-2chunks is compiled for prompts of up to 2 chunks of 75 tokens; to read it all, add 3 to "
        f"prompt_chunks of sd15-2chunks in {registry} and recompile)",)
    _, result = ours(engines["eager"], " BREAK ".join(["a"] * 9), model="sd15-2chunks")
    assert result.notices == ('the prompt is 9 tokens in 9 chunks and the model reads 8 chunks: these words were '
                              'ignored: "a". (at most 8 chunks of 75 tokens are read here: shorten it)',)
    with pytest.raises(InvalidRequest, match=r"the prompt weight '1\.2\.3' is not a number \(in '\(a:1\.2\.3\)'\): "
                                             r"write a weight as \(word:1\.3\)"):
        engines["cpu"].submit(GenerateRequest(model="sd15-2chunks", prompt="(a:1.2.3)"))


def test_sdxl_weighted_long_prompts_match_between_compiled_and_eager(engines):
    prompt = "a (castle:1.3) by the [river], " + long_prompt(90)
    compiled, _ = ours(engines["cpu"], prompt, "blurry", model="sdxl-2chunks")
    eager, _ = ours(engines["eager"], prompt, "blurry", model="sdxl-2chunks")
    plain, _ = ours(engines["cpu"], "a castle by the river", "blurry", model="sdxl-2chunks")
    assert np.abs(compiled - eager).max() <= 1 and np.abs(compiled - plain).max() > 0


def test_requests_batch_only_with_the_same_prompt_length(engines):
    engine = engines["cpu"]
    prompts = [long_prompt(100), "a (b:1.2) c", long_prompt(90)]
    alone = [ours(engine, p)[0] for p in prompts]
    jobs = [engine.submit(GenerateRequest(model="sd15-2chunks", prompt=p, sampler="Euler", steps=STEPS, cfg_scale=CFG,
                                          seed=SEED, size=Size(64, 64))) for p in prompts]
    results = [job.result() for job in jobs]
    assert [r.batch_requests for r in results] == [2, 1, 2]  # the two long prompts ran together
    for result, expected in zip(results, alone):
        assert np.abs(np.asarray(result.images[0].image, dtype=np.int16) - expected).max() <= 1


def test_each_prompt_length_is_its_own_compiled_unet(chunk_dir):
    from engine import artifacts
    from engine.registry import load_registry

    registry = load_registry(chunk_dir / "model_registry.yaml")
    manifest = artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, "sd15-2chunks", Size(64, 64),
                                                             "cpu"))
    assert manifest["prompt_chunks"] == [1, 2]
    assert sorted(n for n in manifest["components"] if n.startswith("unet")) == ["unet", "unet_b2", "unet_b2_c2",
                                                                                 "unet_c2"]
