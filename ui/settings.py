"""The web app's settings: parsed once, from flags and environment, into a frozen ``AppSettings``.

This is the only place that reads ``os.environ`` for the app (the caller passes it in). Every flag
has an environment variable that supplies its default, so a service file can configure the app
without a command line; an explicit flag wins over the environment.

=========================  ==================  =========================================
flag                       environment         default
=========================  ==================  =========================================
``--registry PATH``        ``SD_REGISTRY``     ``model_registry.yaml`` beside ``engine/``
``--backend NAME``         ``SD_BACKEND``      ``auto`` (neuron, else eager on CUDA, else cpu)
``--neuron-target T``      ``SD_NEURON_TARGET``  inf2 (trn1, trn2: what the artifacts were compiled for)
``--host HOST``            ``GRADIO_SERVER_NAME``  ``127.0.0.1``
``--port PORT``            ``GRADIO_SERVER_PORT``  ``7860``
``--share``                ``SD_SHARE=1``      off (refused without auth unless ``--insecure-share``)
``--auth USER:PASS``       ``SD_AUTH``         none (repeatable flag; env: comma separated)
``--auth-file PATH``       ``SD_AUTH_FILE``    none (lines ``user:pass``)
``--preload M[,M]``        ``SD_PRELOAD``      none (``MODEL`` or ``MODEL@WxH``)
``--max-warm N``           ``SD_MAX_WARM``     2
``--outputs DIR``          ``SD_OUTPUTS``      ``outputs/``
``--outputs-max-gb GB``    ``SD_OUTPUTS_MAX_GB``  none (keep every image); else delete the oldest PNGs
                                               beyond GB
``--rate-limit N``         ``SD_RATE_LIMIT``   none; else at most N generation requests a minute per client
``--allow-unsafe-pickle``  ``SD_ALLOW_UNSAFE_PICKLE=1``  off: ``.ckpt`` sources are refused (convert them)
``--preview-every N``      ``SD_PREVIEW_EVERY``  5 (0 on Neuron): live preview every N steps; 0: off
``--threads N``            ``SD_THREADS``      every core but one (at least 1)
``--concurrency N``        ``SD_CONCURRENCY``  1 (device workers: generations at once)
``--replicas M[@WxH]=N``   ``SD_REPLICAS``     cpu backend: ``auto``; else 1 per model (repeatable; env
                                               comma separated; ``auto``: fill the free NeuronCore
                                               pairs with the default model; cpu: one copy per
                                               --threads cores that fits in half the free memory;
                                               ``off``: one copy of each)
``--ray [ADDRESS]``        ``SD_RAY``          off; on: Ray Serve (``SD_RAY=1`` or an address; a bare
                                               ``--ray`` joins ``RAY_ADDRESS`` when set, else starts one)
``--batch-wait-ms MS``     ``SD_BATCH_WAIT_MS``  5 (a free worker waits this long for requests to batch)
``--no-autocompile``       ``SD_AUTOCOMPILE=0``  compile the default model when missing
``--api/--no-api``         ``SD_API=0``        on: /sdapi/v1, /ping, /invocations, /docs
``--allow-image-urls``     ``SD_ALLOW_IMAGE_URLS=1``  off: image fields take base64 only
``--sagemaker``            ``SM_MODEL_DIR``,   off; on: 0.0.0.0, port ``SAGEMAKER_BIND_TO_PORT``
                           ``SAGEMAKER_BIND_TO_PORT``  or 8080, registry from ``SM_MODEL_DIR``
=========================  ==================  =========================================
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
SAGEMAKER_PORT = 8080
BACKENDS = ("auto", "neuron", "cpu", "eager")
SHARE_WARNING = (
    "WARNING: --share without --auth/--auth-file: anyone with the public link can use this machine "
    "(and its accelerator) to generate images. Add --auth user:pass or --auth-file FILE.")


class SettingsError(ValueError):
    """A flag or environment variable has a value the app cannot use (the message says which)."""


@dataclass(frozen=True)
class Preload:
    """A model to warm at start, at one size (``None``: the model's first resolution)."""

    model: str
    size: Optional[str] = None


@dataclass(frozen=True)
class Replicas:
    """``count`` warm copies of ``model`` (at ``size``; None: every size it serves)."""

    model: str
    size: Optional[str]
    count: int

    def __str__(self) -> str:
        return f"{self.model}{'@' + self.size if self.size else ''}={self.count}"


@dataclass(frozen=True)
class AppSettings:
    """Everything the app is configured with. Built by ``parse_settings``; passed down, never global."""

    registry: Path
    backend: str = "auto"
    neuron_target: str = "inf2"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    insecure_share: bool = False
    auth: tuple[tuple[str, str], ...] = ()
    preload: tuple[Preload, ...] = ()
    max_warm: int = 2
    outputs: Path = Path("outputs")
    outputs_max_gb: Optional[float] = None
    rate_limit: Optional[int] = None  # generation requests a minute per client
    allow_unsafe_pickle: bool = False
    preview_every: Optional[int] = None  # None: the engine's default for the backend
    threads: Optional[int] = None
    concurrency: int = 1
    replicas: tuple[Replicas, ...] = ()
    replicas_auto: Optional[bool] = None  # None: the backend's default (auto on cpu, unless --replicas names models)
    ray: Optional[str] = None  # None: no Ray; "": a local cluster (or RAY_ADDRESS); else the address to join
    batch_wait_ms: int = 5
    autocompile: bool = True
    api: bool = True
    allow_image_urls: bool = False
    sagemaker: bool = False

    @property
    def share_without_auth(self) -> bool:
        return self.share and not self.auth

    def public_flags(self) -> dict[str, object]:
        """The settings as ``/sdapi/v1/cmd-flags`` shows them (passwords left out)."""
        flags = {name: (str(value) if isinstance(value, Path) else value) for name, value in vars(self).items()}
        flags["auth"] = [user for user, _ in self.auth]
        flags["preload"] = [f"{p.model}@{p.size}" if p.size else p.model for p in self.preload]
        flags["replicas"] = ({True: ["auto"], False: ["off"]}.get(self.replicas_auto, []) + [str(r) for r in self.replicas])
        return flags


def _default_registry() -> Path:
    """``engine.registry.DEFAULT_REGISTRY``, without importing the engine (torch) for ``--help``."""
    return Path(__file__).resolve().parent.parent / "model_registry.yaml"


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser, with environment variables as defaults."""
    env = environ.get
    p = argparse.ArgumentParser(
        prog="python app.py", description="Stable Diffusion web UI (Inferentia2, GPU or CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--registry", type=Path, default=Path(env("SD_REGISTRY") or _default_registry()),
                   help="model registry YAML [SD_REGISTRY]")
    p.add_argument("--backend", choices=BACKENDS, default=env("SD_BACKEND", "auto"),
                   help="auto: neuron if present, else eager on CUDA, else cpu TorchScript [SD_BACKEND]")
    p.add_argument("--neuron-target", choices=("inf2", "trn1", "trn2"), default=env("SD_NEURON_TARGET", "inf2"),
                   help="the Neuron compile target the artifacts were built for (compile_all.py --neuron-target) "
                        "[SD_NEURON_TARGET]")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", DEFAULT_HOST),
                   help="interface to listen on; 0.0.0.0 for every interface [GRADIO_SERVER_NAME]")
    p.add_argument("--port", default=env("GRADIO_SERVER_PORT", str(DEFAULT_PORT)), help="[GRADIO_SERVER_PORT]")
    p.add_argument("--insecure-share", action="store_true", default=_truthy(env("SD_INSECURE_SHARE", "")),
                   help="allow --share without --auth: anyone with the link can use this machine "
                        "[SD_INSECURE_SHARE]")
    p.add_argument("--share", action="store_true", default=_truthy(env("SD_SHARE", "")),
                   help="also serve on a public gradio.live link [SD_SHARE]")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                   help="require a login (repeatable) [SD_AUTH, comma separated]")
    p.add_argument("--auth-file", type=Path, default=env("SD_AUTH_FILE"),
                   help="file with one USER:PASS a line [SD_AUTH_FILE]")
    p.add_argument("--preload", default=env("SD_PRELOAD", ""), metavar="MODEL[@WxH][,MODEL]",
                   help="models to warm at start [SD_PRELOAD]")
    p.add_argument("--max-warm", default=env("SD_MAX_WARM", "2"), help="models (at a size) kept warm at most; their replicas count once [SD_MAX_WARM]")
    p.add_argument("--outputs", type=Path, default=Path(env("SD_OUTPUTS", "outputs")),
                   help="every generated PNG is saved here [SD_OUTPUTS]")
    p.add_argument("--outputs-max-gb", default=env("SD_OUTPUTS_MAX_GB"), metavar="GB",
                   help="keep the outputs directory under GB: the oldest saved PNGs are deleted first "
                        "(default: keep everything) [SD_OUTPUTS_MAX_GB]")
    p.add_argument("--rate-limit", default=env("SD_RATE_LIMIT"), metavar="N",
                   help="at most N generation requests a minute per client (user, else address); "
                        "more get HTTP 429 (default: no limit) [SD_RATE_LIMIT]")
    p.add_argument("--allow-unsafe-pickle", action="store_true", default=_truthy(env("SD_ALLOW_UNSAFE_PICKLE", "")),
                   help="let .ckpt (pickle) checkpoints in the registry be read; convert them to .safetensors "
                        "instead when you can [SD_ALLOW_UNSAFE_PICKLE]")
    p.add_argument("--preview-every", default=env("SD_PREVIEW_EVERY"), metavar="N",
                   help="live preview (cheap latent approximation) every N denoising steps, in the UI and in "
                        "/sdapi/v1/progress; 0: off (default: 5, off on Neuron) [SD_PREVIEW_EVERY]")
    p.add_argument("--threads", default=env("SD_THREADS"), help="torch intra-op threads (default: every core but one) [SD_THREADS]")
    p.add_argument("--replicas", action="append", default=None, metavar="MODEL[@WxH]=N|auto|off",
                   help="warm copies of a model, each on its own NeuronCore pair (repeatable); auto: fill the "
                        "free pairs with the default model (cpu backend: one copy per --threads cores, within "
                        "half the free memory; the cpu default); off: one copy of each model "
                        "[SD_REPLICAS, comma separated]")
    p.add_argument("--ray", nargs="?", const="", default=env("SD_RAY"), metavar="ADDRESS",
                   help="serve on a Ray Serve cluster: start a local one, or join ADDRESS / RAY_ADDRESS "
                        "(needs requirements-ray.txt; see docs/scaling.md) [SD_RAY]")
    p.add_argument("--concurrency", default=env("SD_CONCURRENCY", "1"),
                   help="generations running at once on the device; others wait in the queue [SD_CONCURRENCY]")
    p.add_argument("--batch-wait-ms", default=env("SD_BATCH_WAIT_MS", "5"),
                   help="how long a free device worker waits for more compatible requests to run as one batch "
                        "(models with batch_sizes in the registry); 0: batch only what is already waiting "
                        "[SD_BATCH_WAIT_MS]")
    p.add_argument("--no-autocompile", dest="autocompile", action="store_false",
                   default=_truthy(env("SD_AUTOCOMPILE", "1")),
                   help="do not compile the default model's missing artifacts at start "
                        "[SD_AUTOCOMPILE=0] (compile at start: %(default)s)")
    p.add_argument("--api", action=argparse.BooleanOptionalAction, default=_truthy(env("SD_API", "1")),
                   help="serve the HTTP API (/sdapi/v1, /ping, /invocations, /docs) beside the UI [SD_API]")
    p.add_argument("--allow-image-urls", action="store_true", default=_truthy(env("SD_ALLOW_IMAGE_URLS", "")),
                   help="let API image fields be http(s) URLs that the server downloads [SD_ALLOW_IMAGE_URLS]")
    p.add_argument("--sagemaker", action="store_true",
                   help="SageMaker hosting: listen on 0.0.0.0:$SAGEMAKER_BIND_TO_PORT (8080), take the registry from "
                        "$SM_MODEL_DIR/model_registry.yaml when it exists")
    return p


def _positive_int(name: str, text: object, minimum: int = 1) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise SettingsError(f"{name} must be an integer, found {text!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, found {value}")
    return value


def _positive_float(name: str, text: Optional[str]) -> Optional[float]:
    """A size such as 0.5 or 20; None when not given."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a number, found {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number, found {text!r}")
    return value


