"""engine/outputs.py: numbered PNGs that are never overwritten and never left half-written."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from PIL import Image

from engine import OutputStore, OutputWriteError
from engine.infotext import png_with_parameters
from engine.types import GeneratedImage

DAY = date(2026, 11, 25)


def generated(seed: int) -> GeneratedImage:
    image = Image.new("RGB", (8, 8), (seed % 256, 0, 0))
    return GeneratedImage(image, seed, f"x\nSeed: {seed}", png_with_parameters(image, f"x\nSeed: {seed}"))


def test_images_are_numbered_like_a1111_and_never_overwritten(tmp_path):
    store = OutputStore(tmp_path)
    folder = tmp_path / "txt2img-images" / "2026-11-25"
    folder.mkdir(parents=True)
    (folder / "00007-1.png").write_bytes(b"someone else's image")
    paths = [store.save("txt2img", generated(seed), today=DAY) for seed in (42, 43)]
    assert [p.name for p in paths] == ["00008-42.png", "00009-43.png"]
    assert (folder / "00007-1.png").read_bytes() == b"someone else's image"
    assert Image.open(paths[0]).info["parameters"] == "x\nSeed: 42"
    assert not list(folder.glob(".partial-*"))


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    """A full disk (ENOSPC) while writing: an error for the caller, no partial PNG in the outputs."""
    store = OutputStore(tmp_path)

    def disk_full(self: Path, data: bytes) -> int:
        self.open("wb").write(data[:10])  # part of it got written before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OutputWriteError, match="could not be saved in .*No space left on device.*free some disk space"):
        store.save("txt2img", generated(1), today=DAY)
    monkeypatch.undo()
    assert list((tmp_path / "txt2img-images" / "2026-11-25").iterdir()) == []
    assert store.save("txt2img", generated(2), today=DAY).name == "00000-2.png"
