"""Registry loading and validation: every error names the file, the model, the field, expected vs found."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import yaml

from engine.errors import RegistryError, UnknownModel
from engine.registry import DEFAULT_REGISTRY, load_registry
from engine.types import Size


def _write(tmp_path: Path, models, **top) -> Path:
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump({"models": models, **top}, sort_keys=False))
    return path


def _model(**overrides):
    model = {"id": "m1", "family": "sd15", "source": {"hub": "org/repo"}, "resolutions": ["512x512"]}
    model.update(overrides)
    return model


def test_tiny_registry_loads_frozen_specs(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    assert registry.ids == ("tiny-sd15", "tiny-sd21", "tiny-sd15-file", "tiny-sdxl", "tiny-pixart-sigma")
    spec = registry.get("tiny-sd15")
    assert spec.resolutions == (Size(64, 64), Size(64, 96))
    assert spec.source.kind == "local" and Path(spec.source.ref).is_absolute()
    assert spec.defaults.sampler == "Euler a" and spec.defaults.steps == 4
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'id'"):
        spec.id = "other"  # frozen


def test_shipped_registry_has_the_reference_models():
    registry = load_registry(DEFAULT_REGISTRY)
    refs = {spec.source.ref: spec for spec in registry.models}
    assert refs["XpucT/Deliberate"].family == "sd15"
    assert refs["stabilityai/stable-diffusion-2-1-base"].family == "sd21"
    assert refs["stabilityai/stable-diffusion-xl-base-1.0"].resolutions == (Size(1024, 1024),)
    assert registry.get(registry.default_model)


@pytest.mark.parametrize(
    "models, field, found",
    [
        ([_model(family="sd3")], "family", "sd3"),
        ([_model(resolutions=["512x500"])], "resolutions[0]", "512x500"),
        ([_model(resolutions=["big"])], "resolutions[0]", "big"),
        ([_model(), _model()], "id", "duplicate m1"),
        ([_model(source=None)], "source", "None"),
        ([_model(source={"local": "does/not/exist"})], "source.local", "does/not/exist"),
        ([_model(defaults={"sampler": "Nope"})], "defaults.sampler", "Nope"),
        ([_model(defaults={"steps": 0})], "defaults.steps", "0"),
        ([_model(dtype="fp8")], "dtype", "fp8"),
    ],
)
def test_invalid_entries_name_file_model_field_and_values(tmp_path, models, field, found):
    path = _write(tmp_path, models)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message
    assert "'m1'" in message
    assert repr(field) in message
    assert "expected" in message and found in message


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n  - id: x\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(path)
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "nope.yaml")


def test_unknown_model_lists_known_ids(tiny_registry_path):
    with pytest.raises(UnknownModel, match="tiny-sd15, tiny-sd21, tiny-sd15-file, tiny-sdxl"):
        load_registry(tiny_registry_path).get("sdxl-turbo")


def test_single_file_source_gets_family_config_default(tmp_path):
    path = _write(tmp_path, [_model(source={"single_file": "ckpt/model.safetensors"}, family="sdxl")])
    spec = load_registry(path).models[0]
    assert spec.source.kind == "single_file"
    assert spec.source.config == "stabilityai/stable-diffusion-xl-base-1.0"
    assert spec.source.ref == str((tmp_path / "ckpt/model.safetensors").resolve())
