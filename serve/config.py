"""What Ray Serve is told: per model deployment options, and the ``serve deploy`` config file.

Replicas per model come from the registry's ``scaling`` block (Serve autoscaling between
``min_replicas`` and ``max_replicas`` on ongoing requests per replica) unless ``--replicas
MODEL=N`` fixes the count, which turns autoscaling off for that model (as without ``--ray``).

Resources per replica: on Neuron a replica asks Ray for ``neuron_cores`` (2: its UNet runs
DataParallel over a core pair; Ray sets ``NEURON_RT_VISIBLE_CORES`` for the replica, which the
neuron backend reads); on CPU it asks for ``num_cpus`` = its torch threads; on a GPU (eager) for
one GPU.

    python -m serve.config [app flags] > serve/config.yaml     # then: serve deploy serve/config.yaml
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from engine import Registry

APP_NAME = "sd"
# Where the code sits on every node (the docker image's WORKDIR): Serve configs may name only a
# remote URI or a local:// directory that exists on each node.
NODE_APP_DIR = "/opt/sdserve"
NEURON_CORES_PER_REPLICA = 2  # the UNet's DataParallel pair (placement.PAIR_SIZE)
# Requests a replica accepts at once: enough to fill its largest compiled batch, queued in its
# engine (Serve's autoscaler counts them as ongoing).
MIN_ONGOING_PER_REPLICA = 4


@dataclass(frozen=True)
class ServeOptions:
    """Everything the deployments need, plain and picklable (the app builder's arguments)."""

    registry: str
    backend: str  # the replicas' backend: neuron, cpu or eager (resolved where the app starts)
    neuron_target: str = "inf2"  # what the Neuron artifacts were compiled for
    threads: int = 1  # torch threads (and Ray CPUs) per CPU replica
    batch_wait_s: float = 0.005
    models: tuple[str, ...] = ()  # the models deployed (compiled ones; the others are listed, not served)
    replicas: dict[str, int] = field(default_factory=dict)  # fixed counts from --replicas
    app_flags: tuple[str, ...] = ()  # the app's flags, for the ingress's UI/API settings
    allow_unsafe_pickle: bool = False  # --allow-unsafe-pickle: .ckpt sources may be opened

    def load_registry(self) -> "Registry":
        from engine import load_registry

        return load_registry(Path(self.registry), self.allow_unsafe_pickle)

    def to_args(self) -> dict[str, Any]:
        return {**asdict(self), "app_flags": list(self.app_flags), "models": list(self.models)}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeOptions":
        return cls(**{**args, "app_flags": tuple(args.get("app_flags", ())), "models": tuple(args.get("models", ()))})


def deployment_name(model: str) -> str:
    return f"model-{model}"


def ray_actor_options(backend: str, threads: int, tp_degree: int = 1) -> dict[str, Any]:
    """The resources one replica of a model reserves on its node (on Neuron: its core pair, or the
    ``tp_degree`` cores a tensor-parallel model such as PixArt-Sigma is sharded over)."""
    if backend == "neuron":
        return {"num_cpus": 1, "resources": {"neuron_cores": max(NEURON_CORES_PER_REPLICA, tp_degree)}}
    if backend == "eager":
        return {"num_cpus": threads, "num_gpus": 1}
    return {"num_cpus": threads}


def model_deployment_options(spec: Any, options: ServeOptions, default: bool) -> dict[str, Any]:
    """``Deployment.options(...)`` for ``spec`` (an engine ``ModelSpec``): replicas (fixed or
    autoscaled) and resources. The ``default`` model starts with at least one replica, so the app
    is ready at once even when its scaling allows zero."""
    deployment: dict[str, Any] = {
        "name": deployment_name(spec.id),
        "ray_actor_options": ray_actor_options(options.backend, options.threads, getattr(spec, "tp_degree", 1)),
        "max_ongoing_requests": max(MIN_ONGOING_PER_REPLICA, 2 * spec.max_batch),
        # a Neuron replica loads NEFFs for minutes before it is ready; a CPU one in seconds
        "health_check_timeout_s": 600 if options.backend == "neuron" else 120,
        "graceful_shutdown_timeout_s": 30,
    }
    fixed: Optional[int] = options.replicas.get(spec.id)
    if fixed is not None:
        deployment["num_replicas"] = fixed
    else:
        scaling = spec.scaling
        deployment["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1) if default else None,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            # react to a burst within seconds (image requests are long; Serve's defaults suit short ones)
            "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0,
            "upscale_delay_s": 2.0,
            "downscale_delay_s": scaling.idle_s,
        }
        deployment["autoscaling_config"] = {k: v for k, v in deployment["autoscaling_config"].items() if v is not None}
    return deployment


def serve_config(options: ServeOptions, host: str, port: int) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for the registry: one application, every deployment."""
    registry = options.load_registry()
    deployments = []
    for spec in registry.models:
        if spec.id in options.models:
            deployments.append(model_deployment_options(spec, options, spec.id == registry.default_model))
    deployments.append({"name": "Ingress", "ray_actor_options": {"num_cpus": 0}})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "serve.app:build",
            # the same image on every node; artifacts_dir must be shared storage (docs/scaling.md)
            "runtime_env": {"working_dir": f"local://{NODE_APP_DIR}"},
            "args": _relative_paths(options.to_args()),
            "deployments": deployments,
        }],
    }


def _relative_paths(args: dict[str, Any]) -> dict[str, Any]:
    """Paths under the current directory made relative to it: the working_dir ships to each node."""
    here = Path.cwd().resolve()

    def relative(text: str) -> str:
        path = Path(text)
        return str(path.relative_to(here)) if path.is_absolute() and path.is_relative_to(here) else text

    return {**args, "registry": relative(args["registry"]), "app_flags": [relative(a) for a in args["app_flags"]]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the Serve config for the app flags given (``python -m serve.config --backend neuron``)."""
    import os

    import yaml

    from app import serve_options
    from ui.settings import parse_settings

    settings = parse_settings(list(argv if argv is not None else sys.argv[1:]), os.environ)
    options = serve_options(settings)
    print("# Generated by `python -m serve.config`; deploy with `serve deploy serve/config.yaml`.")
    print(yaml.safe_dump(serve_config(options, settings.host, settings.port), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
