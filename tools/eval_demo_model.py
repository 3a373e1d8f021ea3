"""Measure how well the demo model follows prompts, with plain diffusers pipelines.

Generates a fixed set of prompts (fixed seeds) and scores the images with
:mod:`tools.scene_eval`.  Examples::

    python -m tools.eval_demo_model                       # model's own scheduler, 20 steps, CFG 5
    python -m tools.eval_demo_model --sampler "Euler a" --steps 30 --cfg 5
    python -m tools.eval_demo_model --all-samplers --negative-check --img2img-check
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from engine.samplers import SAMPLERS
from engine.samplers import make_scheduler as make_engine_scheduler
from tools.demo_scenes import Scene, caption, render, sample_scenes
from tools.scene_eval import classify, score

DEFAULT_MODEL = Path("models/demo-shapes")
DEFAULT_SAMPLER = "default"
EVAL_SEED = 2024

MIN_STEPS: dict[str, int] = {"LMS": 50, "PLMS": 50}
"""Steps LMS and PLMS (4th-order linear multistep) get in ``--all-samplers`` (they diverge at 20
steps with this small model at CFG >= 5; 50 was the original SD 1.x PLMS default)."""


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler: the model's own for ``default``, else the engine's A1111 sampler mapping."""
    if name == DEFAULT_SAMPLER:
        return getattr(diffusers, base_config["_class_name"]).from_config(dict(base_config))
    return make_engine_scheduler(name, base_config)


def eval_prompts(n: int = 36) -> list[str]:
    """The fixed evaluation prompts: captions of seeded scenes, every other one with its size."""
    return [caption(s, with_size=i % 2 == 0) for i, s in enumerate(sample_scenes(n, seed=EVAL_SEED))]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def load_pipeline(model: Path) -> StableDiffusionPipeline:
    """The demo model as an ordinary ``StableDiffusionPipeline`` on CPU."""
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: str,
    steps: int,
    cfg: float,
    negative: str | None = None,
) -> list[Image.Image]:
    """Text-to-image for each prompt with its own seed, as one batch."""
    pipe.scheduler = make_scheduler(sampler, dict(pipe.scheduler.config))
    return pipe(
        list(prompts),
        negative_prompt=[negative] * len(prompts) if negative is not None else None,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=generators(seeds),
    ).images


def evaluate_sampler(
    pipe: StableDiffusionPipeline, sampler: str, steps: int, cfg: float, prompts: Sequence[str]
) -> dict[str, float]:
    """Accuracies of one sampler over the prompt set (seed i for prompt i), plus seconds taken."""
    start = time.time()
    images = generate(pipe, prompts, range(len(prompts)), sampler, steps, cfg)
    return {**score(prompts, images), "seconds": time.time() - start}


def negative_prompt_check(
    pipe: StableDiffusionPipeline, sampler: str, steps: int, cfg: float, n_seeds: int
) -> dict[str, float]:
    """How often "a circle on a blue background" comes out red, without and with negative "red"."""
    prompts, seeds = ["a circle on a blue background"] * n_seeds, range(n_seeds)
    result = {}
    for label, negative in (("without", None), ("with", "red")):
        guesses = [classify(im) for im in generate(pipe, prompts, seeds, sampler, steps, cfg, negative)]
        result[f"red_{label}"] = float(np.mean([g.fg == "red" for g in guesses]))
        result[f"circle_{label}"] = float(np.mean([g.shape == "circle" for g in guesses]))
    return result


def img2img_check(
    pipe: StableDiffusionPipeline, sampler: str, steps: int, cfg: float, strengths: Sequence[float], n_seeds: int
) -> dict[float, dict[str, float]]:
    """From rendered red circles, ask for a blue circle; rate of blue / red results per strength."""
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(sampler, dict(pipe.scheduler.config))
    sources = [Scene(fg="red", bg=bg, shape="circle", size="large") for bg in ("white", "yellow", "black")]
    result = {}
    for strength in strengths:
        guesses = []
        for source in sources:
            out = img2img(
                [f"a blue circle on a {source.bg} background"] * n_seeds,
                image=[render(source)] * n_seeds,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=cfg,
                generator=generators(range(n_seeds)),
            ).images
            guesses += [classify(im) for im in out]
        result[strength] = {c: float(np.mean([g.fg == c for g in guesses])) for c in ("blue", "red")}
        result[strength]["circle"] = float(np.mean([g.shape == "circle" for g in guesses]))
    return result


def save_grid(images: Sequence[Image.Image], path: Path, columns: int = 9) -> None:
    """Save images side by side, ``columns`` per row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    grid.save(path)


def percent(x: float) -> str:
    """0.905 -> '90.5%'."""
    return f"{100 * x:.1f}%"


def print_table(rows: dict[str, dict[str, float]], steps: dict[str, int]) -> None:
    """Markdown table of per-sampler accuracies."""
    print("| sampler | steps | fg color | bg color | shape | size | all | time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [percent(r[k]) for k in ("fg", "bg", "shape", "size", "all")]
        print(f"| {name} | {steps[name]} | " + " | ".join(cells) + f" | {r['seconds']:.0f}s |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"'{DEFAULT_SAMPLER}' or one of: {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--prompts", type=int, default=36, help="number of evaluation prompts (>= 30)")
    p.add_argument("--all-samplers", action="store_true", help="also evaluate every sampler in SAMPLERS")
    p.add_argument("--negative-check", action="store_true")
    p.add_argument("--negative-seeds", type=int, nargs="+", default=[10])
    p.add_argument("--img2img-check", action="store_true")
    p.add_argument("--img2img-seeds", type=int, default=4)
    p.add_argument("--grid", type=Path, help="save the default sampler's images to this PNG")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the requested evaluations and print the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    prompts = eval_prompts(args.prompts)
    print(f"model {args.model}, scheduler {pipe.scheduler.config['_class_name']}, {len(prompts)} prompts, cfg {args.cfg}")

    names = [args.sampler] + (list(SAMPLERS) if args.all_samplers else [])
    steps = {name: max(args.steps, MIN_STEPS.get(name, 0)) if args.all_samplers else args.steps for name in names}
    rows = {name: evaluate_sampler(pipe, name, steps[name], args.cfg, prompts) for name in names}
    print_table(rows, steps)

    if args.grid:
        save_grid(generate(pipe, prompts, range(len(prompts)), args.sampler, args.steps, args.cfg), args.grid)
    if args.negative_check:
        for n in args.negative_seeds:
            r = negative_prompt_check(pipe, args.sampler, args.steps, args.cfg, n)
            print(f"negative prompt, {n} seeds: red circle {percent(r['red_without'])} without "
                  f"'red' vs {percent(r['red_with'])} with; circle shape {percent(r['circle_without'])} / "
                  f"{percent(r['circle_with'])}")
    if args.img2img_check:
        for strength, r in img2img_check(pipe, args.sampler, args.steps, args.cfg, (0.8, 0.1), args.img2img_seeds).items():
            print(f"img2img red circle -> 'a blue circle', strength {strength}: blue {percent(r['blue'])}, "
                  f"red {percent(r['red'])}, circle {percent(r['circle'])}")


if __name__ == "__main__":
    main()
