"""Where generated images are kept: every face (UI, HTTP API) saves through one ``OutputStore``."""
from __future__ import annotations

import re
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
        folder = self.root / f"{mode}-images" / (today or date.today()).isoformat()
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            number = self._next_number(folder)
            while True:  # another process may write into the same folder
                path = folder / f"{number:05d}-{image.seed}.png"
                try:
                    with open(path, "xb") as handle:
                        handle.write(image.png)
                    return path
                except FileExistsError:
                    number += 1

    def _next_number(self, folder: Path) -> int:
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := self._NUMBER.match(p.name))]
        return max(numbers, default=-1) + 1


__all__ = ["OutputStore"]
