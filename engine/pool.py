"""The warm pool: one warm pipeline per (model, size), LRU eviction, leases.

A leased pipeline is never evicted. Loading happens outside the pool lock, under a per-key lock,
so two requests for the same cold model load it once and requests for warm models are not held
up by a load. Room is made *before* a load, so peak memory stays within ``max_warm`` pipelines
whenever something unleased can go.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .pipelines import WarmPipeline
from .types import VariantKey

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    warm: WarmPipeline
    leases: int = 0
    last_used: float = 0.0


@dataclass(frozen=True)
class WarmInfo:
    key: VariantKey
    in_use: bool
    load_seconds: float
    last_used: float
    device_ids: tuple[int, ...]


class WarmPool:
    def __init__(self, loader: Callable[[VariantKey], WarmPipeline], max_warm: int = 2,
                 on_evict: Callable[[WarmPipeline], None] = lambda warm: None):
        if max_warm < 1:
            raise ValueError("max_warm must be at least 1")
        self._loader = loader
        self._on_evict = on_evict
        self.max_warm = max_warm
        self._lock = threading.Lock()
        self._entries: "OrderedDict[VariantKey, _Entry]" = OrderedDict()
        self._load_locks: dict[VariantKey, threading.Lock] = {}

    @contextmanager
    def lease(self, key: VariantKey) -> Iterator[WarmPipeline]:
        """The warm pipeline for ``key`` (loaded if needed), protected from eviction while held."""
        entry = self._acquire(key)
        try:
            yield entry.warm
        finally:
            with self._lock:
                entry.leases -= 1
                entry.last_used = time.time()
                self._evict_over(self.max_warm)

    def ensure(self, key: VariantKey) -> WarmPipeline:
        """Load ``key`` if it is cold (e.g. preloading at start) and return it."""
        with self.lease(key) as warm:
            return warm

    def unload(self, key: VariantKey) -> bool:
        """Drop ``key`` if it is warm and not in use; True if it was dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.leases:
                return False
            self._drop(key)
            return True

    def snapshot(self) -> list[WarmInfo]:
        with self._lock:
            return [WarmInfo(k, e.leases > 0, e.warm.load_seconds, e.last_used, e.warm.device_ids)
                    for k, e in self._entries.items()]

    def is_warm(self, key: VariantKey) -> bool:
        with self._lock:
            return key in self._entries

    def _acquire(self, key: VariantKey) -> _Entry:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.leases += 1
                    self._entries.move_to_end(key)
                    return entry
                load_lock = self._load_locks.setdefault(key, threading.Lock())
            with load_lock:
                with self._lock:
                    if key in self._entries:
                        continue  # someone else loaded it while we waited
                    self._evict_over(self.max_warm - 1)
                warm = self._loader(key)
                with self._lock:
                    entry = _Entry(warm, leases=1, last_used=time.time())
                    self._entries[key] = entry
                    self._evict_over(self.max_warm)
                    return entry

    def _evict_over(self, limit: int) -> None:
        """Drop least recently used unleased pipelines until at most ``limit`` remain (lock held)."""
        for key in [k for k, e in self._entries.items() if e.leases == 0]:
            if len(self._entries) <= limit:
                return
            self._drop(key)

    def _drop(self, key: VariantKey) -> None:
        entry = self._entries.pop(key)
        log.info("evicting warm pipeline %s", key)
        self._on_evict(entry.warm)
