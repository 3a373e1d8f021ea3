"""Registry loading and validation: every error names the file, the model, the field, expected vs found."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import yaml

from engine.errors import RegistryError, UnknownModel
from engine.registry import DEFAULT_REGISTRY, Defaults, ModelSource, Scaling, load_registry
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
    # the few-step models: 512x512, Euler a with the SGM Uniform (trailing) schedule, 1 step, no guidance
    for model, family in (("sd-turbo", "sd21"), ("sdxl-turbo", "sdxl")):
        spec = registry.get(model)
        assert (spec.family, spec.source.ref, spec.resolutions) == (family, f"stabilityai/{model}", (Size(512, 512),))
        assert spec.defaults == Defaults(sampler="Euler a SGM Uniform", steps=1, cfg_scale=0.0)


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


# Every message a registry author can meet, word for word ("REG" stands for the file, "TMP" for its
# directory): each names the file, the model (once it has an id), the field, what was expected and
# what was found.
_SD15_SAMPLERS = ("Euler, Euler SGM Uniform, Euler a, Euler a SGM Uniform, Heun, LMS, LMS Karras, DPM2, DPM2 Karras, "
                  "DPM2 a, DPM2 a Karras, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SGM Uniform, DPM++ 2M SDE, "
                  "DPM++ 2M SDE Karras, DPM++ 2M SDE SGM Uniform, DPM++ SDE, DPM++ SDE Karras, DDIM, PLMS, UniPC, LCM")
_BATCH = "a list of whole numbers from 1 to 16 such as [1, 4]"
_SCALING_KEYS = "min_replicas, max_replicas, target_ongoing_requests, idle_s"
_PIXART = {"family": "pixart-sigma"}


def _field(field, expected, found, model="m1"):
    where = "REG" if model is None else f"REG: model {model!r}"
    return f"{where}, field {field!r}: expected {expected}, found {found}"


def _top(registry, field, expected, found):
    """A registry-level error (no model named)."""
    return registry, _field(field, expected, found, None)


def _bad(field, expected, found, **entry):
    """An error in the one model entry ``_model(**entry)``."""
    return {"models": [_model(**entry)]}, _field(field, expected, found)


_MIN = "a whole number from 0 (scale to zero) to 1000"
_MAX = "a whole number from {} (min_replicas) to 1000"
_TARGET = "a number above 0 and at most 64"
_IDLE = "seconds from 0 to 86400"
_TP = "one of 1, 2, 4, 8, 16, 32"
_MULTIPLE = "width and height that are positive multiples of 8"
_SOURCE_KINDS = "exactly one of hub, local, single_file"
_PIXART_SAMPLERS = ("Euler, Euler SGM Uniform, Euler a, Euler a SGM Uniform, LMS, LMS Karras, DPM++ 2M, "
                    "DPM++ 2M Karras, DPM++ 2M SGM Uniform, DPM++ 2M SDE, DPM++ 2M SDE Karras, "
                    "DPM++ 2M SDE SGM Uniform, DDIM, PLMS, UniPC, LCM")


@pytest.mark.parametrize("registry, message", [
    _top(["just", "a", "list"], "<top level>", "a mapping with 'models'", "'list'"),
    _top({"other": 1}, "models", "a non-empty list of models", "None"),
    _top({"models": []}, "models", "a non-empty list of models", "[]"),
    _top({"models": [_model()], "default_model": "m2"}, "default_model", "one of ['m1']", "'m2'"),
    _top({"models": [_model()], "artifacts_dir": ""}, "artifacts_dir", "a directory path", "''"),
    _top({"models": [_model()], "artifacts_dir": 3}, "artifacts_dir", "a directory path", "3"),
    _top({"models": [_model(), "m2"]}, "models[1]", "a mapping", "'m2'"),
    _top({"models": [_model(id="a/b")]}, "models[0].id", "a name without '/'", "'a/b'"),
    _top({"models": [_model(id=" ")]}, "models[0].id", "a name without '/'", "' '"),
    _top({"models": [_model(id=7)]}, "models[0].id", "a name without '/'", "7"),
    ({"models": [_model(), _model()]}, _field("id", "each model id to appear once", "'duplicate m1'")),
    _bad("family", "one of sd15, sd21, sdxl, pixart-sigma", "'sd3'", family="sd3"),
    _bad("dtype", "one of fp32, bf16", "'fp8'", dtype="fp8"),
    _bad("source", "hub or local for family pixart-sigma (no single-file loader)", "{'single_file': 'px.safetensors'}",
         source={"single_file": "px.safetensors"}, **_PIXART),
    _bad("batch_sizes", "[1] for family pixart-sigma (one request per transformer call)", "[1, 2]",
         batch_sizes=[1, 2], **_PIXART),
    _bad("tp_degree", "no tp_degree for family sd15 (only for pixart-sigma)", "2", tp_degree=2),
    _bad("tp_degree", _TP, "3", tp_degree=3, **_PIXART),
    _bad("tp_degree", _TP, "True", tp_degree=True, **_PIXART),
    _bad("tp_degree", _TP, "'8'", tp_degree="8", **_PIXART),
    _bad("source", "a mapping with one of ('hub', 'local', 'single_file')", "'org/repo'", source="org/repo"),
    _bad("source", _SOURCE_KINDS, "{}", source={}),
    _bad("source", _SOURCE_KINDS, "{'hub': 'a/b', 'local': 'c'}", source={"hub": "a/b", "local": "c"}),
    _bad("source.hub", "a non-empty string", "' '", source={"hub": " "}),
    _bad("source.local", "a non-empty string", "5", source={"local": 5}),
    _bad("source.local", "a diffusers directory with model_index.json", "'TMP/nowhere'", source={"local": "nowhere"}),
    _bad("source.single_file", "a .safetensors or .ckpt file", "'TMP/m.bin'", source={"single_file": "m.bin"}),
    _bad("source.revision", "a revision only with a hub source", "'v2'", source={"single_file": "m.ckpt", "revision": "v2"}),
    _bad("resolutions", "a non-empty list such as [512x512]", "None", resolutions=None),
    _bad("resolutions", "a non-empty list such as [512x512]", "[]", resolutions=[]),
    _bad("resolutions[1]", "WIDTHxHEIGHT such as 512x512", "'big'", resolutions=["64x64", "big"]),
    _bad("resolutions[0]", _MULTIPLE, "'512x500'", resolutions=["512x500"]),
    _bad("resolutions[0]", _MULTIPLE, "'500x512'", resolutions=["500x512"]),
    _bad("resolutions[0]", _MULTIPLE, "'0x512'", resolutions=["0x512"]),
    _bad("resolutions[0]", _MULTIPLE, "'512x0'", resolutions=["512x0"]),
    _bad("resolutions[1]", "each resolution once", "'64X64'", resolutions=["64x64", "64X64"]),
    _bad("batch_sizes", _BATCH, "4", batch_sizes=4),
    _bad("batch_sizes", _BATCH, "[]", batch_sizes=[]),
    _bad("batch_sizes[1]", _BATCH, "0", batch_sizes=[1, 0]),
    _bad("batch_sizes[0]", _BATCH, "17", batch_sizes=[17]),
    _bad("batch_sizes[0]", _BATCH, "True", batch_sizes=[True]),
    _bad("batch_sizes[0]", _BATCH, "2.0", batch_sizes=[2.0]),
    _bad("defaults", "a mapping of sampler, steps, cfg_scale", "'fast'", defaults="fast"),
    _bad("defaults.sampler", f"one of {_SD15_SAMPLERS}", "'Nope'", defaults={"sampler": "Nope"}),
    _bad("defaults.sampler", f"one of {_PIXART_SAMPLERS}", "'Heun'", defaults={"sampler": "Heun"}, **_PIXART),
    _bad("defaults.steps", "an integer from 1 to 150", "0", defaults={"steps": 0}),
    _bad("defaults.steps", "an integer from 1 to 150", "151", defaults={"steps": 151}),
    _bad("defaults.steps", "an integer from 1 to 150", "'20'", defaults={"steps": "20"}),
    _bad("defaults.steps", "an integer from 1 to 50 for sampler LCM", "51", defaults={"sampler": "LCM", "steps": 51}),
    _bad("defaults.cfg_scale", "a number from 0 to 30", "-0.5", defaults={"cfg_scale": -0.5}),
    _bad("defaults.cfg_scale", "a number from 0 to 30", "30.5", defaults={"cfg_scale": 30.5}),
    _bad("defaults.cfg_scale", "a number from 0 to 30", "'7'", defaults={"cfg_scale": "7"}),
    _bad("defaults.cfg_scale", "a number from 0 to 30", "True", defaults={"cfg_scale": True}),
    _bad("scaling", f"a mapping of {_SCALING_KEYS}", "2", scaling=2),
    _bad("scaling.replicas", f"one of {_SCALING_KEYS}", "'replicas'", scaling={"zmax": 1, "replicas": 2}),
    _bad("scaling.min_replicas", _MIN, "-1", scaling={"min_replicas": -1}),
    _bad("scaling.min_replicas", _MIN, "1001", scaling={"min_replicas": 1001}),
    _bad("scaling.min_replicas", _MIN, "True", scaling={"min_replicas": True}),
    _bad("scaling.min_replicas", _MIN, "1.0", scaling={"min_replicas": 1.0}),
    _bad("scaling.max_replicas", _MAX.format(1), "0", scaling={"min_replicas": 0, "max_replicas": 0}),
    _bad("scaling.max_replicas", _MAX.format(3), "2", scaling={"min_replicas": 3, "max_replicas": 2}),
    _bad("scaling.max_replicas", _MAX.format(1), "1001", scaling={"max_replicas": 1001}),
    _bad("scaling.max_replicas", _MAX.format(1), "True", scaling={"max_replicas": True}),
    _bad("scaling.max_replicas", _MAX.format(1), "2.0", scaling={"max_replicas": 2.0}),
    _bad("scaling.target_ongoing_requests", _TARGET, "0", scaling={"target_ongoing_requests": 0}),
    _bad("scaling.target_ongoing_requests", _TARGET, "64.5", scaling={"target_ongoing_requests": 64.5}),
    _bad("scaling.target_ongoing_requests", _TARGET, "True", scaling={"target_ongoing_requests": True}),
    _bad("scaling.target_ongoing_requests", _TARGET, "'2'", scaling={"target_ongoing_requests": "2"}),
    _bad("scaling.idle_s", _IDLE, "-0.5", scaling={"idle_s": -0.5}),
    _bad("scaling.idle_s", _IDLE, "86401", scaling={"idle_s": 86401}),
    _bad("scaling.idle_s", _IDLE, "False", scaling={"idle_s": False}),
    _bad("scaling.idle_s", _IDLE, "'60'", scaling={"idle_s": "60"}),
])
def test_each_registry_error_reads_exactly(tmp_path, registry, message):
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(info.value).replace(str(path), "REG").replace(str(tmp_path.resolve()), "TMP") == message


def test_registry_file_errors_read_exactly(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RegistryError) as info:
        load_registry(missing)
    assert str(info.value) == f"registry file {missing} does not exist; pass --registry PATH"
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(RegistryError) as info:
        load_registry(broken)
    assert str(info.value).startswith(f"{broken}: not valid YAML: while parsing a flow node")


def test_what_an_entry_leaves_out_gets_its_default(tmp_path):
    path = _write(tmp_path, [_model(), _model(id="px", family="pixart-sigma")])
    registry = load_registry(path)
    assert registry.default_model == "m1"
    assert registry.artifacts_dir == tmp_path.resolve() / "artifacts"
    assert registry.allow_unsafe_pickle is False
    sd, px = registry.models
    assert (sd.title, sd.dtype, sd.batch_sizes, sd.tp_degree) == ("m1", "fp32", (1,), 1)
    assert sd.defaults == Defaults(sampler="Euler a", steps=20, cfg_scale=7.0)
    assert sd.scaling == Scaling(min_replicas=1, max_replicas=1, target_ongoing_requests=2.0, idle_s=60.0)
    assert sd.source == ModelSource(kind="hub", ref="org/repo")
    assert (px.tp_degree, px.batch_sizes) == (8, (1,))
    assert px.defaults == Defaults(sampler="DPM++ 2M", steps=20, cfg_scale=4.5)


def test_values_at_the_edges_of_each_range_are_accepted(tmp_path):
    path = _write(tmp_path, [
        _model(title="First", dtype="bf16", batch_sizes=[16, 4, 4], defaults={"steps": 1, "cfg_scale": 1},
               scaling={"min_replicas": 0, "target_ongoing_requests": 64, "idle_s": 0}),
        _model(id="m2", defaults={"sampler": "UniPC", "steps": 150, "cfg_scale": 30},
               scaling={"min_replicas": 1000, "max_replicas": 1000, "target_ongoing_requests": 0.5, "idle_s": 86400}),
        _model(id="m3", scaling={"min_replicas": 3}),
        _model(id="px", family="pixart-sigma", tp_degree=32, batch_sizes=[1]),
        _model(id="px1", family="pixart-sigma", tp_degree=1),
        _model(id="lcm", defaults={"sampler": "LCM", "steps": 50, "cfg_scale": 0}),
        _model(id="turbo", defaults={"sampler": "Euler a SGM Uniform", "steps": 1, "cfg_scale": 0.0}),
    ], default_model="m2", artifacts_dir="out/compiled")
    registry = load_registry(path)
    assert registry.default_model == "m2" and registry.artifacts_dir == tmp_path.resolve() / "out/compiled"
    first, second, third, px, px1, lcm, turbo = registry.models
    # CFG 0 (no guidance: few-step models) is a valid default; LCM runs up to 50 steps
    assert lcm.defaults == Defaults(sampler="LCM", steps=50, cfg_scale=0.0)
    assert turbo.defaults == Defaults(sampler="Euler a SGM Uniform", steps=1, cfg_scale=0.0)
    assert (first.title, first.dtype, first.batch_sizes, first.max_batch) == ("First", "bf16", (1, 4, 16), 16)
    assert first.defaults == Defaults(sampler="Euler a", steps=1, cfg_scale=1.0)
    assert isinstance(first.defaults.cfg_scale, float) and isinstance(first.scaling.target_ongoing_requests, float)
    assert first.scaling == Scaling(min_replicas=0, max_replicas=1, target_ongoing_requests=64.0, idle_s=0.0)
    assert second.defaults == Defaults(sampler="UniPC", steps=150, cfg_scale=30.0)
    assert second.scaling == Scaling(min_replicas=1000, max_replicas=1000, target_ongoing_requests=0.5, idle_s=86400.0)
    assert (third.scaling.min_replicas, third.scaling.max_replicas) == (3, 3)  # max follows min when left out
    assert (px.tp_degree, px1.tp_degree) == (32, 1)


def test_sources_resolve_paths_and_describe_themselves(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers/model_index.json").write_text("{}")
    path = _write(tmp_path, [
        _model(source={"hub": "org/repo", "revision": "v2"}),
        _model(id="loc", source={"local": "diffusers"}),
        _model(id="ckpt", source={"single_file": "w/model.ckpt", "config": "configs"}),
        _model(id="st", family="sd21", source={"single_file": "w/model.safetensors", "config": "org/sd21-configs"}),
        _model(id="st2", family="sd21", source={"single_file": "w/model.safetensors"}),
    ])
    hub, local, ckpt, st, st2 = load_registry(path).models
    assert hub.source == ModelSource(kind="hub", ref="org/repo", revision="v2")
    assert (hub.source.describe(), hub.source.config_ref, hub.source.is_pickle) == ("hub:org/repo@v2", "org/repo", False)
    assert local.source.ref == str(tmp_path.resolve() / "diffusers")
    assert local.source.describe() == f"local:{local.source.ref}"
    weights = tmp_path.resolve() / "w"
    assert ckpt.source == ModelSource(kind="single_file", ref=str(weights / "model.ckpt"),
                                      config=str(tmp_path.resolve() / "configs"))
    assert ckpt.source.is_pickle and ckpt.source.config_ref == str(tmp_path.resolve() / "configs")
    assert st.source.config == st.source.config_ref == "org/sd21-configs" and not st.source.is_pickle
    assert st2.source.config == "stabilityai/stable-diffusion-2-1-base"
    assert ModelSource(kind="hub", ref="a/b", config="c/d").config_ref == "a/b"  # config is for single files only
    assert ModelSource(kind="single_file", ref="/w/M.CKPT").is_pickle
    assert not ModelSource(kind="local", ref="/w/m.ckpt").is_pickle
    unpickle = load_registry(path, allow_unsafe_pickle=True)
    assert unpickle.allow_unsafe_pickle and all(m.source.unpickle_allowed for m in unpickle.models)
    assert not any(m.source.unpickle_allowed for m in load_registry(path).models)


def test_unknown_model_message_names_the_registry_and_its_ids(tmp_path):
    path = _write(tmp_path, [_model(), _model(id="m2")])
    with pytest.raises(UnknownModel) as info:
        load_registry(path).get("m3")
    assert str(info.value) == f"unknown model 'm3'; the registry {path} has: m1, m2"


def _lora_file(path: Path, prefix: str = "lora_unet_", metadata=None) -> Path:
    """A tiny kohya-format LoRA (or, with another prefix, whatever those tensor names make it)."""
    from safetensors.torch import save_file
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}a.lora_down.weight": torch.ones(1, 2), f"{prefix}a.lora_up.weight": torch.ones(2, 1),
               f"{prefix}a.alpha": torch.tensor(1.0)}
    save_file(tensors, str(path), metadata=metadata)
    return path


_LORA_SCALE = "a number from -10 to 10 other than 0 (the LoRA's weight)"
_LORA_NAME = "a name without ':', '<', '>' or ','"
_LORA_SOURCE = "a .safetensors LoRA file (a path relative to the registry)"


@pytest.mark.parametrize("entry, field, expected, found", [
    ({"family": "pixart-sigma", "loras": [{"source": "d.safetensors"}]},
     "loras", "no loras for family pixart-sigma (only sd15, sd21, sdxl)", "[{'source': 'd.safetensors'}]"),
    ({"loras": "d.safetensors"}, "loras", "a list of mappings such as [{source: detail.safetensors, scale: 0.8}]",
     "'d.safetensors'"),
    ({"loras": ["d.safetensors"]}, "loras[0]", "a mapping with source (and scale, name)", "'d.safetensors'"),
    ({"loras": [{"scale": 1}]}, "loras[0]", "a mapping with source (and scale, name)", "{'scale': 1}"),
    ({"loras": [{"source": "d.safetensors", "weight": 1, "alpha": 2}]}, "loras[0].alpha", "one of source, scale, name",
     "'alpha'"),
    ({"loras": [{"source": "d.pt"}]}, "loras[0].source", _LORA_SOURCE, "'d.pt'"),
    ({"loras": [{"source": 5}]}, "loras[0].source", _LORA_SOURCE, "5"),
    ({"loras": [{"source": "none.safetensors"}]}, "loras[0].source", "an existing .safetensors file",
     "'TMP/none.safetensors'"),
    ({"loras": [{"source": "d.safetensors", "scale": 0}]}, "loras[0].scale", _LORA_SCALE, "0"),
    ({"loras": [{"source": "d.safetensors", "scale": 10.5}]}, "loras[0].scale", _LORA_SCALE, "10.5"),
    ({"loras": [{"source": "d.safetensors", "scale": -10.5}]}, "loras[0].scale", _LORA_SCALE, "-10.5"),
    ({"loras": [{"source": "d.safetensors", "scale": True}]}, "loras[0].scale", _LORA_SCALE, "True"),
    ({"loras": [{"source": "d.safetensors", "scale": "1"}]}, "loras[0].scale", _LORA_SCALE, "'1'"),
    ({"loras": [{"source": "d.safetensors", "name": "a:b"}]}, "loras[0].name", _LORA_NAME, "'a:b'"),
    ({"loras": [{"source": "d.safetensors", "name": "<a"}]}, "loras[0].name", _LORA_NAME, "'<a'"),
    ({"loras": [{"source": "d.safetensors", "name": "a>"}]}, "loras[0].name", _LORA_NAME, "'a>'"),
    ({"loras": [{"source": "d.safetensors", "name": "a,b"}]}, "loras[0].name", _LORA_NAME, "'a,b'"),
    ({"loras": [{"source": "d.safetensors", "name": " "}]}, "loras[0].name", _LORA_NAME, "' '"),
    ({"loras": [{"source": "d.safetensors", "name": 5}]}, "loras[0].name", _LORA_NAME, "5"),
    ({"loras": [{"source": "d.safetensors"}, {"source": "sub/d.safetensors"}]}, "loras[1].name",
     "each LoRA name once per model", "'d'"),
    ({"loras": [{"source": "plain.safetensors"}]}, "loras[0].source",
     "a LoRA (kohya/A1111 or diffusers/peft format) — not a LoRA in kohya/A1111 format (tensors named lora_unet_… / "
     "lora_te_…) or diffusers/peft format (unet.….lora_A.weight / text_encoder.….lora_B.weight); its tensors are "
     "named like: model_a.alpha, model_a.lora_down.weight, model_a.lora_up.weight", "'TMP/plain.safetensors'"),
    ({"loras": [{"source": "xl.safetensors"}]}, "loras[0].source",
     "a LoRA for sd15 (this one has text_encoder_2 weights: an SDXL LoRA)", "'TMP/xl.safetensors'"),
])
def test_each_lora_entry_error_reads_exactly(tmp_path, entry, field, expected, found):
    _lora_file(tmp_path / "d.safetensors")
    _lora_file(tmp_path / "sub/d.safetensors")
    _lora_file(tmp_path / "plain.safetensors", prefix="model_")
    _lora_file(tmp_path / "xl.safetensors", prefix="lora_te2_")
    path = _write(tmp_path, [_model(**entry)])
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value).replace(str(path), "REG").replace(str(tmp_path.resolve()), "TMP")
    assert message == _field(field, expected, found)


def test_loras_are_read_when_the_registry_loads(tmp_path):
    import hashlib

    detail = _lora_file(tmp_path / "loras/Detail.SAFETENSORS", metadata={"ss_b": "2", "ss_a": "1"})
    _lora_file(tmp_path / "loras/xl.safetensors", prefix="lora_te2_")
    path = _write(tmp_path, [
        _model(loras=[{"source": "loras/Detail.SAFETENSORS", "scale": -10}, {"source": "loras/xl.safetensors",
                                                                              "name": "XL-style", "scale": 10}],
               family="sdxl"),
        _model(id="m2", loras=[{"source": "loras/Detail.SAFETENSORS"}]),
    ])
    first, second = load_registry(path).models
    assert [(lora.name, lora.scale, lora.format, lora.components) for lora in first.loras] == [
        ("Detail", -10.0, "kohya", ("unet",)), ("XL-style", 10.0, "kohya", ("text_encoder_2",))]
    lora = second.loras[0]
    assert (lora.name, lora.path, lora.scale) == ("Detail", str(detail.resolve()), 1.0)
    assert isinstance(first.loras[0].scale, float)
    assert lora.sha256 == hashlib.sha256(detail.read_bytes()).hexdigest()
    assert len(lora.short_hash) == 12 and lora.short_hash != lora.sha256[:12]  # A1111's: the tensors only
    assert lora.metadata == (("ss_a", "1"), ("ss_b", "2"))
    assert load_registry(_write(tmp_path, [_model()])).models[0].loras == ()
