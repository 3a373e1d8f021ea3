"""Where generated images are kept: every face (UI, HTTP API) saves through one ``OutputStore``."""
from __future__ import annotations

import os
from collections import deque
import re
import tempfile
import threading
from datetime import date
from pathlib import Path
from typing import Optional

from .errors import OutputWriteError
from .types import GeneratedImage


class OutputStore:
    """Saves every image as A1111 does: ``<outputs>/<mode>-images/YYYY-MM-DD/NNNNN-<seed>.png``.

    Images are written as soon as they are made, with their ``parameters`` chunk, so closing the
    browser (or losing the connection) loses nothing. ``max_bytes`` caps the PNGs kept: past it the
    oldest are deleted first. Temporary files of a process that died mid-write (kill -9) are removed
    when a store opens the directory.
    """

    _NUMBER = re.compile(r"^(\d+)-")
    _PARTIAL = re.compile(r"^\.partial-(\d+)-")
    KEEP_NEWEST = 16  # the most images one request makes

    def __init__(self, root: Path, max_bytes: Optional[int] = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._kept: Optional[deque[tuple[float, Path, int]]] = None  # (mtime, path, bytes), oldest first
        self._kept_bytes = 0
        self.remove_dead_partials()

    def save(self, mode: str, image: GeneratedImage, today: Optional[date] = None) -> Path:
        """Write the PNG under a hidden temporary name, then link it to its numbered name: a crash or a
        full disk never leaves a partial PNG that looks finished, and no name is ever overwritten."""
        kind = "img2img" if mode == "inpaint" else mode  # A1111 keeps inpaint results with img2img's
        folder = self.root / f"{kind}-images" / (today or date.today()).isoformat()
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".partial-{os.getpid()}-", suffix=".png",
                                             delete=False) as handle:
                temporary = Path(handle.name)
            try:
                temporary.write_bytes(image.png)
                path = self._publish(temporary, folder, image.seed)
            except OSError as exc:
                raise OutputWriteError(
                    f"the image (seed {image.seed}) could not be saved in {folder}: {exc.strerror or exc}; "
                    "free some disk space there (or start the server with another --outputs / "
                    "--outputs-max-gb) and generate again") from exc
            finally:
                temporary.unlink(missing_ok=True)
            if self.max_bytes is not None:
                self._keep_under_cap(path)
            return path

    def remove_dead_partials(self) -> list[Path]:
        """Delete the temporary files of writers that are gone (a process killed mid-write; in a
        container the restarted server may have the dead one's pid, so our own pid counts as gone:
        call this before saving)."""
        removed = []
        for path in self.root.glob("*-images/*/.partial-*"):
            match = self._PARTIAL.match(path.name)
            if match is None or int(match.group(1)) == os.getpid() or not _process_alive(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _keep_under_cap(self, new: Path) -> None:
        """Delete the oldest saved PNGs until the kept ones fit in ``max_bytes``, never the newest
        ``KEEP_NEWEST`` (the images of a request still being answered: the UI's gallery is served
        from these files after the request returns)."""
        if self._kept is None:
            found = [(p.stat().st_mtime, p, p.stat().st_size) for p in self.root.glob("*-images/*/*.png")]
            self._kept = deque(sorted(found, key=lambda item: (item[0], str(item[1]))))
            self._kept_bytes = sum(size for _, _, size in self._kept)
        else:
            size = new.stat().st_size
            self._kept.append((new.stat().st_mtime, new, size))
            self._kept_bytes += size
        while self._kept_bytes > self.max_bytes and len(self._kept) > self.KEEP_NEWEST:
            _, oldest, size = self._kept.popleft()
            oldest.unlink(missing_ok=True)
            self._kept_bytes -= size

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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


__all__ = ["OutputStore"]
