"""Compiled artifact layout, manifests and atomic publishing.

Layout: ``<artifacts_dir>/<model>/<WxH>/<backend>/<component>/model.pt`` plus
``<artifacts_dir>/<model>/<WxH>/<backend>/manifest.json``. A variant is written into a hidden
temporary directory beside its final place and renamed into place only when every component and
the manifest are written, so an interrupted compile never leaves a directory that loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import ArtifactCorrupt, ArtifactMismatch, ArtifactMissing
from .registry import ModelSpec
from .types import Size

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Bump when wrappers, example inputs or batch layout change: older artifacts become stale.
RECIPE_VERSION = 2  # 2: cpu bf16 UNet/VAE traced channels_last
_TEMP_PREFIX = ".partial-"
# Which component files' content was checked against the manifest's sha256, by file identity
# (size, mtime, inode): written beside the manifest when the directory is writable.
VERIFIED = ".verified.json"


def variant_dir(artifacts_dir: Path, model_id: str, size: Size, backend: str) -> Path:
    return Path(artifacts_dir) / model_id / str(size) / backend


def compile_command(model_id: str, size: Size, backend: str, registry_path: Optional[Path] = None) -> str:
    """The command that compiles one variant (naming the registry unless it is the project's own)."""
    from .registry import DEFAULT_REGISTRY

    registry = f" --registry {registry_path}" if registry_path and Path(registry_path) != DEFAULT_REGISTRY else ""
    return f"python compile_all.py{registry} --backend {backend} --models {model_id} --resolutions {size}"


def fingerprint(spec: ModelSpec, size: Size, backend: str, stack_key: str) -> str:
    """Everything that, when it changes, makes an artifact stale."""
    identity = {
        "recipe": RECIPE_VERSION,
        "family": spec.family,
        "source": spec.source.describe(),
        "dtype": spec.dtype,
        "size": str(size),
        "backend": backend,
        "stack": stack_key,
    }
    if spec.batch_sizes != (1,):  # (kept out for the default, so artifacts compiled before stay valid)
        identity["batch_sizes"] = list(spec.batch_sizes)
    if spec.prompt_chunks != (1,):  # one UNet graph per prompt length
        identity["prompt_chunks"] = list(spec.prompt_chunks)
    if spec.cfg_free_unet:  # UNet graphs for CFG <= 1 as well
        identity["cfg_free_unet"] = True
    if spec.loras:  # fused into the weights: another file or scale is another artifact
        identity["loras"] = [{"sha256": lora.sha256, "scale": lora.scale} for lora in spec.loras]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Optional[dict[str, Any]]:
    """The manifest of a published variant directory, or None if there is none / it is unreadable."""
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class VariantStatus:
    state: str  # "compiled" | "missing" | "stale" | "broken"
    reason: str = ""


def variant_status(directory: Path, expected_fingerprint: str) -> VariantStatus:
    manifest = read_manifest(directory)
    if manifest is None:
        return VariantStatus("missing", "no manifest")
    if manifest.get("fingerprint") != expected_fingerprint:
        return VariantStatus("stale", _stale_reason(manifest))
    for name, entry in manifest.get("components", {}).items():
        for file in files_of(entry):
            path = directory / file["file"]
            if not path.is_file() or path.stat().st_size != file["bytes"]:
                return VariantStatus("stale", f"{name} file is missing or changed")
            if _checked.get(_identity(path)) is False:
                return VariantStatus("broken", f"{name} content does not match its sha256")
    return VariantStatus("compiled")


def files_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The files of a manifest component: its own and, sharded over NeuronCores, the other ranks'
    (``shards``), each with ``file``, ``bytes`` and ``sha256``."""
    return [entry, *entry.get("shards", ())]


def _stale_reason(manifest: dict[str, Any]) -> str:
    versions = manifest.get("versions", {})
    stack = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    loras = "".join(f", LoRA {lora.get('name')} (sha256 {str(lora.get('sha256'))[:12]}) at {lora.get('scale')}"
                    for lora in manifest.get("loras", []))
    return f"compiled from {manifest.get('source')}{loras} as {manifest.get('dtype')} with {stack}"


def verified_manifest(
    directory: Path, expected_fingerprint: str, command: str
) -> dict[str, Any]:
    """The manifest of a loadable variant; raises ArtifactMissing / ArtifactMismatch otherwise."""
    status = variant_status(directory, expected_fingerprint)
    if status.state == "missing":
        raise ArtifactMissing(f"no compiled artifacts in {directory}; run `{command}`")
    if status.state == "stale":
        raise ArtifactMismatch(
            f"artifacts in {directory} do not match this model and software stack "
            f"({status.reason}); recompile with `{command} --force`"
        )
    manifest = read_manifest(directory)
    assert manifest is not None
    return manifest


def verify_checksums(directory: Path, manifest: dict[str, Any], *, force: bool = False) -> list[str]:
    """Names of components whose file content no longer matches the manifest's sha256.

    Each file is hashed once per identity (size, mtime, inode): a result is remembered in this process
    and, when it matched, in ``.verified.json`` beside the manifest, so a restart does not hash gigabytes
    again. Rewriting a file in place changes its mtime and makes it hashed again; ``force`` ignores
    what was remembered (``compile_all.py --verify``)."""
    remembered = {} if force else _read_verified(directory)
    broken = []
    for name, entry in manifest["components"].items():
        if not all([_matches(directory, file, remembered, force) for file in files_of(entry)]):
            broken.append(name)
    _write_verified(directory, manifest)
    return broken


def _matches(directory: Path, file: dict[str, Any], remembered: dict[str, list], force: bool) -> bool:
    identity = _identity(directory / file["file"])
    known = None if force else _known(identity, remembered.get(file["file"]))
    if known is None:
        known = sha256_file(directory / file["file"]) == file["sha256"]
    _checked[identity] = known
    return known


def check_content(directory: Path, manifest: dict[str, Any], label: str, command: str) -> None:
    """Raise ArtifactCorrupt when a component's content no longer matches the manifest (see
    ``verify_checksums``); ``label`` names the variant for the user (``model@WxH``)."""
    broken = verify_checksums(directory, manifest)
    if broken:
        raise ArtifactCorrupt(
            f"model {label} is broken: {', '.join(broken)} in {directory} no longer match the sha256 "
            f"recorded at compile (the file was changed or damaged after compiling); "
            f"recompile it with `{command} --force`")


# (path, size, mtime_ns, inode) -> whether the content matched the manifest's sha256
_checked: dict[tuple, bool] = {}


def _known(identity: tuple, remembered: Optional[list]) -> Optional[bool]:
    if identity in _checked:
        return _checked[identity]
    return True if remembered == list(identity[1:]) else None


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _read_verified(directory: Path) -> dict[str, list]:
    try:
        data = json.loads((directory / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verified(directory: Path, manifest: dict[str, Any]) -> None:
    good = {}
    for file in (f for entry in manifest["components"].values() for f in files_of(entry)):
        identity = _identity(directory / file["file"])
        if _checked.get(identity):
            good[file["file"]] = list(identity[1:])
    if good == _read_verified(directory):
        return
    tmp = directory / f"{VERIFIED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(good, sort_keys=True), encoding="utf-8")
        os.replace(tmp, directory / VERIFIED)
    except OSError:  # a read-only artifact directory (an image, /opt/ml/model): remember in memory only
        tmp.unlink(missing_ok=True)


class PartialVariant:
    """A variant being written: a temporary directory that becomes ``final`` on ``publish()``."""

    def __init__(self, final: Path):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = final.parent / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.components: dict[str, dict[str, Any]] = {}

    def component_dir(self, name: str) -> Path:
        path = self.path / name
        path.mkdir(exist_ok=True)
        return path

    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Add a written component; ``entry['file']`` is relative to the variant directory."""
        path = self.path / entry["file"]
        entry = {**entry, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        self.components[name] = entry

    def publish(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "format": MANIFEST_FORMAT, "components": self.components,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp_manifest = self.path / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp_manifest, self.path / MANIFEST)
        old = None
        if self.final.exists():
            old = self.final.parent / f"{_OLD_PREFIX}{self.final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for file in (f for entry in self.components.values() for f in files_of(entry)):  # hashed at record()
            _checked[_identity(self.final / file["file"])] = True
        _write_verified(self.final, manifest)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_OLD_PREFIX = f"{_TEMP_PREFIX}old-"


def restore_interrupted_publishes(artifacts_dir: Path) -> list[Path]:
    """Put back a published variant that an interrupted ``publish()`` had moved aside (killed between
    its two renames: the old variant is ``.partial-old-<name>-<id>`` and ``<name>`` is missing).
    Returns the variants restored; run before ``leftover_partials`` deletes what remains."""
    root = Path(artifacts_dir)
    restored = []
    for old in sorted(root.glob(f"*/*/{_OLD_PREFIX}*")) if root.is_dir() else ():
        final = old.parent / old.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
        if old.is_dir() and not final.exists() and (old / MANIFEST).is_file():
            os.replace(old, final)
            restored.append(final)
    return restored


def leftover_partials(artifacts_dir: Path) -> Iterator[Path]:
    """Temporary directories left behind by interrupted compiles (safe to delete once
    ``restore_interrupted_publishes`` has put back any variant moved aside)."""
    root = Path(artifacts_dir)
    if root.is_dir():
        yield from (p for p in root.glob(f"*/*/{_TEMP_PREFIX}*") if p.is_dir())


def discard_partial(path: Path) -> None:
    """Delete a leftover temporary directory (only ever one of ours)."""
    if not Path(path).name.startswith(_TEMP_PREFIX):
        raise ValueError(f"{path} is not a partial artifact directory")
    shutil.rmtree(path, ignore_errors=True)
