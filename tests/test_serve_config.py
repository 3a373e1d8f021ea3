"""What Ray Serve is told (no cluster needed): resources, replicas, autoscaling, the config file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")

from engine.registry import DEFAULT_REGISTRY, Scaling, load_registry  # noqa: E402
from serve.config import ServeOptions, model_deployment_options, serve_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def options(**changes) -> ServeOptions:
    return ServeOptions(registry=str(DEFAULT_REGISTRY), backend="cpu", threads=1, models=("demo-shapes",), **changes)


def test_replicas_reserve_a_neuron_core_pair_or_their_cpu_threads():
    spec = load_registry(DEFAULT_REGISTRY).get("demo-shapes")
    neuron = model_deployment_options(spec, dataclasses.replace(options(), backend="neuron"), default=True)
    assert neuron["ray_actor_options"] == {"num_cpus": 1, "resources": {"neuron_cores": 2}}
    cpu = model_deployment_options(spec, dataclasses.replace(options(), threads=3), default=True)
    assert cpu["ray_actor_options"] == {"num_cpus": 3}
    assert cpu["name"] == "model-demo-shapes" and cpu["max_ongoing_requests"] >= spec.max_batch


def test_registry_scaling_becomes_autoscaling_and_fixed_replicas_turn_it_off():
    spec = dataclasses.replace(load_registry(DEFAULT_REGISTRY).get("deliberate"),
                               scaling=Scaling(min_replicas=0, max_replicas=6, target_ongoing_requests=3, idle_s=300))
    auto = model_deployment_options(spec, options(), default=False)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"],
            auto["downscale_delay_s"]) == (0, 6, 3, 300)
    assert "initial_replicas" not in auto  # scaled to zero until the first request
    assert model_deployment_options(spec, options(), default=True)["autoscaling_config"]["initial_replicas"] == 1
    fixed = model_deployment_options(spec, options(replicas={"deliberate": 4}), default=False)
    assert fixed["num_replicas"] == 4 and "autoscaling_config" not in fixed


def test_generated_and_shipped_configs_are_valid_serve_configs(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.chdir(ROOT)
    generated = serve_config(options(), "0.0.0.0", 8000)
    ServeDeploySchema.model_validate(generated) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(generated)
    assert generated["applications"][0]["args"]["registry"] == "model_registry.yaml"
    assert [d["name"] for d in generated["applications"][0]["deployments"]] == ["model-demo-shapes", "Ingress"]
    shipped = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(shipped) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(shipped)
    app = shipped["applications"][0]
    registry = load_registry(ROOT / app["args"]["registry"])
    assert {d["name"] for d in app["deployments"]} == {f"model-{s.id}" for s in registry.models} | {"Ingress"}
    assert ServeOptions.from_args(app["args"]).backend == "neuron"


@pytest.mark.parametrize("raw, needle", [
    ({"min_replicas": 3, "max_replicas": 2}, "scaling.max_replicas"),
    ({"min_replicas": -1}, "scaling.min_replicas"),
    ({"target_ongoing_requests": 0}, "scaling.target_ongoing_requests"),
    ({"replicas": 2}, "scaling.replicas"),
])
def test_bad_scaling_is_named(tmp_path, raw, needle):
    from engine.errors import RegistryError

    registry = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    registry["models"] = [dict(registry["models"][0], scaling=raw, source={"local": str(ROOT / "models/demo-shapes")})]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    with pytest.raises(RegistryError, match=needle):
        load_registry(path)


def test_the_app_without_ray_never_imports_it():
    import subprocess
    import sys

    code = ("import sys, app, api, ui, engine, serve; from ui.settings import parse_settings; "
            "app.engine_settings(parse_settings([], {})); assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
