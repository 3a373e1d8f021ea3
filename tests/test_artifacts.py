"""Artifact layout, fingerprints, manifests, checksums and atomic publishing, on small files (fast;
compiling real variants is test_compile.py's and test_faults.py's job)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from engine import artifacts
from engine.artifacts import (PartialVariant, VariantStatus, check_content, compile_command, discard_partial,
                              fingerprint, leftover_partials, read_manifest, restore_interrupted_publishes,
                              sha256_file, variant_dir, variant_status, verified_manifest, verify_checksums)
from engine.errors import ArtifactCorrupt, ArtifactMismatch, ArtifactMissing
from engine.registry import DEFAULT_REGISTRY, Defaults, LoraSpec, ModelSource, ModelSpec
from engine.types import Size

SPEC = ModelSpec(id="m", title="M", family="sd15", source=ModelSource("hub", "org/repo", revision="v1"),
                 dtype="fp32", resolutions=(Size(64, 64),), defaults=Defaults())
UNET = b"unet weights " * 100
VAE = b"vae"


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    monkeypatch.setattr(artifacts, "_checked", {})  # what this process hashed: a new process per test


def _publish(final: Path, manifest=None) -> PartialVariant:
    partial = PartialVariant(final)
    for name, data in (("unet", UNET), ("vae_decoder", VAE)):
        (partial.component_dir(name) / "model.pt").write_bytes(data)
        partial.record(name, {"file": f"{name}/model.pt", "kind": "traced"})
    partial.publish({"fingerprint": "f" * 16, "source": "hub:org/repo", "dtype": "fp32",
                     "versions": {"torch": "2.1", "diffusers": "0.30"}} if manifest is None else manifest)
    return partial


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def test_layout_and_compile_command(tmp_path):
    assert variant_dir(tmp_path, "m", Size(64, 96), "cpu") == tmp_path / "m" / "64x96" / "cpu"
    assert compile_command("m", Size(64, 96), "neuron") == (
        "python compile_all.py --backend neuron --models m --resolutions 64x96")
    assert compile_command("m", Size(64, 96), "cpu", DEFAULT_REGISTRY) == (
        "python compile_all.py --backend cpu --models m --resolutions 64x96")
    assert compile_command("m", Size(64, 96), "cpu", tmp_path / "r.yaml") == (
        f"python compile_all.py --registry {tmp_path / 'r.yaml'} --backend cpu --models m --resolutions 64x96")


def test_the_fingerprint_covers_what_makes_an_artifact_stale():
    identity = {"recipe": 2, "family": "sd15", "source": "hub:org/repo@v1", "dtype": "fp32", "size": "64x64",
                "backend": "cpu", "stack": "torch 2.1"}
    assert fingerprint(SPEC, Size(64, 64), "cpu", "torch 2.1") == _digest(identity)
    batched = dataclasses.replace(SPEC, batch_sizes=(1, 4))
    assert fingerprint(batched, Size(64, 64), "cpu", "torch 2.1") == _digest({**identity, "batch_sizes": [1, 4]})
    loras = tuple(LoraSpec(name, f"/l/{name}.safetensors", scale, "kohya", ("unet",), digest * 64, digest * 12)
                  for name, scale, digest in (("detail", 0.8, "a"), ("style", -1.0, "b")))
    with_loras = dataclasses.replace(SPEC, loras=loras)
    assert fingerprint(with_loras, Size(64, 64), "cpu", "torch 2.1") == _digest(
        {**identity, "loras": [{"sha256": "a" * 64, "scale": 0.8}, {"sha256": "b" * 64, "scale": -1.0}]})


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    data = os.urandom((1 << 20) + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_published_variant_has_its_files_and_manifest_and_no_leftovers(tmp_path):
    final = tmp_path / "m" / "64x64" / "cpu"
    _publish(final)
    manifest = read_manifest(final)
    assert (final / "unet/model.pt").read_bytes() == UNET
    assert manifest["format"] == 1 and manifest["dtype"] == "fp32"
    assert manifest["components"] == {
        "unet": {"file": "unet/model.pt", "kind": "traced", "bytes": len(UNET), "sha256": hashlib.sha256(UNET).hexdigest()},
        "vae_decoder": {"file": "vae_decoder/model.pt", "kind": "traced", "bytes": 3, "sha256": hashlib.sha256(VAE).hexdigest()},
    }
    assert manifest["created"].endswith("Z") and len(manifest["created"]) == 20
    assert sorted(p.name for p in final.parent.iterdir()) == ["cpu"]
    assert sorted(p.name for p in final.iterdir()) == [".verified.json", "manifest.json", "unet", "vae_decoder"]
    assert variant_status(final, "f" * 16) == VariantStatus("compiled")
    assert verified_manifest(final, "f" * 16, "CMD") == manifest


def test_publishing_over_a_variant_replaces_it_whole(tmp_path):
    final = tmp_path / "m" / "64x64" / "cpu"
    _publish(final)
    (final / "stray").write_text("old")
    _publish(final, {"fingerprint": "g" * 16})
    assert not (final / "stray").exists() and read_manifest(final)["fingerprint"] == "g" * 16
    assert [p.name for p in final.parent.iterdir()] == ["cpu"]  # the old one moved aside and deleted


def test_missing_stale_and_broken_variants_say_why(tmp_path):
    final = tmp_path / "v"
    assert variant_status(final, "f" * 16) == VariantStatus("missing", "no manifest")
    with pytest.raises(ArtifactMissing) as info:
        verified_manifest(final, "f" * 16, "CMD")
    assert str(info.value) == f"no compiled artifacts in {final}; run `CMD`"
    final.mkdir()
    (final / "manifest.json").write_text("{not json")
    assert read_manifest(final) is None
    _publish(final)
    stale = VariantStatus("stale", "compiled from hub:org/repo as fp32 with diffusers 0.30, torch 2.1")
    assert variant_status(final, "e" * 16) == stale
    with pytest.raises(ArtifactMismatch) as info:
        verified_manifest(final, "e" * 16, "CMD")
    assert str(info.value) == (f"artifacts in {final} do not match this model and software stack ({stale.reason}); "
                               "recompile with `CMD --force`")
    (final / "vae_decoder/model.pt").write_bytes(b"vae!")
    assert variant_status(final, "f" * 16) == VariantStatus("stale", "vae_decoder file is missing or changed")
    (final / "vae_decoder/model.pt").unlink()
    assert variant_status(final, "f" * 16) == VariantStatus("stale", "vae_decoder file is missing or changed")
    (final / "manifest.json").write_text(json.dumps({"fingerprint": "f" * 16}))  # a manifest with nothing else
    assert variant_status(final, "f" * 16) == VariantStatus("compiled")
    assert variant_status(final, "e" * 16) == VariantStatus("stale", "compiled from None as None with ")
    with_lora = {"fingerprint": "f" * 16, "source": "hub:org/repo", "dtype": "fp32", "versions": {"torch": "2.1"},
                 "loras": [{"name": "detail", "sha256": "0123456789abcdef", "scale": 0.8},
                           {"name": "style", "sha256": "fedcba9876543210", "scale": -1}]}
    (final / "manifest.json").write_text(json.dumps(with_lora))
    assert variant_status(final, "e" * 16) == VariantStatus(
        "stale", "compiled from hub:org/repo, LoRA detail (sha256 0123456789ab) at 0.8, LoRA style (sha256 "
                 "fedcba987654) at -1 as fp32 with torch 2.1")


def test_damaged_content_of_the_same_size_is_found_and_named(tmp_path):
    final = tmp_path / "v"
    _publish(final)
    manifest = read_manifest(final)
    assert verify_checksums(final, manifest) == []
    (final / "unet/model.pt").write_bytes(UNET.upper())  # same size, new mtime
    assert verify_checksums(final, manifest) == ["unet"]
    assert variant_status(final, "f" * 16) == VariantStatus("broken", "unet content does not match its sha256")
    assert list(json.loads((final / ".verified.json").read_text())) == ["vae_decoder/model.pt"]
    (final / "vae_decoder/model.pt").write_bytes(b"VAE")
    with pytest.raises(ArtifactCorrupt) as info:
        check_content(final, manifest, "m@64x64", "CMD")
    assert str(info.value) == (
        f"model m@64x64 is broken: unet, vae_decoder in {final} no longer match the sha256 recorded at compile (the "
        "file was changed or damaged after compiling); recompile it with `CMD --force`")


def test_each_file_is_hashed_once_until_it_changes_or_force(tmp_path, monkeypatch):
    final = tmp_path / "v"
    _publish(final)
    manifest = read_manifest(final)
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(Path(path).parent.name) or real(path))
    check_content(final, manifest, "m@64x64", "CMD")
    assert hashed == []  # publish() just hashed them
    monkeypatch.setattr(artifacts, "_checked", {})  # a restart: .verified.json remembers
    assert verify_checksums(final, manifest) == [] and hashed == []
    assert verify_checksums(final, manifest, force=True) == [] and hashed == ["unet", "vae_decoder"]
    monkeypatch.setattr(artifacts, "_checked", {})
    (final / ".verified.json").write_text("[1, 2]")  # not a mapping: hash again
    assert verify_checksums(final, manifest) == [] and hashed[2:] == ["unet", "vae_decoder"]
    recorded = json.loads((final / ".verified.json").read_text())
    unet = (final / "unet/model.pt").stat()
    assert recorded["unet/model.pt"] == [unet.st_size, unet.st_mtime_ns, unet.st_ino]
    monkeypatch.setattr(artifacts, "_checked", {})
    os.utime(final / "unet/model.pt", ns=(unet.st_atime_ns, unet.st_mtime_ns + 10**9))  # rewritten in place
    assert verify_checksums(final, manifest) == [] and hashed[4:] == ["unet"]


def test_a_read_only_variant_is_remembered_in_memory(tmp_path, monkeypatch):
    final = tmp_path / "v"
    _publish(final)
    manifest = read_manifest(final)
    (final / ".verified.json").unlink()

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(artifacts.os, "replace", read_only)  # an image, /opt/ml/model
    assert verify_checksums(final, manifest) == []
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "unet", "vae_decoder"]  # no temp left
    monkeypatch.setattr(artifacts.Path, "write_text", read_only)  # not even a temporary file
    monkeypatch.setattr(artifacts, "_checked", {})
    assert verify_checksums(final, manifest) == []


def test_an_interrupted_publish_is_restored_and_partials_are_found(tmp_path):
    root = tmp_path / "artifacts"
    final = root / "m" / "64x64" / "cpu"
    _publish(final)
    aside = final.parent / ".partial-old-cpu-1234abcd"
    os.replace(final, aside)  # killed between publish()'s two renames
    unfinished = PartialVariant(root / "m" / "64x96" / "neuron")
    empty_old = final.parent / ".partial-old-neuron-99999999"
    empty_old.mkdir()  # no manifest: not a variant, never restored
    assert restore_interrupted_publishes(root) == [final]
    assert variant_status(final, "f" * 16).state == "compiled"
    assert restore_interrupted_publishes(tmp_path / "none") == []
    partials = sorted(leftover_partials(root))
    assert partials == sorted([empty_old, unfinished.path])
    assert re.fullmatch(rf"\.partial-neuron-{os.getpid()}-[0-9a-f]{{8}}", unfinished.path.name)
    assert list(leftover_partials(tmp_path / "none")) == []
    for path in partials:
        discard_partial(path)
    assert list(leftover_partials(root)) == [] and final.is_dir()
    again = PartialVariant(final)
    assert again.component_dir("unet") == again.component_dir("unet") == again.path / "unet"  # may be asked twice
    again.discard()
    assert not again.path.exists() and final.is_dir()
    with pytest.raises(ValueError) as info:
        discard_partial(final)
    assert str(info.value) == f"{final} is not a partial artifact directory"
