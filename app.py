"""Stable Diffusion server: ``python app.py [--registry FILE] [--backend auto|neuron|cpu|eager] ...``

Parses the settings (flags and environment, in ``ui.settings`` — the one place that reads them),
loads the registry, picks the backend, compiles the default model if a fixed-shape backend has no
artifacts for it yet, warms ``--preload`` models, then serves on one port: the HTTP API
(``/sdapi/v1``, ``/ping``, ``/invocations``, ``/docs``) with the Gradio UI mounted at ``/``, all
feeding the engine's one queue. ``--help`` lists every flag and the environment variable behind it.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Optional, Sequence

from ui.settings import SHARE_WARNING, AppSettings, SettingsError, parse_settings

log = logging.getLogger("app")


def default_threads() -> int:
    """Torch intra-op threads when ``--threads`` is not given: every core but one, which is left to
    the server's own threads (HTTP, Gradio, PNG encoding). Measured on 2 cores with the shipped model
    and 8 concurrent clients (docs/performance.md): 1 thread 6.6 images/s, 2 threads 2.1 images/s."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


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


def replicas_auto(settings: AppSettings, backend: str) -> bool:
    """``--replicas auto``, ``off``, or by default: auto on the cpu backend unless ``--replicas`` names
    models (a copy per ``--threads`` cores: on 2 cores 8 API clients got 2.5-2.9x the images/s of one,
    docs/performance.md); elsewhere one copy, since on Neuron auto would fill every core pair with
    the default model."""
    if settings.replicas_auto is not None:
        return settings.replicas_auto
    return backend == "cpu" and not settings.replicas


def engine_settings(settings: AppSettings, backend: str = "cpu"):  # noqa: ANN201 - EngineSettings, imported lazily
    """The engine's part of the app settings (``ValueError`` for a malformed ``--replicas`` size)."""
    from engine import EngineSettings, ReplicaTarget, Size

    replicas = tuple(ReplicaTarget(r.model, Size.parse(r.size) if r.size else None, r.count)
                     for r in settings.replicas)
    return EngineSettings(max_warm=settings.max_warm, workers=settings.concurrency,
                          batch_wait_s=settings.batch_wait_ms / 1000, replicas=replicas,
                          replicas_auto=replicas_auto(settings, backend), preview_every=settings.preview_every)


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

    torch.set_num_threads(settings.threads or default_threads())

    from engine import Engine, EngineError, load_registry
    from engine.backends import make_backend
    from engine.cli import quiet_libraries
    from engine.compile import ensure_compiled

    quiet_libraries()
    try:
        registry = load_registry(settings.registry, settings.allow_unsafe_pickle)
        backend = make_backend(settings.backend, settings.neuron_target)
        if settings.autocompile:
            ensure_compiled(registry, backend, registry.default_model, log=lambda line: print(line, flush=True))
        if settings.ray is not None:
            return run_on_ray(settings, list(argv if argv is not None else sys.argv[1:]))
        engine = Engine(registry, backend, engine_settings(settings, backend.name))
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preload(engine, settings)
    if settings.replicas or engine.settings.replicas_auto:
        print(f"Warm replicas: {engine.start_replicas()}", flush=True)

    if settings.share_without_auth:
        print(SHARE_WARNING, file=sys.stderr, flush=True)
        log.warning(SHARE_WARNING)

    server_app = build_server(engine, settings)
    print(f"Serving {registry.default_model} ({len(registry.models)} models) on the {backend.name} backend; "
          f"images are saved under {settings.outputs.resolve()}", flush=True)
    try:
        serve(server_app, settings)
    finally:
        engine.close()
    return 0


def serve_options(settings: AppSettings, argv: Sequence[str] = ()):  # noqa: ANN201 - serve.config.ServeOptions
    """What the Ray deployments need: the registry, the replicas' backend (resolved here), the
    models compiled for it (only those are deployed) and the app's own flags for the ingress."""
    from engine import EngineError, load_registry
    from engine.backends import make_backend
    from engine.compile import plan
    from serve.config import ServeOptions

    registry = load_registry(settings.registry, settings.allow_unsafe_pickle)
    try:
        backend = make_backend(settings.backend, settings.neuron_target)
        ready = {row.spec.id for row in plan(registry, backend)
                 if row.size == row.spec.default_size and row.status.state == "compiled"}
        name = backend.name
        models = tuple(spec.id for spec in registry.models if spec.id in ready or not backend.fixed_shape)
    except EngineError:
        if settings.backend == "auto":
            raise
        # writing a config for other machines (e.g. neuron replicas from a CPU box): every model
        name, models = settings.backend, tuple(spec.id for spec in registry.models)
    flags = [*without_ray_flag(argv), "--registry", str(registry.path.resolve()),
             "--outputs", str(settings.outputs.resolve()), "--backend", name]
    return ServeOptions(registry=str(registry.path.resolve()), backend=name, neuron_target=settings.neuron_target,
                        threads=settings.threads or 1,
                        batch_wait_s=settings.batch_wait_ms / 1000, models=models,
                        replicas={r.model: r.count for r in settings.replicas}, app_flags=tuple(flags),
                        allow_unsafe_pickle=settings.allow_unsafe_pickle)


