"""The neuron backend's call contract with torch-neuronx, checked WITHOUT Neuron hardware.

Every test named ``*recorded*`` runs the real engine code (compile, manifest, load, placement,
generate) against ``tests/neuron_recorder.py``'s RECORDING STAND-IN for ``torch_neuronx``: it
records what the backend asks of the SDK and returns plain TorchScript traces, so the artifacts
load and generate on CPU. What the Neuron compiler and runtime do with those calls is not tested
here; ``test_real_hardware_*`` (marked ``neuron``) does that on an inf2/trn1 machine.
"""
from __future__ import annotations

import glob
import io
import re
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import neuron_recorder
from engine import (ArtifactMismatch, BackendUnavailable, CompileError, Engine, EngineSettings, GenerateRequest,
                    ModelLoadError,
                    ReplicaTarget, Size, VariantKey)
from engine.backends import make_backend
from engine.backends.neuron import NeuronBackend, compiler_args, neuron_attention
from engine.compile import compile_all, compile_variant, plan
from engine.families import FAMILIES
from engine.pipelines import load_compiled
from engine.placement import GIB, CoreInventory, footprint_from_manifest
from engine.registry import load_registry
from engine import artifacts

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"sd15": "tiny-sd15", "sd21": "tiny-sd21", "sdxl": "tiny-sdxl"}
SIZE = Size(64, 64)
HAS_NEURON_DEVICE = bool(glob.glob("/dev/neuron[0-9]*"))


def write_registry(tiny_dir: Path, directory: Path, models: list[str], dtype: str = "fp32",
                   batch_sizes: bool = False) -> Path:
    """A registry over the tiny models (64x64 only) with its own artifacts directory (and, unless
    ``batch_sizes``, one UNet each: the placement tests count their bytes)."""
    data = yaml.safe_load((tiny_dir / "model_registry.yaml").read_text())
    entries = [dict(m, source={"local": str(tiny_dir / m["source"]["local"])}, resolutions=[str(SIZE)], dtype=dtype)
               for m in data["models"] if m["id"] in models]
    for entry in entries if not batch_sizes else ():
        entry.pop("batch_sizes", None)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": str(directory / "artifacts"), "default_model": models[0],
                                    "models": entries}))
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def recorded(tiny_dir, tmp_path_factory):
    """The three tiny families compiled for the neuron backend through the RECORDING stand-in.

    The stand-in stays installed for this module's tests; ``traces`` keeps the compile's records.
    """
    with pytest.MonkeyPatch.context() as mp:
        recorder = neuron_recorder.install(mp)
        registry = load_registry(write_registry(tiny_dir, tmp_path_factory.mktemp("neuron"), list(MODELS.values())))
        backend = NeuronBackend(inventory=CoreInventory((0, 1, 2, 3), 16 * GIB, "test: inf2.8xlarge-like"))
        outcomes = compile_all(registry, backend, log=lambda line: None)
        assert [o.state for o in outcomes] == ["compiled"] * 3, outcomes
        yield SimpleNamespace(recorder=recorder, registry=registry, backend=backend, traces=list(recorder.traces),
                              monkeypatch=mp)


def manifest_of(recorded, model: str) -> dict:
    directory = artifacts.variant_dir(recorded.registry.artifacts_dir, model, SIZE, "neuron")
    manifest = artifacts.read_manifest(directory)
    assert manifest is not None
    return manifest


def trace_of(recorded, model: str, component: str):
    # <artifacts>/<model>/<size>/.partial-.../<component>/compiler_workdir
    [trace] = [t for t in recorded.traces if t.component == component and t.compiler_workdir.parents[3].name == model]
    return trace


# --- compile recipe ---------------------------------------------------------------------------------------


FAST = "--enable-fast-loading-neuron-binaries"
UNET_TYPE, TEXT_TYPE, NONE = "--model-type=unet-inference", "--model-type=transformer", ["--auto-cast", "none"]
EXPECTED_FP32_ARGS = {
    ("sd15", "text_encoder"): ["--target=inf2", TEXT_TYPE, FAST, *NONE],
    ("sd15", "unet"): ["--target=inf2", UNET_TYPE, FAST, *NONE],
    ("sd15", "vae_decoder"): ["--target=inf2", UNET_TYPE, FAST, *NONE],
    ("sd15", "vae_encoder"): ["--target=inf2", UNET_TYPE, FAST, *NONE],
    ("sdxl", "text_encoder"): ["--target=inf2", TEXT_TYPE, FAST, *NONE],
    ("sdxl", "text_encoder_2"): ["--target=inf2", TEXT_TYPE, FAST, *NONE],
    ("sdxl", "unet"): ["--target=inf2", UNET_TYPE, *NONE],  # no fast loading for the SDXL UNet
    ("sdxl", "vae_decoder"): ["--target=inf2", UNET_TYPE, FAST, *NONE],
    ("sdxl", "vae_encoder"): ["--target=inf2", UNET_TYPE, FAST, *NONE],
}
EXPECTED_FP32_ARGS.update({("sd21", c): args for (f, c), args in list(EXPECTED_FP32_ARGS.items()) if f == "sd15"})


