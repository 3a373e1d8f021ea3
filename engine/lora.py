"""LoRAs fused into a model's UNet and text encoder(s) before it is traced or loaded.

A compiled graph (Neuron, TorchScript) holds its weights as constants: a LoRA cannot be switched on
per request at run time, as seed 004's dynamic LoRA does on GPU. So a registry entry lists its LoRAs
(``loras: [{source, scale}]``) and they are fused into the full-weight modules with diffusers' own
loader (``lora_state_dict`` → ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` →
``fuse_lora`` → ``unload_lora_weights``, the steps of ``pipe.load_lora_weights(); pipe.fuse_lora()``),
one component at a time, before compiling (and before serving on the eager backend).

This module reads LoRA files (format, hashes) and fuses them; the ``<lora:name:weight>`` prompt tags
are parsed in ``engine.prompts`` and matched to models in ``select_variant``.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .errors import InvalidRequest, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from .registry import LoraSpec, ModelSpec, Registry

FORMATS = ("kohya", "diffusers")
# How far a prompt's <lora:name:weight> may be from the compiled scale and still select it.
WEIGHT_TOLERANCE = 0.01
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# LyCORIS networks (LoHa, LoKr, full diff, DoRA) share kohya's prefixes but not its weights.
_LYCORIS_MARKS = ("hada_", "lokr_", ".diff", "dora_scale", ".oft_", "lora_mid.")


def _is_lycoris(key: str) -> bool:
    return key.startswith(tuple(_KOHYA_PREFIXES)) and any(mark in key for mark in _LYCORIS_MARKS)


class LoraFormatError(ValueError):
    """A file that is not a LoRA this loader reads; the message says what was found."""


@dataclass(frozen=True)
class LoraFile:
    """What the registry needs to know about a LoRA file without loading its tensors."""

    format: str  # "kohya" (A1111 / sd-scripts) or "diffusers" (diffusers / peft)
    components: tuple[str, ...]  # the modules it changes: unet, text_encoder, text_encoder_2
    sha256: str  # of the whole file: part of the artifact fingerprint
    short_hash: str  # A1111's "Lora hashes" value (see ``file_hashes``)
    metadata: Mapping[str, str]  # the safetensors header's __metadata__ (kohya's ss_* training notes)


def read_lora_file(path: "str | Path") -> LoraFile:
    """Format, components, hashes and metadata of a ``.safetensors`` LoRA; raises
    ``LoraFormatError`` (a ValueError) saying what the file holds when it is not a LoRA we read."""
    header = _safetensors_header(Path(path))
    metadata = header.pop("__metadata__", None) or {}
    keys = sorted(header)
    fmt, components = detect_format(keys)
    sha256, short_hash = file_hashes(Path(path))
    return LoraFile(fmt, components, sha256, short_hash, {str(k): str(v) for k, v in metadata.items()})


def detect_format(keys: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """("kohya" | "diffusers", components) from a LoRA's tensor names; raises LoraFormatError."""
    if not keys:
        raise LoraFormatError("the file holds no tensors")
    shown = ", ".join(list(keys)[:3])
    lycoris = [k for k in keys if _is_lycoris(k)]
    if lycoris:
        raise LoraFormatError(f"a LyCORIS network (LoHa / LoKr / DoRA / full diff, e.g. {lycoris[0]}), which "
                              "diffusers' LoRA loader does not read; convert it to a plain LoRA (lora_down / "
                              "lora_up) or use a kohya or diffusers LoRA")
    weights = [key for key in keys if not key.endswith(".alpha")]  # kohya's alphas are scalars beside them
    for fmt, prefixes in (("kohya", _KOHYA_PREFIXES), ("diffusers", _DIFFUSERS_PREFIXES)):
        if all(key.startswith(tuple(prefixes)) for key in keys) and all("lora" in key for key in weights):
            found = {component for key in keys for prefix, component in prefixes.items() if key.startswith(prefix)}
            return fmt, tuple(sorted(found))
    raise LoraFormatError(
        f"not a LoRA in kohya/A1111 format (tensors named lora_unet_… / lora_te_…) or diffusers/peft format "
        f"(unet.….lora_A.weight / text_encoder.….lora_B.weight); its tensors are named like: {shown}")


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise LoraFormatError(f"a {length}-byte safetensors header is not plausible")
            header = json.loads(handle.read(length))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError("not a safetensors file (its header does not read)") from None
    if not isinstance(header, dict):
        raise LoraFormatError("not a safetensors file (its header is not a mapping)")
    return header