def _parse_auth_pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise SettingsError(f"{where}: expected USER:PASS, found {text.strip()!r}")
    return user, password


def _read_auth_file(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SettingsError(f"--auth-file {path}: cannot read it ({exc.strerror})") from None
    pairs = [_parse_auth_pair(line, f"{path} line {number}")
             for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not pairs:
        raise SettingsError(f"--auth-file {path}: no USER:PASS lines in it")
    return pairs


def _parse_preload(text: str) -> tuple[Preload, ...]:
    items = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            model, _, size = part.partition("@")
            items.append(Preload(model.strip(), size.strip() or None))
    return tuple(items)


def _parse_replicas(texts: Sequence[str]) -> tuple[tuple[Replicas, ...], Optional[bool]]:
    """``["sd15=2", "sdxl@1024x1024=1"]`` -> Replicas; ``auto`` or ``off`` may stand among them (the
    second value: True, False, or None when neither was given)."""
    items: list[Replicas] = []
    auto: Optional[bool] = None
    for text in (t.strip() for t in texts):
        if text in ("auto", "off"):
            if auto is not None and auto != (text == "auto"):
                raise SettingsError("--replicas: give auto or off, not both")
            auto = text == "auto"
            continue
        target, sep, count = text.rpartition("=")
        model, _, size = target.partition("@")
        if not sep or not model.strip():
            raise SettingsError(f"--replicas {text!r}: write MODEL=N or MODEL@WxH=N (or auto, or off), "
                                "e.g. --replicas sd15=2")
        items.append(Replicas(model.strip(), size.strip() or None, _positive_int(f"--replicas {text}", count)))
    return tuple(items), auto


def parse_settings(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> AppSettings:
    """Flags and environment → ``AppSettings``; raises ``SettingsError`` naming the bad value."""
    args = build_parser(environ).parse_args(argv)
    auth_texts = args.auth if args.auth is not None else [a for a in environ.get("SD_AUTH", "").split(",") if a.strip()]
    auth = [_parse_auth_pair(text, "--auth") for text in auth_texts]
    if args.auth_file:
        auth += _read_auth_file(Path(args.auth_file))
    if args.share and not auth and not args.insecure_share:
        raise SettingsError("--share makes this machine reachable by anyone with the link: add --auth USER:PASS "
                            "or --auth-file FILE (or --insecure-share to share it open on purpose)")
    threads = _positive_int("--threads", args.threads) if args.threads not in (None, "") else None
    replica_texts = args.replicas if args.replicas is not None else environ.get("SD_REPLICAS", "").split(",")
    replicas, replicas_auto = _parse_replicas([t for t in replica_texts if t.strip()])
    registry, host, port = Path(args.registry), args.host, args.port
    if args.sagemaker:
        host, port = "0.0.0.0", environ.get("SAGEMAKER_BIND_TO_PORT", str(SAGEMAKER_PORT))
        packaged = Path(environ.get("SM_MODEL_DIR", "/opt/ml/model")) / "model_registry.yaml"
        if packaged.is_file() and not environ.get("SD_REGISTRY") and registry == _default_registry():
            registry = packaged
    return AppSettings(
        registry=registry,
        backend=args.backend,
        neuron_target=args.neuron_target,
        host=host,
        port=_positive_int("--port", port),
        share=args.share,
        insecure_share=args.insecure_share,
        auth=tuple(auth),
        preload=_parse_preload(args.preload),
        max_warm=_positive_int("--max-warm", args.max_warm),
        outputs=Path(args.outputs),
        outputs_max_gb=_positive_float("--outputs-max-gb", args.outputs_max_gb),
        rate_limit=_positive_int("--rate-limit", args.rate_limit) if args.rate_limit not in (None, "") else None,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
        preview_every=(_positive_int("--preview-every", args.preview_every, minimum=0)
                       if args.preview_every not in (None, "") else None),
        threads=threads,
        concurrency=_positive_int("--concurrency", args.concurrency),
        replicas=replicas,
        replicas_auto=replicas_auto,
        ray="" if args.ray is not None and (args.ray == "local" or _truthy(args.ray)) else args.ray,
        batch_wait_ms=_positive_int("--batch-wait-ms", args.batch_wait_ms, minimum=0),
        # An endpoint must not compile at start (it takes longer than SageMaker's health check
        # allows): with --sagemaker only an explicit SD_AUTOCOMPILE=1 turns it on.
        autocompile=args.autocompile and (not args.sagemaker or _truthy(environ.get("SD_AUTOCOMPILE", "0"))),
        api=args.api,
        allow_image_urls=args.allow_image_urls,
        sagemaker=args.sagemaker,
    )