@pytest.mark.parametrize("family", sorted(MODELS))
def test_recorded_compiler_args_per_component_and_family(recorded, family):
    model = MODELS[family]
    manifest = manifest_of(recorded, model)
    assert set(manifest["components"]) == set(FAMILIES[family].components)
    for component in FAMILIES[family].components:
        trace = trace_of(recorded, model, component)
        assert trace.compiler_args == EXPECTED_FP32_ARGS[(family, component)], (family, component)
        assert trace.inline_weights_to_neff is True
        assert manifest["components"][component]["compiler_args"] == trace.compiler_args


def test_recorded_bf16_and_optlevel_reach_the_compiler(tiny_dir, tmp_path, monkeypatch):
    recorder = neuron_recorder.install(monkeypatch)
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd21"], dtype="bf16"))
    compile_variant(registry, registry.get("tiny-sd21"), SIZE,
                    NeuronBackend(inventory=CoreInventory((0, 1)), optlevel=1), log=lambda line: None)
    unet = recorder.traces_of("unet")[0]
    assert unet.compiler_args == ["--target=inf2", "--model-type=unet-inference", "--enable-fast-loading-neuron-binaries",
                                  "--auto-cast", "matmult", "--auto-cast-type", "bf16", "-O1"]
    assert all(t.compiler_args[-5:] == ["--auto-cast", "matmult", "--auto-cast-type", "bf16", "-O1"]
               for t in recorder.traces)
    # UNet and text encoder are traced with bf16 weights and inputs (as the SD2.1 sample); the VAE keeps fp32
    manifest = artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, "tiny-sd21", SIZE, "neuron"))
    assert manifest["dtype"] == "bf16"
    weights = {t.component: t.weight_dtypes for t in recorder.traces}
    assert weights["unet"] == weights["text_encoder"] == {"bfloat16"}
    assert weights["vae_decoder"] == weights["vae_encoder"] == {"float32"}
    dtypes = {name: e["input_dtype"] for name, e in manifest["components"].items()}
    assert dtypes["unet"] == dtypes["text_encoder"] == "bfloat16" and dtypes["vae_decoder"] == "float32"
    # ... which halves the UNet's artifact, and the placement footprint follows the manifest
    fp32_registry = load_registry(write_registry(tiny_dir, tmp_path / "fp32", ["tiny-sd21"]))
    compile_variant(fp32_registry, fp32_registry.get("tiny-sd21"), SIZE, NeuronBackend(inventory=CoreInventory((0, 1))),
                    log=lambda line: None)
    fp32 = artifacts.read_manifest(artifacts.variant_dir(fp32_registry.artifacts_dir, "tiny-sd21", SIZE, "neuron"))
    assert manifest["components"]["unet"]["bytes"] < 0.6 * fp32["components"]["unet"]["bytes"]
    assert footprint_from_manifest(manifest).unet_bytes < 0.6 * footprint_from_manifest(fp32).unet_bytes
    # and it still generates (bf16 inputs in, float32 out of each compiled part)
    engine = Engine(registry, NeuronBackend(inventory=CoreInventory((0, 1))), EngineSettings(max_warm=1))
    try:
        image = engine.generate(GenerateRequest(model="tiny-sd21", prompt="p", seed=1, steps=2)).images[0].image
        assert image.size == (64, 64)
    finally:
        engine.close()
    with pytest.raises(CompileError, match="1, 2 or 3"):
        compiler_args(FAMILIES["sd15"], "unet", "fp32", optlevel=4)


def test_recorded_compile_without_a_device_passes_the_target_and_the_cpu_backend(tiny_dir, tmp_path, monkeypatch):
    """A build box without /dev/neuron* (RECORDING stand-in): every trace gets --target=<target> and
    cpu_backend=True; with a free device present, no cpu_backend; with the device held by another
    process (the serving app), cpu_backend again; trn1 reaches the compiler and the key."""
    recorder = neuron_recorder.install(monkeypatch)
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd15"]))
    spec = registry.get("tiny-sd15")
    build_box = NeuronBackend(inventory=CoreInventory((0, 1)), device_present=False, target="trn1")
    compile_variant(registry, spec, SIZE, build_box, log=lambda line: None)
    assert recorder.traces and all(t.trace_kwargs == {"cpu_backend": True} for t in recorder.traces)
    assert all(t.compiler_args[0] == "--target=trn1" for t in recorder.traces)
    assert "target=trn1" in build_box.stack_key()
    manifest = artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, "tiny-sd15", SIZE, "neuron"))
    assert manifest["target"]["compiler_target"] == "trn1"
    recorder.reset()
    on_device = NeuronBackend(inventory=CoreInventory((0, 1)), device_present=True, neuron_ls=lambda: None)
    compile_variant(registry, spec, SIZE, on_device, log=lambda line: None)
    assert recorder.traces and all(t.trace_kwargs == {} for t in recorder.traces)
    # compile_all.py on a box whose cores the serving app holds: trace without starting the runtime
    recorder.reset()
    serving = [{"neuron_device": 0, "nc_count": 2, "neuroncore_ids": [0, 1],
                "neuron_processes": [{"pid": 999999, "command": "python app.py"}]}]
    busy_box = NeuronBackend(inventory=CoreInventory((0, 1)), device_present=True, neuron_ls=lambda: serving)
    compile_variant(registry, spec, SIZE, busy_box, log=lambda line: None)
    assert recorder.traces and all(t.trace_kwargs == {"cpu_backend": True} for t in recorder.traces)
    assert on_device.stack_key() != build_box.stack_key()  # an inf2 box will not load trn1 artifacts
    with pytest.raises(CompileError, match="inf2, trn1, trn2"):
        compiler_args(FAMILIES["sd15"], "unet", "fp32", target="inf1")


