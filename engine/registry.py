"""Load and validate ``model_registry.yaml`` into frozen ``Registry`` / ``ModelSpec`` values.

The YAML is read once and checked completely; every problem is reported with the file, the model
id, the field, what was expected and what was found. No loose dicts travel past this module.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import RegistryError
from .types import Size

FAMILIES = ("sd15", "sd21", "sdxl", "pixart-sigma")
# Tensor parallelism (NeuronCores one model's T5 and transformer are sharded over on Neuron): PixArt-Sigma
# only. 8 is seed 002's setting for trn1/inf2 (4 on trn2); docs/inferentia.md.
TENSOR_PARALLEL_FAMILIES = ("pixart-sigma",)
DEFAULT_TP_DEGREE = 8
TP_DEGREES = (1, 2, 4, 8, 16, 32)
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "model_registry.yaml"
DTYPES = ("fp32", "bf16")
SOURCE_KINDS = ("hub", "local", "single_file")

# Where a single-file checkpoint takes its configs and tokenizers from, unless the entry says.
DEFAULT_SINGLE_FILE_CONFIG = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a hub repo id, a local diffusers directory or one checkpoint.

    ``config`` (single files only) is the hub id or directory holding the diffusers configs and
    tokenizers that go with the checkpoint.
    """

    kind: str
    ref: str
    revision: Optional[str] = None
    config: Optional[str] = None
    # A pickle checkpoint (.ckpt) may be opened only when the admin said so (--allow-unsafe-pickle).
    unpickle_allowed: bool = False

    @property
    def is_pickle(self) -> bool:
        return self.kind == "single_file" and self.ref.lower().endswith(".ckpt")

    def describe(self) -> str:
        text = f"{self.kind}:{self.ref}"
        if self.revision:
            text += f"@{self.revision}"
        return text

    @property
    def config_ref(self) -> str:
        """The hub id or directory to read configs and tokenizers from."""
        return self.config if self.kind == "single_file" and self.config else self.ref


@dataclass(frozen=True)
class Defaults:
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0


@dataclass(frozen=True)
class Scaling:
    """Replicas of a model under Ray Serve (``python app.py --ray``): Serve's autoscaling between
    ``min_replicas`` (0: scale to zero when idle) and ``max_replicas``, aiming at
    ``target_ongoing_requests`` per replica; ``idle_s``: how long a replica may sit idle before
    Serve scales down."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    idle_s: float = 60.0


# Families whose UNet and CLIP text encoders take LoRAs (diffusers' SD / SDXL LoRA loaders).
LORA_FAMILIES = ("sd15", "sd21", "sdxl")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA fused into the model's UNet and text encoder(s) before compiling (engine.lora).

    ``name``: what ``<lora:name:weight>`` in a prompt calls it (the file stem unless the entry says);
    ``scale``: the weight it is fused at. ``sha256`` (of the file) and ``scale`` are part of the
    artifact fingerprint: changing either recompiles. ``short_hash`` is A1111's ``Lora hashes`` value."""

    name: str
    path: str
    scale: float
    format: str  # "kohya" | "diffusers"
    components: tuple[str, ...]  # unet, text_encoder, text_encoder_2: the modules it changes
    sha256: str
    short_hash: str
    metadata: tuple[tuple[str, str], ...] = ()  # the file's safetensors metadata (A1111 lists it)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    title: str
    family: str
    source: ModelSource
    dtype: str
    resolutions: tuple[Size, ...]
    defaults: Defaults
    # Requests per compiled UNet call (each a CFG pair): 1 always, more to batch concurrent requests.
    batch_sizes: tuple[int, ...] = (1,)
    scaling: Scaling = Scaling()
    tp_degree: int = 1  # NeuronCores the sharded components span (PixArt-Sigma on Neuron; 1: no sharding)
    loras: tuple[LoraSpec, ...] = ()  # fused into the weights before compiling, in this order
    # Prompt lengths the UNet is compiled for, in 75-token chunks (A1111's long prompts): 1 always.
    prompt_chunks: tuple[int, ...] = (1,)
    # Also compile the UNet for requests at CFG <= 1 (no unconditional half: one row per request, on
    # Neuron one core); default: when the model's default CFG is at most 1 (turbo / LCM models).
    cfg_free_unet: bool = False

    @property
    def default_size(self) -> Size:
        return self.resolutions[0]

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]