# (path, size, mtime_ns) -> (sha256, short hash): a registry reload does not hash the same file again
_hashes: dict[tuple, tuple[str, str]] = {}


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, A1111's short hash): the short hash is the first 12 hex digits of
    the sha256 of the tensor data after the safetensors header, as kohya's sd-scripts and A1111's
    ``Lora hashes`` compute it (so the value matches what civitai and A1111 show for the file)."""
    stat = path.stat()
    identity = (str(path), stat.st_size, stat.st_mtime_ns)
    if identity not in _hashes:
        whole, tensors = hashlib.sha256(), hashlib.sha256()
        with open(path, "rb") as handle:
            head = handle.read(8)
            whole.update(head)
            header = handle.read(struct.unpack("<Q", head)[0])
            whole.update(header)
            for block in iter(lambda: handle.read(1 << 20), b""):
                whole.update(block)
                tensors.update(block)
        _hashes[identity] = (whole.hexdigest(), tensors.hexdigest()[:12])
    return _hashes[identity]


# --- fusing ----------------------------------------------------------------------------------------

def fuse_loras(family: str, modules: Mapping[str, "nn.Module"], loras: Sequence["LoraSpec"],
               unet_config: Optional[Mapping[str, Any]] = None, model_id: str = "") -> None:
    """Fuse ``loras`` (each at its scale) into ``modules`` in place: any of ``unet``, ``text_encoder``,
    ``text_encoder_2`` (the others need not be loaded). Each LoRA is loaded as a peft adapter, fused
    and unloaded in turn, so the modules come out as plain modules with changed weights.
    ``unet_config``: needed for SDXL kohya files (their UNet blocks are named after the original code)."""
    from diffusers.utils import USE_PEFT_BACKEND

    if loras and not USE_PEFT_BACKEND:
        raise ModelLoadError(f"model {model_id!r} lists LoRAs, and fusing them needs peft (diffusers' LoRA "
                             "loader runs on it): `pip install peft` (requirements.txt)")
    loader = _loader_class(family)
    for index, lora in enumerate(loras):
        targets = [name for name in lora.components if name in modules]
        if not targets:
            continue
        adapter = f"lora{index}"
        try:
            kwargs = {"unet_config": dict(unet_config)} if family == "sdxl" and unet_config else {}
            state_dict, alphas, metadata = loader.lora_state_dict(lora.path, return_lora_metadata=True, **kwargs)
            host = _host(loader, modules)
            for name in targets:
                if name == "unet":
                    loader.load_lora_into_unet(state_dict, alphas, modules[name], adapter_name=adapter,
                                               metadata=metadata)
                else:
                    loader.load_lora_into_text_encoder(state_dict, alphas, modules[name], prefix=name,
                                                       adapter_name=adapter, metadata=metadata)
            host.fuse_lora(components=targets, lora_scale=lora.scale, adapter_names=[adapter])
            host.unload_lora_weights()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"model {model_id!r}: cannot fuse LoRA {lora.name!r} ({lora.path}) into "
                                 f"{', '.join(targets)}: {exc}") from exc


def _loader_class(family: str) -> Any:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin


def _host(loader: Any, modules: Mapping[str, "nn.Module"]) -> Any:
    """An object with diffusers' pipeline-level ``fuse_lora`` / ``unload_lora_weights`` over the
    modules loaded now (the pipeline's other components are None, which those methods skip)."""
    host = type("LoraHost", (loader,), {})()
    for name in loader._lora_loadable_modules:
        setattr(host, name, modules.get(name))
    return host


# --- <lora:name:weight> in prompts ----------------------------------------------------------------

@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:weight>`` of a prompt (weight 1 when left out, as A1111)."""

    name: str
    weight: float

    def __str__(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"


def _matches(tag: LoraTag, lora: "LoraSpec") -> bool:
    return tag.name == lora.name and abs(tag.weight - lora.scale) <= WEIGHT_TOLERANCE


def _fused(spec: "ModelSpec") -> str:
    return ", ".join(f"{lora.name} at {lora.scale:g}" for lora in spec.loras) or "no LoRA"


def select_variant(registry: "Registry", spec: "ModelSpec", tags: Sequence[LoraTag]) -> "ModelSpec":
    """The model a request runs given its prompt's LoRA tags.

    ``spec`` itself when it has every tagged LoRA fused at the tagged weight (a tag-free prompt
    always runs ``spec``). Otherwise the one registry entry with the same base source whose fused
    LoRAs are exactly the tagged ones at the tagged weights (A1111 users pick the base model and type
    the tag). Otherwise ``InvalidRequest`` naming the models that have the LoRAs and their scales.
    """
    if all(any(_matches(tag, lora) for lora in spec.loras) for tag in tags):
        return spec
    same_base = [other for other in registry.models
                 if other.source.describe() == spec.source.describe() and other.family == spec.family
                 and len(other.loras) == len(tags) and all(any(_matches(t, l) for l in other.loras) for t in tags)]
    if len(same_base) == 1:
        return same_base[0]
    missing = [tag for tag in tags if not any(_matches(tag, lora) for lora in spec.loras)]
    where = []
    for tag in missing:
        scales: dict[float, list[str]] = {}
        for other in registry.models:
            for lora in other.loras:
                if lora.name == tag.name:
                    scales.setdefault(lora.scale, []).append(other.id)
        where.append("; ".join(f"{tag.name} is fused at {scale:g} into {', '.join(models)} "
                               f"(write <lora:{tag.name}:{scale:g}>)" for scale, models in scales.items())
                     or f"no model has a LoRA named {tag.name!r}")
    raise InvalidRequest(
        f"{spec.id} has {_fused(spec)} fused in, and the prompt asks for {', '.join(str(t) for t in missing)} "
        f"(a LoRA is fused into the weights at compile time, at one weight): {'; '.join(where)}. Pick a model "
        f"that has it, or add a registry entry with `loras: [{{source: FILE.safetensors, scale: WEIGHT}}]` to "
        f"{registry.path} and run `python compile_all.py --models NEW_ID`")


__all__ = ["FORMATS", "LoraFile", "LoraFormatError", "LoraTag", "detect_format", "file_hashes", "fuse_loras",
           "read_lora_file", "select_variant"]