def without_ray_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--ray [ADDRESS]`` (the ingress runs the plain app)."""
    out, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--ray":
            skip = index + 1 < len(argv) and not argv[index + 1].startswith("-")
            continue
        if not arg.startswith("--ray="):
            out.append(arg)
    return out


def run_on_ray(settings: AppSettings, argv: Sequence[str]) -> int:
    """``--ray``: deploy the app on a Ray Serve cluster and block until Ctrl+C."""
    try:
        from serve.deployments import run
    except ImportError as exc:
        print(f"error: --ray needs Ray Serve ({exc}); install it with `pip install -r requirements-ray.txt`",
              file=sys.stderr)
        return 2
    options = serve_options(settings, argv)
    print(f"Deploying {', '.join(options.models) or 'no model'} on Ray Serve ({options.backend} replicas)", flush=True)
    run(options, settings.ray or None, settings.host, settings.port)
    return 0


def build_server(engine, settings: AppSettings):  # noqa: ANN001, ANN201 - engine/FastAPI, imported lazily
    """One FastAPI app on one port: the HTTP API (unless ``--no-api``) with the Gradio UI mounted at
    ``/``, both behind the same credentials and feeding the engine's one queue."""
    import gradio as gr

    from api import create_api
    from engine import OutputStore, RateLimiter
    from ui import build_app, launch_styles

    settings.outputs.mkdir(parents=True, exist_ok=True)
    cap = int(settings.outputs_max_gb * 2**30) if settings.outputs_max_gb else None
    outputs = OutputStore(settings.outputs, max_bytes=cap)  # one store: one cap, one numbering
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    app, api_context = create_api(engine, outputs, auth=settings.auth,
                                  allow_image_urls=settings.allow_image_urls, flags=settings.public_flags(),
                                  enabled=settings.api, limiter=limiter)
    if settings.api:
        warm_default_model(engine, api_context)
    demo = build_app(engine, settings, outputs, limiter)
    return gr.mount_gradio_app(
        app, demo, path="/", auth=api_context.credentials.gradio_auth(), show_error=True,
        allowed_paths=[str(settings.outputs.resolve())], footer_links=["api"], **launch_styles())


def warm_default_model(engine, api_context) -> None:  # noqa: ANN001
    """Queue loading the default model so ``/ping`` turns 200 when it is ready (SageMaker sends
    traffic only then); a failure is kept for ``/ping`` to report, and the server keeps serving."""
    from engine import EngineError

    def record(error: BaseException) -> None:
        api_context.startup_error = str(error) if isinstance(error, EngineError) else "loading failed; see the log"
        log.warning("could not warm the default model %s: %s", engine.default_model, error)

    try:
        job = engine.submit_load(engine.default_model, owner="startup")
    except EngineError as exc:
        record(exc)
        return

    def done(future) -> None:  # noqa: ANN001 - concurrent.futures.Future
        if future.exception() is not None:
            record(future.exception())

    job.future.add_done_callback(done)


def serve(app, settings: AppSettings) -> None:  # noqa: ANN001 - FastAPI
    """Run ``app`` with uvicorn until Ctrl+C / SIGTERM; with ``--share`` also open a gradio.live link."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"* Running on local URL:  http://{shown_host}:{settings.port}"
          + (f"  (API docs: http://{shown_host}:{settings.port}/docs)" if settings.api else ""), flush=True)
    if not settings.share:
        server.run()
        return
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.1)
    print(f"* Running on public URL: {open_share_link(settings)}", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join()


def open_share_link(settings: AppSettings) -> str:
    """A gradio.live tunnel to the local server (what ``Blocks.launch(share=True)`` does)."""
    import secrets

    from gradio import networking

    try:
        return networking.setup_tunnel(local_host=settings.host, local_port=settings.port,
                                       share_token=secrets.token_urlsafe(32), share_server_address=None,
                                       share_server_tls_certificate=None)
    except Exception as exc:  # the tunnel is optional: the local server keeps serving
        return f"unavailable ({exc}); serving locally only"


if __name__ == "__main__":
    sys.exit(main())