@pytest.mark.parametrize("family", sorted(MODELS))
def test_recorded_unet_is_traced_per_core_and_the_manifest_records_the_layout(recorded, family):
    model = MODELS[family]
    manifest = manifest_of(recorded, model)
    unet = manifest["components"]["unet"]
    trace = trace_of(recorded, model, "unet")
    # one row of the CFG pair per core ...
    assert all(shape[0] == 1 for shape in trace.input_shapes)
    assert [spec["shape"] for spec in unet["inputs"]] == [list(s) for s in trace.input_shapes]
    # ... and two rows per call of the DataParallel runner, which is what CompiledUNet feeds
    assert unet["batch"] == 2
    assert unet["layout"] == {"batch_per_core": 1, "cores": 2, "batch_per_call": 2}
    assert manifest["target"]["unet"]["batch_per_call"] == 2 and manifest["target"]["cores_per_model"] == 2
    for component in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert trace_of(recorded, model, component).input_shapes[0][0] == 1
    assert manifest["versions"]["neuronx-cc"] == neuron_recorder.RECORDED_NEURONX_CC_VERSION
    assert manifest["versions"]["torch-neuronx"] == neuron_recorder.RECORDED_TORCH_NEURONX_VERSION


def test_recorded_one_unet_is_traced_per_compiled_batch_size(tiny_dir, tmp_path, monkeypatch):
    """batch_sizes in the registry (tiny-sd15: [1, 4], tiny-sdxl: [3]): each is its own traced UNet
    (CFG doubles the rows), split over the core pair like the batch-1 UNet, with the UNet's compiler
    arguments, and recorded in the manifest."""
    recorder = neuron_recorder.install(monkeypatch)
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd15", "tiny-sdxl"], batch_sizes=True))
    backend = NeuronBackend(inventory=CoreInventory((0, 1)))
    assert [o.state for o in compile_all(registry, backend, log=lambda line: None)] == ["compiled"] * 2
    record = SimpleNamespace(registry=registry, traces=recorder.traces)
    for model, batches in (("tiny-sd15", [1, 4]), ("tiny-sdxl", [1, 3])):
        manifest = manifest_of(record, model)
        assert manifest["batch_sizes"] == batches
        base = trace_of(record, model, "unet")
        for batch in batches[1:]:
            name = f"unet_b{batch}"
            trace, entry = trace_of(record, model, name), manifest["components"][name]
            assert all(shape[0] == batch for shape in trace.input_shapes)  # 2 * batch rows over 2 cores
            assert [s[1:] for s in trace.input_shapes] == [s[1:] for s in base.input_shapes]
            assert entry["layout"] == {"batch_per_core": batch, "cores": 2, "batch_per_call": 2 * batch}
            assert entry["batch"] == 2 * batch and trace.compiler_args == base.compiler_args
            assert trace.lazy_loaded and entry["file"] == f"{name}/model.pt"

    # Loading warms every batch size's graph up (each a DataParallel over the pair) before "ready";
    # then two requests that wait together run as one call of the batch-4 graph (4 rows, 2 per core).
    engine = Engine(registry, backend, EngineSettings(batch_wait_s=0.5))
    try:
        engine.load("tiny-sd15")
        per_core_rows = sorted({call.chunk_shapes[0][0][0] for call in recorder.data_parallels if call.chunk_shapes})
        assert per_core_rows == [1, 4] and all(c.device_ids == [0, 1] for c in recorder.data_parallels)
        calls_before = {id(c): len(c.chunk_shapes) for c in recorder.data_parallels}
        jobs = [engine.submit(GenerateRequest(model="tiny-sd15", prompt=p, steps=2, seed=i))
                for i, p in enumerate(["one", "two"])]
        assert [job.result(60).batch_requests for job in jobs] == [2, 2]
        batch4 = next(c for c in recorder.data_parallels if c.chunk_shapes and c.chunk_shapes[0][0][0] == 4)
        assert len(batch4.chunk_shapes) - calls_before[id(batch4)] == 2  # one call per step, 2 requests padded to 4
    finally:
        engine.close()