@dataclass(frozen=True)
class Registry:
    path: Path
    artifacts_dir: Path
    default_model: str
    models: tuple[ModelSpec, ...]
    allow_unsafe_pickle: bool = False  # how it was loaded (a reload keeps it)

    def get(self, model_id: str) -> ModelSpec:
        from .errors import UnknownModel

        for spec in self.models:
            if spec.id == model_id:
                return spec
        known = ", ".join(s.id for s in self.models)
        raise UnknownModel(f"unknown model {model_id!r}; the registry {self.path} has: {known}")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.models)


class _Checker:
    """Collects the context (file, model, field) for error messages."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, model: Optional[str], field: str, expected: str, found: Any) -> RegistryError:
        where = f"{self.path}"
        if model is not None:
            where += f": model {model!r}"
        return RegistryError(f"{where}, field {field!r}: expected {expected}, found {found!r}")


def load_registry(path: "str | Path", allow_unsafe_pickle: bool = False) -> Registry:
    """Read and validate a registry file. Relative paths inside it are relative to the file.

    ``allow_unsafe_pickle``: let ``.ckpt`` sources be opened (torch's ``weights_only`` unpickler);
    otherwise loading one fails with a message that says how to convert it to safetensors."""
    path = Path(path).resolve()
    check = _Checker(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"registry file {path} does not exist; pass --registry PATH") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise check.fail(None, "<top level>", "a mapping with 'models'", type(data).__name__)
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise check.fail(None, "models", "a non-empty list of models", raw_models)
    models = tuple(_parse_model(check, raw, index) for index, raw in enumerate(raw_models))
    if allow_unsafe_pickle:
        models = tuple(replace(m, source=replace(m.source, unpickle_allowed=True)) for m in models)
    _check_unique(check, models)
    default_model = data.get("default_model", models[0].id)
    if default_model not in {m.id for m in models}:
        raise check.fail(None, "default_model", f"one of {[m.id for m in models]}", default_model)
    artifacts_dir = data.get("artifacts_dir", "artifacts")
    if not isinstance(artifacts_dir, str) or not artifacts_dir:
        raise check.fail(None, "artifacts_dir", "a directory path", artifacts_dir)
    return Registry(
        path=path,
        artifacts_dir=(path.parent / artifacts_dir).resolve(),
        default_model=default_model,
        models=models,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )


def _check_unique(check: _Checker, models: tuple[ModelSpec, ...]) -> None:
    seen: set[str] = set()
    for spec in models:
        if spec.id in seen:
            raise check.fail(spec.id, "id", "each model id to appear once", f"duplicate {spec.id}")
        seen.add(spec.id)


def _parse_model(check: _Checker, raw: Any, index: int) -> ModelSpec:
    if not isinstance(raw, dict):
        raise check.fail(None, f"models[{index}]", "a mapping", raw)
    model_id = raw.get("id")
    if not isinstance(model_id, str) or not model_id.strip() or "/" in model_id:
        raise check.fail(None, f"models[{index}].id", "a name without '/'", model_id)
    family = raw.get("family")
    if family not in FAMILIES:
        raise check.fail(model_id, "family", f"one of {', '.join(FAMILIES)}", family)
    dtype = raw.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise check.fail(model_id, "dtype", f"one of {', '.join(DTYPES)}", dtype)
    _check_family_limits(check, model_id, family, raw)
    defaults = _parse_defaults(check, model_id, raw.get("defaults", {}), family)
    return ModelSpec(
        id=model_id,
        title=str(raw.get("title", model_id)),
        family=family,
        source=_parse_source(check, model_id, family, raw.get("source")),
        dtype=dtype,
        resolutions=_parse_resolutions(check, model_id, raw.get("resolutions")),
        defaults=defaults,
        batch_sizes=_parse_batch_sizes(check, model_id, raw.get("batch_sizes", [1])),
        scaling=_parse_scaling(check, model_id, raw.get("scaling", {})),
        tp_degree=_parse_tp_degree(check, model_id, family, raw),
        loras=_parse_loras(check, model_id, family, raw.get("loras", [])),
        prompt_chunks=_parse_prompt_chunks(check, model_id, family, raw.get("prompt_chunks", [1])),
        cfg_free_unet=_parse_cfg_free_unet(check, model_id, family, raw.get("cfg_free_unet",
                                                                             defaults.cfg_scale <= 1)),
    )


def _parse_cfg_free_unet(check: _Checker, model_id: str, family: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise check.fail(model_id, "cfg_free_unet", "true or false", raw)
    if raw and family in TENSOR_PARALLEL_FAMILIES:
        raise check.fail(model_id, "cfg_free_unet", f"false for family {family} (one transformer graph)", raw)
    return raw


_LORA_FIELDS = ("source", "scale", "name")


def _parse_loras(check: _Checker, model_id: str, family: str, raw: Any) -> tuple[LoraSpec, ...]:
    """``loras: [{source: FILE.safetensors, scale: 0.8, name: detail}]``: each file is read here (its
    header and a hash, not its tensors) so a wrong file fails when the registry loads."""
    from .lora import LoraFormatError, read_lora_file

    if raw == []:
        return ()
    if family not in LORA_FAMILIES:
        raise check.fail(model_id, "loras", f"no loras for family {family} (only {', '.join(LORA_FAMILIES)})", raw)
    if not isinstance(raw, list):
        raise check.fail(model_id, "loras", "a list of mappings such as [{source: detail.safetensors, scale: 0.8}]",
                         raw)
    loras: list[LoraSpec] = []
    for index, item in enumerate(raw):
        field = f"loras[{index}]"
        if not isinstance(item, dict) or "source" not in item:
            raise check.fail(model_id, field, "a mapping with source (and scale, name)", item)
        unknown = sorted(set(item) - set(_LORA_FIELDS))
        if unknown:
            raise check.fail(model_id, f"{field}.{unknown[0]}", f"one of {', '.join(_LORA_FIELDS)}", unknown[0])
        source = item["source"]
        if not isinstance(source, str) or not source.lower().endswith(".safetensors"):
            raise check.fail(model_id, f"{field}.source", "a .safetensors LoRA file (a path relative to the registry)",
                             source)
        path = (check.path.parent / source).resolve()
        if not path.is_file():
            raise check.fail(model_id, f"{field}.source", "an existing .safetensors file", str(path))
        scale = item.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not -10 <= scale <= 10 or scale == 0:
            raise check.fail(model_id, f"{field}.scale", "a number from -10 to 10 other than 0 (the LoRA's weight)",
                             scale)
        name = item.get("name", path.stem)
        if not isinstance(name, str) or not name.strip() or any(c in name for c in ":<>,"):
            raise check.fail(model_id, f"{field}.name", "a name without ':', '<', '>' or ','", name)
        if name in (lora.name for lora in loras):
            raise check.fail(model_id, f"{field}.name", "each LoRA name once per model", name)
        try:
            info = read_lora_file(path)
        except LoraFormatError as exc:
            raise check.fail(model_id, f"{field}.source", f"a LoRA (kohya/A1111 or diffusers/peft format) — {exc}",
                             str(path)) from None
        if "text_encoder_2" in info.components and family != "sdxl":
            raise check.fail(model_id, f"{field}.source", f"a LoRA for {family} (this one has text_encoder_2 weights: "
                             "an SDXL LoRA)", str(path))
        loras.append(LoraSpec(name=name, path=str(path), scale=float(scale), format=info.format,
                              components=info.components, sha256=info.sha256, short_hash=info.short_hash,
                              metadata=tuple(sorted(info.metadata.items()))))
    return tuple(loras)


def _check_family_limits(check: _Checker, model_id: str, family: str, raw: dict) -> None:
    """What a family cannot do: PixArt-Sigma has no single-file loader and one compiled batch size."""
    if family not in TENSOR_PARALLEL_FAMILIES:
        return
    source = raw.get("source")
    if isinstance(source, dict) and "single_file" in source:
        raise check.fail(model_id, "source", f"hub or local for family {family} (no single-file loader)", source)
    if raw.get("batch_sizes", [1]) != [1]:
        raise check.fail(model_id, "batch_sizes", f"[1] for family {family} (one request per transformer call)",
                         raw.get("batch_sizes"))


def _parse_tp_degree(check: _Checker, model_id: str, family: str, raw: dict) -> int:
    if family not in TENSOR_PARALLEL_FAMILIES:
        if "tp_degree" in raw:
            raise check.fail(model_id, "tp_degree", f"no tp_degree for family {family} (only for "
                             f"{', '.join(TENSOR_PARALLEL_FAMILIES)})", raw["tp_degree"])
        return 1
    tp = raw.get("tp_degree", DEFAULT_TP_DEGREE)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp not in TP_DEGREES:
        raise check.fail(model_id, "tp_degree", f"one of {', '.join(map(str, TP_DEGREES))}", tp)
    return tp


def _parse_source(check: _Checker, model_id: str, family: str, raw: Any) -> ModelSource:
    if not isinstance(raw, dict):
        raise check.fail(model_id, "source", f"a mapping with one of {SOURCE_KINDS}", raw)
    kinds = [k for k in SOURCE_KINDS if k in raw]
    if len(kinds) != 1:
        raise check.fail(model_id, "source", f"exactly one of {', '.join(SOURCE_KINDS)}", raw)
    kind = kinds[0]
    ref = raw[kind]
    if not isinstance(ref, str) or not ref.strip():
        raise check.fail(model_id, f"source.{kind}", "a non-empty string", ref)
    base = check.path.parent
    config = raw.get("config")
    if kind == "local":
        ref = str((base / ref).resolve())
        if not (Path(ref) / "model_index.json").is_file():
            raise check.fail(model_id, "source.local", "a diffusers directory with model_index.json", ref)
    elif kind == "single_file":
        ref = str((base / ref).resolve())
        if not ref.endswith((".safetensors", ".ckpt")):
            raise check.fail(model_id, "source.single_file", "a .safetensors or .ckpt file", ref)
        config = config or DEFAULT_SINGLE_FILE_CONFIG[family]
        if (base / config).is_dir():
            config = str((base / config).resolve())
    revision = raw.get("revision")
    if revision is not None and kind != "hub":
        raise check.fail(model_id, "source.revision", "a revision only with a hub source", revision)
    return ModelSource(kind=kind, ref=ref, revision=revision, config=config)


def _parse_resolutions(check: _Checker, model_id: str, raw: Any) -> tuple[Size, ...]:
    if not isinstance(raw, list) or not raw:
        raise check.fail(model_id, "resolutions", "a non-empty list such as [512x512]", raw)
    sizes: list[Size] = []
    for index, item in enumerate(raw):
        field = f"resolutions[{index}]"
        try:
            size = Size.parse(item)
        except ValueError:
            raise check.fail(model_id, field, "WIDTHxHEIGHT such as 512x512", item) from None
        if size.width % 8 or size.height % 8 or size.width <= 0 or size.height <= 0:
            raise check.fail(model_id, field, "width and height that are positive multiples of 8", item)
        if size in sizes:
            raise check.fail(model_id, field, "each resolution once", item)
        sizes.append(size)
    return tuple(sizes)


MAX_PROMPT_CHUNKS = 8  # 600 tokens: every compiled chunk count is another UNet graph
MAX_COMPILED_BATCH = 16


def _parse_prompt_chunks(check: _Checker, model_id: str, family: str, raw: Any) -> tuple[int, ...]:
    """Sorted, unique, 1 always included; PixArt-Sigma's T5 reads 300 tokens in one piece (no chunks)."""
    if family in TENSOR_PARALLEL_FAMILIES and raw != [1]:
        raise check.fail(model_id, "prompt_chunks", f"[1] for family {family} (its T5 reads 300 tokens at once)", raw)
    return _parse_compiled_counts(check, model_id, "prompt_chunks", raw, MAX_PROMPT_CHUNKS, "[1, 2] (75 tokens each)")


def _parse_batch_sizes(check: _Checker, model_id: str, raw: Any) -> tuple[int, ...]:
    """Sorted, unique, 1 always included (a lone request must never wait for company)."""
    return _parse_compiled_counts(check, model_id, "batch_sizes", raw, MAX_COMPILED_BATCH, "[1, 4]")


def _parse_compiled_counts(check: _Checker, model_id: str, field: str, raw: Any, maximum: int,
                           example: str) -> tuple[int, ...]:
    """A list of whole numbers from 1 to ``maximum`` (one compiled graph each): sorted, unique, with 1."""
    expected = f"a list of whole numbers from 1 to {maximum} such as {example}"
    if not isinstance(raw, list) or not raw:
        raise check.fail(model_id, field, expected, raw)
    for index, item in enumerate(raw):
        if not isinstance(item, int) or isinstance(item, bool) or not 1 <= item <= maximum:
            raise check.fail(model_id, f"{field}[{index}]", expected, item)
    return tuple(sorted({1, *raw}))


# Family defaults where they differ from A1111's: PixArt-Sigma's pipeline runs DPM-Solver (A1111 "DPM++ 2M"),
# 20 steps, CFG 4.5.
FAMILY_DEFAULTS = {"pixart-sigma": Defaults(sampler="DPM++ 2M", steps=20, cfg_scale=4.5)}


def _parse_defaults(check: _Checker, model_id: str, raw: Any, family: str = "sd15") -> Defaults:
    if not isinstance(raw, dict):
        raise check.fail(model_id, "defaults", "a mapping of sampler, steps, cfg_scale", raw)
    from .samplers import LCM_MAX_STEPS, check_sampler, family_sampler_names

    base = FAMILY_DEFAULTS.get(family, Defaults())
    sampler = raw.get("sampler", base.sampler)
    usable = family_sampler_names(family)
    if sampler not in usable:
        raise check.fail(model_id, "defaults.sampler", f"one of {', '.join(usable)}", sampler)
    steps = raw.get("steps", base.steps)
    if not isinstance(steps, int) or not 1 <= steps <= 150:
        raise check.fail(model_id, "defaults.steps", "an integer from 1 to 150", steps)
    if check_sampler(sampler).scheduler_class == "LCMScheduler" and steps > LCM_MAX_STEPS:
        raise check.fail(model_id, "defaults.steps", f"an integer from 1 to {LCM_MAX_STEPS} for sampler {sampler}",
                         steps)
    # 0 to 1: few-step models (sd-turbo, LCM) run without guidance; at CFG <= 1 diffusers runs no unconditional half.
    cfg = raw.get("cfg_scale", base.cfg_scale)
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not 0 <= cfg <= 30:
        raise check.fail(model_id, "defaults.cfg_scale", "a number from 0 to 30", cfg)
    return Defaults(sampler=sampler, steps=steps, cfg_scale=float(cfg))


def _parse_scaling(check: _Checker, model_id: str, raw: Any) -> Scaling:
    if not isinstance(raw, dict):
        raise check.fail(model_id, "scaling", "a mapping of min_replicas, max_replicas, target_ongoing_requests, idle_s",
                         raw)
    unknown = sorted(set(raw) - {"min_replicas", "max_replicas", "target_ongoing_requests", "idle_s"})
    if unknown:
        raise check.fail(model_id, f"scaling.{unknown[0]}",
                         "one of min_replicas, max_replicas, target_ongoing_requests, idle_s", unknown[0])
    base = Scaling()
    low, high = raw.get("min_replicas", base.min_replicas), raw.get("max_replicas", None)
    if not isinstance(low, int) or isinstance(low, bool) or not 0 <= low <= 1000:
        raise check.fail(model_id, "scaling.min_replicas", "a whole number from 0 (scale to zero) to 1000", low)
    high = max(low, 1) if high is None else high
    if not isinstance(high, int) or isinstance(high, bool) or not max(low, 1) <= high <= 1000:
        raise check.fail(model_id, "scaling.max_replicas", f"a whole number from {max(low, 1)} (min_replicas) to 1000",
                         high)
    target = raw.get("target_ongoing_requests", base.target_ongoing_requests)
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 64:
        raise check.fail(model_id, "scaling.target_ongoing_requests", "a number above 0 and at most 64", target)
    idle = raw.get("idle_s", base.idle_s)
    if not isinstance(idle, (int, float)) or isinstance(idle, bool) or not 0 <= idle <= 86400:
        raise check.fail(model_id, "scaling.idle_s", "seconds from 0 to 86400", idle)
    return Scaling(low, high, float(target), float(idle))
