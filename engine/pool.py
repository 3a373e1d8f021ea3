"""The warm pool: one warm pipeline per (model, size), LRU eviction, leases.

A leased pipeline is never evicted. Loading happens outside the pool lock, under a per-key lock,
so two requests for the same cold model load it once and requests for warm models are not held
up by a load. Room is made *before* a load, so peak memory stays within ``max_warm`` pipelines
whenever something unleased can go.

With a ``CorePlan`` (the neuron backend) room is also device memory: before a load the plan
reserves a NeuronCore pair for the model, and least recently used unleased pipelines are evicted
until it fits. The loader reads its cores from the plan (``core_plan.placement(key)``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .pipelines import WarmPipeline
from .placement import CorePlan, CoresBusy
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
    peak_rss_bytes: int = 0
    warmup_seconds: float = 0.0


@dataclass(frozen=True)
class LoadingInfo:
    """A pipeline being loaded (and warmed up): not ready yet."""

    key: VariantKey
    since: float
    device_ids: tuple[int, ...]


class WarmPool:
    def __init__(self, loader: Callable[[VariantKey], WarmPipeline], max_warm: int = 2,
                 on_evict: Callable[[WarmPipeline], None] = lambda warm: None,
                 core_plan: Optional[CorePlan] = None):
        if max_warm < 1:
            raise ValueError("max_warm must be at least 1")
        self._loader = loader
        self._on_evict = on_evict
        self.max_warm = max_warm
        self.core_plan = core_plan
        self._lock = threading.Lock()
        self._entries: "OrderedDict[VariantKey, _Entry]" = OrderedDict()
        self._load_locks: dict[VariantKey, threading.Lock] = {}
        self._loading: dict[VariantKey, float] = {}

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
            return [WarmInfo(k, e.leases > 0, e.warm.load_seconds, e.last_used, e.warm.device_ids,
                             getattr(e.warm, "peak_rss_bytes", 0), getattr(e.warm, "warmup_seconds", 0.0))
                    for k, e in self._entries.items()]

    def loading(self) -> list[LoadingInfo]:
        """Pipelines being loaded right now (not ready, not in ``snapshot()``)."""
        with self._lock:
            return [LoadingInfo(k, since, self._device_ids_of(k)) for k, since in self._loading.items()]

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
                    if self.core_plan is not None:
                        self._make_core_room(key)
                    self._loading[key] = time.time()
                try:
                    warm = self._loader(key)
                except BaseException:
                    with self._lock:
                        self._loading.pop(key, None)
                        if self.core_plan is not None:
                            self.core_plan.release(key)
                    raise
                with self._lock:
                    self._loading.pop(key, None)
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

    def _make_core_room(self, key: VariantKey) -> None:
        """Reserve NeuronCores for ``key``, evicting LRU unleased pipelines until it fits (lock held).

        ``ModelTooLarge`` (from the plan) when no eviction could help; ``CoresBusy`` when only
        in-use pipelines stand in the way.
        """
        assert self.core_plan is not None
        while self.core_plan.place(key) is None:
            victim = next((k for k, e in self._entries.items() if e.leases == 0), None)
            if victim is None:
                busy = [str(k) for k in self._entries] + [f"{k} (loading)" for k in self._loading]
                raise CoresBusy(
                    f"no NeuronCore pair has room for {key} while {', '.join(busy) or 'other models'} "
                    f"{'is' if len(busy) == 1 else 'are'} in use; try again when a running request finishes")
            self._drop(victim)

    def _device_ids_of(self, key: VariantKey) -> tuple[int, ...]:
        placement = self.core_plan.placement(key) if self.core_plan is not None else None
        return placement.device_ids if placement is not None else ()

    def _drop(self, key: VariantKey) -> None:
        entry = self._entries.pop(key)
        if self.core_plan is not None:
            self.core_plan.release(key)
        log.info("evicting warm pipeline %s", key)
        self._on_evict(entry.warm)