def test_recorded_attention_patch_is_active_only_while_tracing(recorded):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    original_scores = Attention.__dict__["get_attention_scores"]
    original_call = AttnProcessor2_0.__dict__["__call__"]
    for model in MODELS.values():
        unet = trace_of(recorded, model, "unet")
        assert unet.attention_scores is not original_scores  # patched while tracing ...
        assert unet.sdpa_processor_call is AttnProcessor.__call__  # ... and routed through it
        assert "aten::bmm" in unet.graph_ops and "aten::softmax" in unet.graph_ops
        assert "aten::scaled_dot_product_attention" not in unet.graph_ops
        assert unet.fuse_softmax == "1"
    # ... and restored afterwards: the same UNet traced now goes through SDPA again
    assert Attention.__dict__["get_attention_scores"] is original_scores
    assert AttnProcessor2_0.__dict__["__call__"] is original_call


def test_recorded_nki_flash_attention_traces_the_unets_self_attention(tiny_dir, tmp_path, monkeypatch, cpu_engine):
    """Where the SDK has the NKI flash-attention kernel (RECORDING stand-ins for torch-neuronx and the
    kernel): the UNet's self-attention calls it in the samples' layout, cross-attention and the other
    components keep the bmm/softmax patch, the manifest says which, SDPA is restored afterwards, and
    the image matches the cpu backend's."""
    import torch.nn.functional as functional

    neuron_recorder.install(monkeypatch)
    calls = neuron_recorder.install_nki_flash_attention(monkeypatch)
    sdpa = functional.scaled_dot_product_attention
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd15"]))
    backend = NeuronBackend(inventory=CoreInventory((0, 1)))
    compile_variant(registry, registry.get("tiny-sd15"), SIZE, backend, log=lambda line: None)
    assert functional.scaled_dot_product_attention is sdpa
    manifest = artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, "tiny-sd15", SIZE, "neuron"))
    attention = {name: entry["attention"] for name, entry in manifest["components"].items()}
    assert attention.pop("unet") == "nki-flash" and set(attention.values()) == {"bmm-softmax"}
    assert calls and {c.kernel_name for c in calls} == {"AttentionMMSoftmaxMMWithoutSwap"}
    for call in calls:  # q, k: [B*H, D, S]; v and the output: [B*H, S, D]; scale 1/sqrt(D)
        (q, k, v, out) = call.shapes
        assert q == k and v == out == (q[0], q[2], q[1]) and call.scale == pytest.approx(q[1] ** -0.5)
    engine = Engine(registry, backend, EngineSettings(max_warm=1))
    try:
        request = GenerateRequest(model="tiny-sd15", prompt="a small square", seed=123, steps=3)
        image = engine.generate(request).images[0].image
    finally:
        engine.close()
    difference = np.abs(pixels(image) - pixels(cpu_engine.generate(request).images[0].image))
    assert difference.max() <= 3  # the kernel's output is bf16, as on the device


