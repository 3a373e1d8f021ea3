"""Stable Diffusion web UI: ``python app.py [--registry FILE] [--backend auto|neuron|cpu|eager] ...``

Parses the settings (flags and environment, in ``ui.settings`` — the one place that reads them),
loads the registry, picks the backend, compiles the default model if a fixed-shape backend has no
artifacts for it yet, warms ``--preload`` models, then serves the Gradio app. ``--help`` lists
every flag and the environment variable behind it.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, Sequence

from ui.settings import SHARE_WARNING, AppSettings, SettingsError, parse_settings

log = logging.getLogger("app")


def ensure_default_compiled(registry, backend) -> None:  # noqa: ANN001 - engine types, imported lazily
    """On a fixed-shape backend, compile the default model's missing or stale resolutions (printing
    progress), so a fresh checkout serves its first image without a separate compile step."""
    from engine.compile import compile_all, plan

    if not backend.fixed_shape:
        return
    model = registry.default_model
    todo = [row for row in plan(registry, backend, models=[model]) if row.status.state != "compiled"]
    if not todo:
        return
    sizes = ", ".join(str(row.size) for row in todo)
    print(f"Compiling {model} ({sizes}) for the {backend.name} backend: its artifacts are missing or stale. "
          f"This runs once; artifacts go to {registry.artifacts_dir}.", flush=True)
    started = time.perf_counter()
    outcomes = compile_all(registry, backend, models=[model], log=lambda line: print(line, flush=True))
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        print(f"Compiling {model} failed for {', '.join(str(o.size) for o in failed)}; the app starts anyway and "
              f"the Models tab shows the command to retry.", flush=True)
    else:
        print(f"Compiled {model} in {time.perf_counter() - started:.1f}s.", flush=True)


def preload(engine, settings: AppSettings) -> None:  # noqa: ANN001
    """Warm the ``--preload`` models; a failure is reported and the app serves anyway."""
    from engine import EngineError, Size

    for item in settings.preload:
        try:
            size = Size.parse(item.size) if item.size else None
            warm = engine.load(item.model, size)
            print(f"Preloaded {warm.key} in {warm.load_seconds:.1f}s", flush=True)
        except (EngineError, ValueError) as exc:
            print(f"Could not preload {item.model}{'@' + item.size if item.size else ''}: {exc}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        settings = parse_settings(argv, os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)

    from engine import Engine, EngineError, EngineSettings, load_registry
    from engine.backends import make_backend
    from engine.cli import quiet_libraries

    quiet_libraries()
    try:
        registry = load_registry(settings.registry)
        backend = make_backend(settings.backend)
        if settings.autocompile:
            ensure_default_compiled(registry, backend)
        engine = Engine(registry, backend, EngineSettings(max_warm=settings.max_warm))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preload(engine, settings)

    if settings.share_without_auth:
        print(SHARE_WARNING, file=sys.stderr, flush=True)
        log.warning(SHARE_WARNING)

    from ui import build_app, launch_styles

    settings.outputs.mkdir(parents=True, exist_ok=True)
    demo = build_app(engine, settings)
    print(f"Serving {registry.default_model} ({len(registry.models)} models) on the {backend.name} backend; "
          f"images are saved under {settings.outputs.resolve()}", flush=True)
    demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        auth=list(settings.auth) or None, show_error=True, allowed_paths=[str(settings.outputs.resolve())],
        footer_links=["api"], **launch_styles(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
