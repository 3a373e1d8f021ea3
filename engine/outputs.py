"""Where generated images are kept: every face (UI, HTTP API) saves through one ``OutputStore``."""
from __future__ import annotations

import os
import re
import tempfile
import threading
from datetime import date
from pathlib import Path
from typing import Optional

from .types import GeneratedImage


class OutputStore:
    """Saves every image as A1111 does: ``<outputs>/<mode>-images/YYYY-MM-DD/NNNNN-<seed>.png``.

    Images are written as soon as they are made, with their ``parameters`` chunk, so closing the
    browser (or losing the connection) loses nothing.
    """

    _NUMBER = re.compile(r"^(\d+)-")

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    def save(self, mode: str, image: GeneratedImage, today: Optional[date] = None) -> Path:
        """Write the PNG under a hidden temporary name, then link it to its numbered name: a crash or a
        full disk never leaves a partial PNG that looks finished, and no name is ever overwritten."""
        folder = self.root / f"{mode}-images" / (today or date.today()).isoformat()
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".partial-", suffix=".png", delete=False) as handle:
                temporary = Path(handle.name)
            try:
                temporary.write_bytes(image.png)
                return self._publish(temporary, folder, image.seed)
            finally:
                temporary.unlink(missing_ok=True)

    def _publish(self, temporary: Path, folder: Path, seed: int) -> Path:
        number = self._next_number(folder)
        while True:  # another process may write into the same folder
            path = folder / f"{number:05d}-{seed}.png"
            try:
                os.link(temporary, path)  # atomic, and fails instead of replacing an existing file
                return path
            except FileExistsError:
                number += 1

    def _next_number(self, folder: Path) -> int:
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := self._NUMBER.match(p.name))]
        return max(numbers, default=-1) + 1


__all__ = ["OutputStore"]