def test_recorded_attention_patch_is_restored_after_a_compiler_error(tiny_dir, tmp_path, monkeypatch):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    recorder = neuron_recorder.install(monkeypatch)
    recorder.fail_components = {"unet"}
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd15"]))
    original = (Attention.__dict__["get_attention_scores"], AttnProcessor2_0.__dict__["__call__"])
    with pytest.raises(CompileError) as failure:
        compile_variant(registry, registry.get("tiny-sd15"), SIZE, NeuronBackend(inventory=CoreInventory((0, 1))),
                        log=lambda line: None)
    message = str(failure.value)
    assert "neuronx-cc failed on unet" in message and "--model-type=unet-inference" in message
    assert "recorded stand-in: no compiler ran" in message  # the compiler log's tail
    assert (Attention.__dict__["get_attention_scores"], AttnProcessor2_0.__dict__["__call__"]) == original
    assert list(artifacts.leftover_partials(registry.artifacts_dir)) == []
    assert artifacts.read_manifest(artifacts.variant_dir(registry.artifacts_dir, "tiny-sd15", SIZE, "neuron")) is None


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("dim_head", [40, 64])
@pytest.mark.parametrize("upcast", [False, True])
def test_patched_attention_scores_equal_diffusers(family, dim_head, upcast):
    """bmm * attn.scale -> softmax gives diffusers' probabilities, for self- and cross-attention."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=2 * dim_head, heads=2, dim_head=dim_head, upcast_attention=upcast,
                     upcast_softmax=upcast)
    generator = torch.Generator().manual_seed(0)
    for query_len, key_len in ((16, 16), (16, 7)):
        query = torch.randn(4, query_len, dim_head, generator=generator)
        key = torch.randn(4, key_len, dim_head, generator=generator)
        expected = attn.get_attention_scores(query, key)
        with neuron_attention(FAMILIES[family]):
            patched = attn.get_attention_scores(query, key)
        torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)
    assert attn.scale == pytest.approx(dim_head**-0.5)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_recorded_compiler_workdirs_are_per_component_in_the_partial_directory(recorded, family):
    model = MODELS[family]
    final = artifacts.variant_dir(recorded.registry.artifacts_dir, model, SIZE, "neuron")
    manifest = manifest_of(recorded, model)
    for component in FAMILIES[family].components:
        workdir = trace_of(recorded, model, component).compiler_workdir
        assert workdir.name == "compiler_workdir" and workdir.parent.name == component
        assert workdir.parent.parent.name.startswith(".partial-neuron-")  # the temporary artifact directory
        assert workdir.parent.parent.parent == final.parent
        assert not workdir.exists()  # published by rename, then never left lying around
        assert not (final / component / "compiler_workdir").exists()  # removed after a good compile
        assert manifest["components"][component]["compiler_workdir"] is None


def test_recorded_async_load_everywhere_and_lazy_load_for_the_unet(recorded):
    assert recorded.traces and all(t.async_loaded for t in recorded.traces)
    assert {t.component for t in recorded.traces if t.lazy_loaded} == {"unet"}
    assert len([t for t in recorded.traces if t.lazy_loaded]) == len(MODELS)


# --- loading, placement, generating -------------------------------------------------------------------------


def test_recorded_placement_puts_each_model_on_its_own_pair_when_memory_says_so(recorded):
    """Device memory just above one model per core: three models on three pairs of six cores."""
    footprints = [footprint_from_manifest(manifest_of(recorded, m)) for m in MODELS.values()]
    hbm = int(max(f.home_core_bytes for f in footprints) * 1.05)
    assert min(f.home_core_bytes for f in footprints) + min(f.unet_bytes for f in footprints) > hbm
    backend = NeuronBackend(inventory=CoreInventory(tuple(range(10, 16)), hbm, "test"))
    engine = Engine(recorded.registry, backend, EngineSettings(max_warm=3))
    recorder = recorded.recorder
    recorder.reset()
    for model in MODELS.values():
        engine.load(model)
    assert [dp.device_ids for dp in recorder.data_parallels] == [[0, 1], [2, 3], [4, 5]]
    assert all(dp.set_dynamic_batching is False for dp in recorder.data_parallels)
    # text encoders and the VAE (decoder + encoder) go to the home core, one core each
    expected_contexts = [(0, 1)] * 3 + [(2, 1)] * 3 + [(4, 1)] * 4  # sdxl has two text encoders
    assert recorder.core_contexts == expected_contexts
    # the warm-up generation ran the UNet on both cores with one row each, before load() returned
    unet_shapes = [trace_of(recorded, m, "unet").input_shapes for m in MODELS.values()]
    assert [dp.chunk_shapes[0] for dp in recorder.data_parallels] == unet_shapes
    status = engine.status()
    assert [(w["model"], w["device_ids"], w["physical_cores"]) for w in status["warm"]] == [
        ("tiny-sd15", [0, 1], [10, 11]), ("tiny-sd21", [2, 3], [12, 13]), ("tiny-sdxl", [4, 5], [14, 15])]
    assert [[m["model"] for m in pair["models"]] for pair in status["neuron"]["pairs"]] == [
        ["tiny-sd15@64x64"], ["tiny-sd21@64x64"], ["tiny-sdxl@64x64"]]
    for warm in status["warm"]:
        assert warm["load_seconds"] > 0 and warm["warmup_seconds"] > 0 and warm["peak_rss_mb"] > 0
    assert status["loading"] == []


def test_recorded_models_share_a_pair_and_alternate_home_cores(recorded):
    engine = Engine(recorded.registry, recorded.backend, EngineSettings(max_warm=3))
    recorder = recorded.recorder
    recorder.reset()
    for model in MODELS.values():
        engine.load(model)
    # the second model's home is the other core; the third goes home to whichever core is emptier
    # (a near tie between these tiny models: the exact artifact bytes decide)
    assert [dp.device_ids for dp in recorder.data_parallels][:2] == [[0, 1], [1, 0]]
    assert sorted(recorder.data_parallels[2].device_ids) == [0, 1]
    pairs = engine.status()["neuron"]["pairs"]
    assert len(pairs[0]["models"]) == 3 and pairs[1]["models"] == []
    assert engine.unload("tiny-sd21") == 1
    assert [m["model"] for m in engine.status()["neuron"]["pairs"][0]["models"]] == ["tiny-sd15@64x64",
                                                                                   "tiny-sdxl@64x64"]


@pytest.mark.parametrize("model", list(MODELS.values()))
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_recorded_generate_matches_the_cpu_backend(recorded, cpu_engine, model, img2img):
    """Per-core batch 1 x DataParallel(2) + the attention patch give the cpu backend's image."""
    extra = {}
    if img2img:
        init = Image.new("RGB", (64, 64), (0, 0, 255))
        init.paste((255, 0, 0), (16, 16, 48, 48))
        extra = {"init_image": init, "strength": 0.6}
    engine = Engine(recorded.registry, recorded.backend, EngineSettings(max_warm=1))
    request = GenerateRequest(model=model, prompt="a small square", seed=123, steps=3, **extra)
    neuron_image = engine.generate(request).images[0]
    cpu_image = cpu_engine.generate(request).images[0]
    assert np.abs(pixels(neuron_image.image) - pixels(cpu_image.image)).max() <= 1
    assert "Backend: neuron" in neuron_image.infotext
    assert Image.open(io.BytesIO(neuron_image.png)).size == (64, 64)


