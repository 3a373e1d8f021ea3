"""PixArt-Sigma's tensor-parallel Neuron path, checked WITHOUT Neuron hardware.

Every test named ``*recorded*`` runs the real engine code (compile, manifest, placement, load,
generate) against tests/neuron_recorder.py's RECORDING STAND-INS for ``torch_neuronx`` and
``neuronx_distributed``: the NxD stand-in calls the engine's shard builder once per rank, records
which layers became ColumnParallelLinear / RowParallelLinear, and runs the ranks on threads with a
summing all-reduce, so a correctly sharded model generates the same image as plain diffusers. What
neuronx-cc and the Neuron runtime do with these calls is not tested here.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import neuron_recorder
from engine import ArtifactMismatch, Engine, EngineSettings, GenerateRequest, Size, artifacts
from engine.backends.neuron import NeuronBackend
from engine.compile import compile_all, expected_fingerprint
from engine.placement import GIB, CoreInventory, CorePlan, Footprint, ModelTooLarge
from engine.registry import load_registry

MODEL, SIZE, TP = "tiny-pixart-sigma", Size(64, 64), 4


@pytest.fixture(scope="module")
def recorded_pixart(tiny_dir, tmp_path_factory):
    """The tiny PixArt-Sigma compiled for the neuron backend with tp_degree 4 through the RECORDING
    stand-ins (8 NeuronCores, like an inf2.24xlarge's first 8), kept installed for the module's tests."""
    data = yaml.safe_load((tiny_dir / "model_registry.yaml").read_text())
    directory = tmp_path_factory.mktemp("pixart-neuron")
    entry = next(m for m in data["models"] if m["id"] == MODEL)
    entry = dict(entry, source={"local": str(tiny_dir / entry["source"]["local"])}, tp_degree=TP)
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": str(directory / "artifacts"), "default_model": MODEL,
                                    "models": [entry]}))
    with pytest.MonkeyPatch.context() as mp:
        recorder = neuron_recorder.install(mp)
        nxd = neuron_recorder.install_neuronx_distributed(mp)
        registry = load_registry(path)
        backend = NeuronBackend(inventory=CoreInventory(tuple(range(8)), 16 * GIB, "test: 8 cores"),
                                device_present=False)
        outcomes = compile_all(registry, backend, log=lambda line: None)
        assert [o.state for o in outcomes] == ["compiled"], outcomes
        manifest = artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, MODEL, SIZE, "neuron"))
        yield SimpleNamespace(recorder=recorder, nxd=nxd, registry=registry, backend=backend, manifest=manifest)


T5_SHARDS = {
    r"text_encoder\.encoder\.block\.\d\.layer\.0\.SelfAttention\.[qkv]": "column",
    r"text_encoder\.encoder\.block\.\d\.layer\.0\.SelfAttention\.o": "row",
    r"text_encoder\.encoder\.block\.\d\.layer\.1\.DenseReluDense\.wi_[01]": "column",
    r"text_encoder\.encoder\.block\.\d\.layer\.1\.DenseReluDense\.wo": "row",
}
TRANSFORMER_SHARDS = {
    r"transformer\.transformer_blocks\.\d\.attn[12]\.to_[qkv]": "column",
    r"transformer\.transformer_blocks\.\d\.attn[12]\.to_out\.0": "row",
    r"transformer\.transformer_blocks\.\d\.ff\.net\.0\.proj": "column",
    r"transformer\.transformer_blocks\.\d\.ff\.net\.2": "row",
}


@pytest.mark.parametrize("component, expected, per_block", [("text_encoder", T5_SHARDS, 7),
                                                             ("transformer", TRANSFORMER_SHARDS, 10)])
def test_recorded_parallel_trace_shards_attention_and_mlp(recorded_pixart, component, expected, per_block):
    """parallel_model_trace: tp_degree recorded, a picklable per-rank builder, every attention and MLP
    linear sharded the right way (column: out/tp rows; row: in/tp columns) and nothing else, on CPU only."""
    [call] = recorded_pixart.nxd.traces_of(component)
    assert call.tp_degree == TP and call.builder_pickles and call.devices_seen == {"cpu"}
    assert call.kwargs == {"inline_weights_to_neff": False}
    assert call.compiler_args[:2] == ["--target=inf2", "--model-type=unet-inference"]
    assert len(call.shards) == TP
    for rank_shards in call.shards:
        assert len(rank_shards) == 2 * per_block  # two blocks in the tiny models
        for shard in rank_shards:
            kinds = [kind for pattern, kind in expected.items() if re.fullmatch(pattern, shard.path)]
            assert kinds == [shard.kind], shard
            full_in, full_out = shard.full_features
            assert shard.weight_shape == ((full_out // TP, full_in) if shard.kind == "column" else (full_out, full_in // TP))


def test_recorded_example_shapes_manifest_and_fingerprint(recorded_pixart):
    nxd, manifest = recorded_pixart.nxd, recorded_pixart.manifest
    assert nxd.traces_of("text_encoder")[0].input_shapes == [(1, 300), (1, 300)]  # ids and attention mask
    assert nxd.traces_of("transformer")[0].input_shapes == [(2, 4, 8, 8), (2, 300, 32), (2,), (2, 300)]
    # the VAE decoder is traced whole, on the CPU backend (no device here)
    [vae] = recorded_pixart.recorder.traces
    assert vae.component == "vae_decoder" and vae.trace_kwargs == {"cpu_backend": True}
    assert manifest["tp_degree"] == TP and set(manifest["components"]) == {"text_encoder", "transformer", "vae_decoder"}
    for name in ("text_encoder", "transformer"):
        entry = manifest["components"][name]
        assert entry["tp_degree"] == TP and entry["file"] == f"{name}/shards/tp_0.pt"
        assert [s["file"] for s in entry["shards"]] == [f"{name}/shards/tp_{r}.pt" for r in range(1, TP)]
    spec = recorded_pixart.registry.get(MODEL)
    assert manifest["fingerprint"] == expected_fingerprint(spec, SIZE, recorded_pixart.backend)
    two = type(spec)(**{**spec.__dict__, "tp_degree": 2})
    assert expected_fingerprint(two, SIZE, recorded_pixart.backend) != manifest["fingerprint"]  # another tp: stale


def test_recorded_sharded_pixart_generates_what_plain_diffusers_does(recorded_pixart):
    """Loaded with parallel_model_load on a group of 4 consecutive cores; the image equals plain
    PixArtSigmaPipeline's (the stand-in's all-reduce makes a wrongly sharded layer show here)."""
    from diffusers import PixArtSigmaPipeline

    engine = Engine(recorded_pixart.registry, recorded_pixart.backend, EngineSettings(max_warm=1))
    try:
        result = engine.generate(GenerateRequest(model=MODEL, prompt="a red square", negative_prompt="blurry, green",
                                                 seed=21, steps=3, cfg_scale=6.5))
        [warm] = engine.status()["warm"]
        assert warm["device_ids"] == [0, 1, 2, 3]
    finally:
        engine.close()
    loads = recorded_pixart.nxd.loads
    assert sorted(d.parent.name for d, _ in loads) == ["text_encoder", "transformer"]
    assert all(files == [f"tp_{r}.pt" for r in range(TP)] for _, files in loads)
    assert recorded_pixart.recorder.core_contexts[:2] == [(0, TP), (0, TP)]  # both sharded, then the VAE alone
    plain = PixArtSigmaPipeline.from_pretrained(recorded_pixart.registry.get(MODEL).source.ref)
    plain.set_progress_bar_config(disable=True)
    expected = plain(prompt="a red square", negative_prompt="blurry, green", num_inference_steps=3, guidance_scale=6.5,
                     generator=torch.Generator("cpu").manual_seed(21), height=64, width=64,
                     use_resolution_binning=False, clean_caption=False).images[0]
    diff = np.abs(np.asarray(result.images[0].image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1


def test_recorded_too_few_cores_for_tp_degree_is_refused(recorded_pixart):
    small = NeuronBackend(inventory=CoreInventory((0, 1), 16 * GIB, "test: 2 cores"), device_present=False)
    command = "python compile_all.py --models tiny-pixart-sigma"
    with pytest.raises(ArtifactMismatch, match=r"needs 4 NeuronCores \(sharded over them: tp_degree 4.*sees 2 NeuronCores.*"
                                               r"NEURON_RT_VISIBLE_CORES=0-3"):
        small.check_target(recorded_pixart.manifest, command)


def test_core_plan_reserves_tp_degree_cores_per_replica():
    """A tensor-parallel replica takes an aligned group of tp_degree cores (home first, shards in
    order); UNet models keep using pairs, in what is left."""
    sharded = Footprint(other_bytes=1 * GIB, sharded_bytes=3 * GIB, cores=4)
    pair = Footprint(unet_bytes=2 * GIB, other_bytes=1 * GIB)
    footprints = {"px-a": sharded, "px-b": sharded, "px-c": sharded, "sd": pair}
    plan = CorePlan(CoreInventory(tuple(range(8)), 16 * GIB), lambda key: footprints[key])
    first, second = plan.place("px-a"), plan.place("px-b", apart_from=["px-a"])
    assert first.device_ids == (0, 1, 2, 3) and second.device_ids == (4, 5, 6, 7)
    assert first.pair_indexes == {0, 1} and second.pair_index == 2
    assert plan.place("px-c", apart_from=["px-a", "px-b"]) is None
    used = plan.used_bytes()
    assert used[0] == 4 * GIB and used[1] == used[2] == used[3] == 3 * GIB
    assert plan.place("sd").device_ids in ((1, 0), (0, 1), (2, 3), (3, 2))  # memory left on the shared cores
    with pytest.raises(ModelTooLarge, match="sharded over 4 NeuronCores"):
        CorePlan(CoreInventory((0, 1), 16 * GIB), lambda key: sharded).place("px")


def test_a_ray_replica_of_a_sharded_model_reserves_tp_degree_neuron_cores(tiny_registry_path):
    from serve.config import ServeOptions, model_deployment_options

    registry = load_registry(tiny_registry_path)
    options = ServeOptions(registry=str(tiny_registry_path), backend="neuron")
    pixart = model_deployment_options(registry.get(MODEL), options, default=False)  # tp_degree 2 in the tiny registry
    sd = model_deployment_options(registry.get("tiny-sd15"), options, default=False)
    assert pixart["ray_actor_options"]["resources"] == {"neuron_cores": 2}
    eight = type(registry.get(MODEL))(**{**registry.get(MODEL).__dict__, "tp_degree": 8})
    assert model_deployment_options(eight, options, default=False)["ray_actor_options"]["resources"] == {
        "neuron_cores": 8}
    assert sd["ray_actor_options"]["resources"] == {"neuron_cores": 2}
