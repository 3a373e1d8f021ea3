"""Command line for scripted use and smoke tests: ``python -m engine generate ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .backends import BACKEND_NAMES, make_backend
from .bench import add_bench_parser
from .compile import ensure_compiled
from .engine import Engine
from .errors import EngineError
from .registry import DEFAULT_REGISTRY, load_registry
from .samplers import sampler_names
from .types import RESIZE_MODES, GenerateRequest, Progress, Size


def quiet_libraries() -> None:
    """Hide download/loading progress bars of diffusers and transformers (we print our own)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate images into PNG files")
    p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="let .ckpt (pickle) sources be read")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    p.add_argument("--model", help="model id (default: the registry's default model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--sampler", choices=sampler_names())
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--size", type=Size.parse, help="WIDTHxHEIGHT (default: the model's first resolution)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--init-image", type=Path, help="turns the request into img2img")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength for img2img")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="just resize")
    p.add_argument("--out", type=Path, required=True, help="PNG path; image i>0 gets a -i suffix")
    p.add_argument("--no-autocompile", dest="autocompile", action="store_false",
                   help="do not compile the model's missing artifacts first (they are compiled by default)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    registry, backend = load_registry(args.registry, args.allow_unsafe_pickle), make_backend(args.backend)
    if args.autocompile:  # as the app does: a fresh checkout generates without a compile_all.py step first
        model = registry.get(args.model or registry.default_model)
        if args.size is None or args.size in model.resolutions:
            ensure_compiled(registry, backend, model.id, [args.size or model.default_size],
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    engine = Engine(registry, backend)
    init = Image.open(args.init_image).convert("RGB") if args.init_image else None
    request = GenerateRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, sampler=args.sampler,
        steps=args.steps, cfg_scale=args.cfg, seed=args.seed, size=args.size, num_images=args.num_images,
        init_image=init, strength=args.strength, resize_mode=args.resize_mode)
    result = engine.generate(request, on_progress=_print_progress)
    print(file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(result.images):
        path = args.out if index == 0 else args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}")
        path.write_bytes(image.png)
        print(f"{path}  seed {image.seed}")
    t = result.timings
    print(f"{result.model} {result.size} on {engine.backend.name}: {t['total_s']:.2f}s total, "
          f"{result.it_per_s:.2f} it/s, load {t['load_s']:.2f}s")
    return 0


def _print_progress(progress: Progress) -> None:
    print(f"\rimage {progress.image_index + 1}/{progress.num_images} step {progress.step}/{progress.total_steps}"
          f"  {progress.it_per_s:.2f} it/s", end="", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Stable Diffusion engine tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_bench_parser(subparsers)
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