# --- replicas on a simulated inf2.48xlarge --------------------------------------------------------------


def inf2_48xlarge() -> NeuronBackend:
    return NeuronBackend(inventory=CoreInventory(tuple(range(24)), 16 * GIB, "test: inf2.48xlarge-like"))


def calls_per_replica(recorder) -> dict[tuple[int, ...], int]:
    return {tuple(dp.device_ids): len(dp.chunk_shapes) for dp in recorder.data_parallels}


def test_recorded_twelve_replicas_on_disjoint_pairs_share_the_requests(recorded):
    """--replicas tiny-sd15=12 on 24 cores (RECORDING stand-in): one replica per pair, each UNet
    DataParallel over its own two cores, and a burst of requests runs on every replica."""
    recorder = recorded.recorder
    recorder.reset()
    engine = Engine(recorded.registry, inf2_48xlarge(),
                    EngineSettings(replicas=(ReplicaTarget("tiny-sd15", None, 12),)))
    try:
        assert engine.start_replicas() == {"tiny-sd15@64x64": 12}
        assert sorted(dp.device_ids[0] // 2 for dp in recorder.data_parallels) == list(range(12))
        assert all(sorted(dp.device_ids) == [dp.device_ids[0] // 2 * 2, dp.device_ids[0] // 2 * 2 + 1]
                   for dp in recorder.data_parallels)
        assert engine.scheduler.workers >= 12
        before = calls_per_replica(recorder)
        jobs = [engine.submit(GenerateRequest(model="tiny-sd15", prompt="p", seed=i, steps=2)) for i in range(24)]
        for job in jobs:
            job.result(timeout=120)
        used = {cores for cores, calls in calls_per_replica(recorder).items() if calls > before[cores]}
        assert len(used) == 12, f"requests ran on {len(used)} of 12 replicas"
        warm = engine.status()["warm"]
        assert sorted(w["replica"] for w in warm) == list(range(12))
        assert sorted(tuple(w["physical_cores"]) for w in warm) == sorted(
            tuple(sorted(dp.device_ids)) for dp in recorder.data_parallels)
    finally:
        engine.close()


def test_recorded_concurrent_loads_never_overlap_in_the_core_context(recorded):
    """Four replicas loading on four worker threads (RECORDING stand-in): the core-selection context
    is never entered by two loads at once."""
    recorded.recorder.reset()
    engine = Engine(recorded.registry, inf2_48xlarge(), EngineSettings(replicas=(ReplicaTarget("tiny-sd15", None, 4),)))
    try:
        threads = [threading.Thread(target=engine.pool.ensure_replicas, args=(VariantKey("tiny-sd15", SIZE), 4))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(recorded.recorder.core_contexts) >= 4 and recorded.recorder.max_open_contexts == 1
    finally:
        engine.close()


def test_recorded_a_replica_that_fails_to_load_leaves_the_others_serving(recorded, monkeypatch):
    """The replica on cores 6-7 fails to load (RECORDING stand-in): eleven warm, requests still answered."""
    import engine.engine as engine_module

    real_load = engine_module.load_compiled

    def load_failing_on_core_6(registry, spec, size, backend, device_ids=()):
        if tuple(device_ids)[:1] == (6,):
            raise RuntimeError("NRT: failed to load the NEFF on NeuronCore 6")
        return real_load(registry, spec, size, backend, device_ids)

    monkeypatch.setattr(engine_module, "load_compiled", load_failing_on_core_6)
    recorded.recorder.reset()
    engine = Engine(recorded.registry, inf2_48xlarge(),
                    EngineSettings(replicas=(ReplicaTarget("tiny-sd15", None, 12),)))
    try:
        assert engine.start_replicas() == {"tiny-sd15@64x64": 11}
        assert 6 not in {core for w in engine.status()["warm"] for core in w["device_ids"]}
        jobs = [engine.submit(GenerateRequest(model="tiny-sd15", prompt="p", seed=i, steps=2)) for i in range(12)]
        assert all(len(job.result(timeout=120).images) == 1 for job in jobs)
        assert engine.status()["loading"] == [] and len(engine.status()["warm"]) == 11
    finally:
        engine.close()


# --- refusing what cannot run ---------------------------------------------------------------------------


def test_recorded_artifact_from_another_compiler_release_is_refused(recorded, monkeypatch):
    neuron_recorder.install(monkeypatch, neuronx_cc_version="2.22.1")
    backend = NeuronBackend(inventory=CoreInventory((0, 1)))
    assert [row.status.state for row in plan(recorded.registry, backend)] == ["stale"] * 3
    with pytest.raises(ArtifactMismatch) as failure:
        Engine(recorded.registry, backend).load("tiny-sd15")
    message = str(failure.value)
    assert f"neuronx-cc {neuron_recorder.RECORDED_NEURONX_CC_VERSION}" in message
    assert "this machine has neuronx-cc 2.22.1" in message
    command = artifacts.compile_command("tiny-sd15", SIZE, "neuron", recorded.registry.path)
    assert f"`{command} --force`" in message and "--backend neuron" in command


def test_recorded_artifact_needing_more_cores_than_present_is_refused(recorded):
    spec = recorded.registry.get("tiny-sd15")
    one_core = NeuronBackend(inventory=CoreInventory((3,), 16 * GIB, "test"))
    with pytest.raises(ArtifactMismatch) as failure:
        load_compiled(recorded.registry, spec, SIZE, one_core, (0,))
    message = str(failure.value)
    assert "needs 2 NeuronCores" in message and "NEURON_RT_VISIBLE_CORES=0-1" in message
    assert artifacts.compile_command("tiny-sd15", SIZE, "neuron", recorded.registry.path) in message
    with pytest.raises(BackendUnavailable, match="pair of NeuronCores"):
        Engine(recorded.registry, one_core)


def test_recorded_artifact_too_big_for_a_core_is_refused(recorded):
    spec = recorded.registry.get("tiny-sd15")
    tiny_memory = NeuronBackend(inventory=CoreInventory((0, 1), 1024, "test"))
    with pytest.raises(ArtifactMismatch, match=r"needs 0\.0 GiB on one NeuronCore.*dtype: bf16.*--force"):
        load_compiled(recorded.registry, spec, SIZE, tiny_memory, (0, 1))


def test_recorded_load_without_enough_host_ram_is_refused_before_reading_binaries(recorded):
    """inf2.xlarge-like host RAM for a model whose binaries need more (RECORDING stand-in): a clear
    refusal naming the instance types that fit, before any component loads."""
    spec = recorded.registry.get("tiny-sdxl")
    manifest = manifest_of(recorded, "tiny-sdxl")
    needed = sum(e["bytes"] for e in manifest["components"].values())
    small_host = NeuronBackend(inventory=CoreInventory((0, 1)), available_ram=lambda: needed // 2)
    recorded.recorder.reset()
    with pytest.raises(ModelLoadError, match=r"needs about .* GiB of free host RAM.*inf2\.xlarge, inf2\.8xlarge"):
        load_compiled(recorded.registry, spec, SIZE, small_host, (0, 1))
    assert recorded.recorder.data_parallels == [] and recorded.recorder.core_contexts == []
    roomy = NeuronBackend(inventory=CoreInventory((0, 1)), available_ram=lambda: needed * 2)
    warm = load_compiled(recorded.registry, spec, SIZE, roomy, (0, 1))
    assert list(warm.components)[0] == "unet"  # the UNet loads first and alone
    assert recorded.recorder.data_parallels and recorded.recorder.core_contexts  # UNet, then the rest


def test_missing_sdk_is_a_clear_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # what an environment without the SDK looks like
    with pytest.raises(BackendUnavailable) as failure:
        make_backend("neuron")
    message = str(failure.value)
    assert "torch_neuronx is not installed" in message
    assert "source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate" in message and "--backend cpu" in message
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))  # no trace(): placeholder
    with pytest.raises(BackendUnavailable, match="placeholder"):
        make_backend("neuron")


def test_neuron_environment_is_written_in_one_place_only(monkeypatch):
    neuron_recorder.install(monkeypatch)
    NeuronBackend(inventory=CoreInventory((0, 1)))
    import os

    assert os.environ["NEURON_FUSE_SOFTMAX"] == "1"
    writes = re.compile(r"os\.environ\[[^]]+\]\s*=(?!=)|os\.environ\.(update|setdefault|pop)\(|os\.putenv\(")
    writers = {str(path.relative_to(ROOT)) for path in (ROOT / "engine").rglob("*.py")
               if writes.search(path.read_text(encoding="utf-8"))}
    assert writers == {"engine/backends/neuron.py"}
    source = (ROOT / "engine" / "backends" / "neuron.py").read_text(encoding="utf-8")
    assert len(writes.findall(source)) == 1  # inside apply_neuron_environment


# --- real hardware --------------------------------------------------------------------------------------------


@pytest.mark.neuron
@pytest.mark.skipif(not HAS_NEURON_DEVICE, reason="needs a Neuron device (/dev/neuron*) and the Neuron SDK")
def test_real_hardware_compile_and_generate_tiny_sd15(tiny_dir, tmp_path, cpu_engine):
    """On an inf2/trn1 instance: neuronx-cc compiles the tiny SD1.5, it runs on a core pair, and
    the image stays close to the cpu backend's (bf16 matmuls are not used: fp32 is --auto-cast none)."""
    registry = load_registry(write_registry(tiny_dir, tmp_path, ["tiny-sd15"]))
    backend = make_backend("neuron")
    assert [o.state for o in compile_all(registry, backend, log=print)] == ["compiled"]
    engine = Engine(registry, backend)
    request = GenerateRequest(model="tiny-sd15", prompt="a small square", seed=123, steps=3)
    image = engine.generate(request).images[0].image
    status = engine.status()
    assert status["warm"][0]["device_ids"] == [0, 1] and status["warm"][0]["warmup_seconds"] > 0
    difference = np.abs(pixels(image) - pixels(cpu_engine.generate(request).images[0].image))
    assert difference.mean() < 2.0


def _hardware_app(registry_path: Path, cores: str, port: int):
    """``app.py`` on real NeuronCores ``cores`` (NEURON_RT_VISIBLE_CORES), as an admin starts it."""
    import os
    import subprocess

    env = {**os.environ, "NEURON_RT_VISIBLE_CORES": cores}
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--backend", "neuron", "--registry",
                             str(registry_path), "--port", str(port), "--no-autocompile"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.neuron
@pytest.mark.skipif(not HAS_NEURON_DEVICE or len(glob.glob("/dev/neuron[0-9]*")) < 2,
                    reason="needs two Neuron devices (/dev/neuron0, /dev/neuron1) and the Neuron SDK")
def test_real_hardware_a_model_off_core_0_and_a_second_process_refused(tiny_dir, tmp_path, monkeypatch):
    """On inf2.24xlarge or larger: a model placed on cores 2-3 generates (optimum-neuron PR 725 saw
    "Tensor allocated on vnc 0 must be allocated on same vnc as model" there), and a second app on
    the same cores is refused naming the first."""
    import time
    import urllib.request

    path = write_registry(tiny_dir, tmp_path, ["tiny-sd15"])
    registry = load_registry(path)
    compile_all(registry, make_backend("neuron"), log=print)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2-3")
    engine = Engine(registry, make_backend("neuron"))
    image = engine.generate(GenerateRequest(model="tiny-sd15", prompt="p", seed=1, steps=2)).images[0].image
    assert image.size == (64, 64) and engine.status()["warm"][0]["physical_cores"] == [2, 3]
    first = _hardware_app(path, "0-1", 7991)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen("http://127.0.0.1:7991/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(2)
        second = _hardware_app(path, "0-1", 7992)
        output, _ = second.communicate(timeout=600)
        assert second.returncode != 0 and f"process {first.pid}" in output and "belongs to one process" in output
    finally:
        first.terminate()
        first.wait(60)


def test_recorded_prompt_lengths_and_cfg_free_unets_are_their_own_graphs(tiny_dir, tmp_path, monkeypatch):
    """prompt_chunks [1, 2]: a UNet traced for 154 tokens; cfg_free_unet (default CFG 0): a UNet
    traced for one row, loaded on ONE NeuronCore (DataParallel over [first core]); a CFG 0 request
    runs it, a 2-chunk prompt runs the 154-token graph over the pair."""
    recorder = neuron_recorder.install(monkeypatch)
    path = write_registry(tiny_dir, tmp_path, ["tiny-sd15"])
    data = yaml.safe_load(path.read_text())
    data["models"][0].update(prompt_chunks=[1, 2], defaults={"sampler": "Euler", "steps": 2, "cfg_scale": 0})
    path.write_text(yaml.safe_dump(data))
    registry = load_registry(path)
    backend = NeuronBackend(inventory=CoreInventory((0, 1)))
    assert [o.state for o in compile_all(registry, backend, log=lambda line: None)] == ["compiled"]
    record = SimpleNamespace(registry=registry, traces=recorder.traces)
    manifest = manifest_of(record, "tiny-sd15")
    assert sorted(n for n in manifest["components"] if n.startswith("unet")) == [
        "unet", "unet_c2", "unet_c2_nocfg", "unet_nocfg"]
    base, long, single = (trace_of(record, "tiny-sd15", n) for n in ("unet", "unet_c2", "unet_nocfg"))
    assert base.input_shapes[2][1] == 77 and long.input_shapes[2][1] == 154  # encoder_hidden_states tokens
    assert single.input_shapes[0][0] == 1 and base.input_shapes[0][0] == 1  # per core: 1 row of 1, 1 of 2
    assert manifest["components"]["unet_nocfg"]["layout"] == {"batch_per_core": 1, "cores": 1, "batch_per_call": 1}
    assert manifest["components"]["unet"]["layout"]["cores"] == 2

    engine = Engine(registry, backend, EngineSettings())
    try:
        engine.load("tiny-sd15")
        assert sorted(len(c.device_ids) for c in recorder.data_parallels) == [1, 1, 2, 2]
        single_core = [c for c in recorder.data_parallels if len(c.device_ids) == 1]
        before = [len(c.chunk_shapes) for c in single_core]
        engine.generate(GenerateRequest(model="tiny-sd15", prompt="one", steps=2, cfg_scale=0, seed=1))
        assert sum(len(c.chunk_shapes) for c in single_core) - sum(before) == 2  # one one-core call per step
        result = engine.generate(GenerateRequest(model="tiny-sd15", prompt=" BREAK ".join(["a", "b"]), steps=2,
                                                 cfg_scale=5, seed=1))
        assert result.notices == () and result.images
    finally:
        engine.close()
