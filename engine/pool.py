"""The warm pool: warm pipelines per (model, size), LRU eviction, leases, replicas.

A leased pipeline is never evicted. Loading happens outside the pool lock, under a per-replica
lock, so two requests for the same cold model load it once and requests for warm models are not
held up by a load. Room is made *before* a load, so peak memory stays within ``max_warm`` variants
whenever something unleased can go.

Replicas: a variant may have several warm copies (``replicas(key)``, default 1), each with its own
lock and, on NeuronCores, its own core pair apart from the others. A lease takes an idle replica;
when every warm replica is busy and fewer than the target are warm, it loads one more (a
best-effort load: it evicts nothing and, if it cannot be placed or fails, the request shares the
least busy warm replica instead, so a broken replica never stops the others serving). ``max_warm``
counts variants, not replicas; a variant is evicted only when all its replicas are idle.

With a ``CorePlan`` (the neuron backend) room is also device memory: before a load the plan
reserves a NeuronCore pair for the replica, and least recently used unleased pipelines are evicted
until it fits. The loader reads its cores from the plan (``core_plan.placement(replica_key)``).
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
from .placement import CorePlan, CoresBusy, PlacementError
from .types import ReplicaKey, VariantKey

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
    replica: int = 0  # 0 for the first copy of ``key``; 1, 2, ... for further replicas


@dataclass(frozen=True)
class LoadingInfo:
    """A pipeline being loaded (and warmed up): not ready yet."""

    key: VariantKey
    since: float
    device_ids: tuple[int, ...]
    replica: int = 0


class WarmPool:
    def __init__(self, loader: Callable[[ReplicaKey], WarmPipeline], max_warm: int = 2,
                 on_evict: Callable[[WarmPipeline], None] = lambda warm: None,
                 core_plan: Optional[CorePlan] = None,
                 replicas: Callable[[VariantKey], int] = lambda key: 1):
        if max_warm < 1:
            raise ValueError("max_warm must be at least 1")
        self._loader = loader
        self._on_evict = on_evict
        self._replicas = replicas
        self.max_warm = max_warm
        self.core_plan = core_plan
        self._lock = threading.Lock()
        self._entries: "OrderedDict[ReplicaKey, _Entry]" = OrderedDict()
        self._load_locks: dict[ReplicaKey, threading.Lock] = {}
        self._loading: dict[ReplicaKey, float] = {}
        self._capped: dict[VariantKey, int] = {}  # replicas that failed to load or place: no more
        self._failed_pairs: dict[VariantKey, set[int]] = {}  # core pairs where a replica failed to load

    @contextmanager
    def lease(self, key: VariantKey) -> Iterator[WarmPipeline]:
        """A warm replica of ``key`` (loaded if needed), protected from eviction while held."""
        entry = self._acquire(key)
        try:
            yield entry.warm
        finally:
            with self._lock:
                entry.leases -= 1
                entry.last_used = time.time()
                self._evict_over(self.max_warm)

    def ensure(self, key: VariantKey) -> WarmPipeline:
        """Load ``key`` if it is cold (e.g. preloading at start) and return a warm replica."""
        with self.lease(key) as warm:
            return warm

    def ensure_replicas(self, key: VariantKey, count: int) -> int:
        """Load replicas of ``key`` until ``count`` are warm or no more can be placed; returns how
        many are warm. The first replica loads as ``ensure`` does (evicting if it must); further
        ones are best-effort: they evict nothing, and a failed load is logged and skipped (at most
        ``count`` attempts), leaving the others serving."""
        with self._lock:
            self._capped.pop(key, None)
            self._failed_pairs.pop(key, None)
        self.ensure(key)
        for _ in range(count):
            if len(self._replicas_of(key)) >= count:
                break
            with self._lock:
                index = self._free_index_locked(key)
            if self._load_extra(ReplicaKey(key, index)) is None:
                break  # no room for more
        warm = len(self._replicas_of(key))
        if warm < count:
            with self._lock:
                self._never_more_locked(key)
        return warm

    def unload(self, key: VariantKey) -> int:
        """Drop the idle replicas of ``key``; returns how many were dropped."""
        with self._lock:
            idle = [r for r, e in self._entries.items() if r.variant == key and not e.leases]
            for replica in idle:
                self._drop(replica)
            return len(idle)

    def snapshot(self) -> list[WarmInfo]:
        with self._lock:
            return [WarmInfo(r.variant, e.leases > 0, e.warm.load_seconds, e.last_used, e.warm.device_ids,
                             getattr(e.warm, "peak_rss_bytes", 0), getattr(e.warm, "warmup_seconds", 0.0), r.index)
                    for r, e in self._entries.items()]

    def loading(self) -> list[LoadingInfo]:
        """Pipelines being loaded right now (not ready, not in ``snapshot()``)."""
        with self._lock:
            return [LoadingInfo(r.variant, since, self._device_ids_of(r), r.index) for r, since in self._loading.items()]

    def is_warm(self, key: VariantKey) -> bool:
        with self._lock:
            return any(r.variant == key for r in self._entries)

    def _replicas_of(self, key: VariantKey) -> list[ReplicaKey]:
        with self._lock:
            return [r for r in self._entries if r.variant == key]

    def _acquire(self, key: VariantKey) -> _Entry:
        while True:
            with self._lock:
                replica, extra = self._pick_locked(key)
                if replica is not None and extra is None:
                    entry = self._entries[replica]
                    entry.leases += 1
                    self._entries.move_to_end(replica)
                    return entry
            if replica is not None:  # every warm replica is busy and another one may be loaded
                assert extra is not None
                if not self._load_extra(extra):
                    with self._lock:
                        self._never_more_locked(key)
                continue
            entry = self._load_first(key)
            if entry is not None:
                return entry

    def _pick_locked(self, key: VariantKey) -> tuple[Optional[ReplicaKey], Optional[ReplicaKey]]:
        """(the least recently used idle replica, None); or (the least busy one, a replica to load
        first) when all are busy and more are wanted; or (None, None) when none is warm (lock held)."""
        warm = [r for r in self._entries if r.variant == key]
        if not warm:
            return None, None
        idle = [r for r in warm if not self._entries[r].leases]
        if idle:
            return min(idle, key=lambda r: self._entries[r].last_used), None
        least_busy = min(warm, key=lambda r: self._entries[r].leases)
        loading = sum(1 for r in self._loading if r.variant == key)
        if len(warm) + loading >= self._target(key):
            return least_busy, None
        return least_busy, ReplicaKey(key, self._free_index_locked(key))

    def _free_index_locked(self, key: VariantKey) -> int:
        used = {r.index for r in (*self._entries, *self._loading) if r.variant == key}
        return next(i for i in range(len(used) + 1) if i not in used)

    def _load_first(self, key: VariantKey) -> Optional[_Entry]:
        """Load replica 0 of a cold ``key`` (evicting as needed) and lease it; None if another
        thread made it warm meanwhile (the caller picks again)."""
        replica = ReplicaKey(key, 0)
        with self._lock:
            load_lock = self._load_locks.setdefault(replica, threading.Lock())
        with load_lock:
            with self._lock:
                if any(r.variant == key for r in self._entries):
                    return None  # someone else loaded it while we waited
                self._evict_over(self.max_warm - 1)
                if self.core_plan is not None:
                    self._make_core_room(replica)
                self._loading[replica] = time.time()
            warm = self._load(replica)
            with self._lock:
                entry = _Entry(warm, leases=1, last_used=time.time())
                self._entries[replica] = entry
                self._evict_over(self.max_warm)
                return entry

    def _load_extra(self, replica: ReplicaKey) -> Optional[bool]:
        """Best-effort load of one more replica (placed apart from the others, evicting nothing):
        True when it is warm, False when the load failed (logged: the warm replicas go on serving),
        None when no core pair has room for it."""
        with self._lock:
            if replica in self._entries or replica in self._loading:
                return True  # another thread got there first
            if self.core_plan is not None:
                others = [r for r in (*self._entries, *self._loading) if r.variant == replica.variant]
                try:
                    placed = self.core_plan.place(replica, apart_from=others,
                                                  avoid_pairs=self._failed_pairs.get(replica.variant, ()))
                except PlacementError:
                    placed = None
                if placed is None:
                    log.info("no free NeuronCore pair for another replica of %s; sharing the warm ones",
                             replica.variant)
                    return None
            self._loading[replica] = time.time()
            pair = self._pair_of(replica)
        try:
            warm = self._load(replica)
        except Exception:
            log.exception("loading %s failed; the other replicas go on serving", replica)
            if pair is not None:
                with self._lock:
                    self._failed_pairs.setdefault(replica.variant, set()).add(pair)
            return False
        with self._lock:
            self._entries[replica] = _Entry(warm, last_used=time.time())
        return True

    def _never_more_locked(self, key: VariantKey) -> None:
        """Stop loading further replicas of ``key`` beyond those warm now, until it is evicted or
        ``ensure_replicas`` asks again (lock held)."""
        self._capped[key] = len([r for r in self._entries if r.variant == key])

    def _load(self, replica: ReplicaKey) -> WarmPipeline:
        try:
            return self._loader(replica)
        except BaseException:
            with self._lock:
                if self.core_plan is not None:
                    self.core_plan.release(replica)
            raise
        finally:
            with self._lock:
                self._loading.pop(replica, None)

    def _target(self, key: VariantKey) -> int:
        return min(self._replicas(key), self._capped.get(key, 1 << 30))

    def _evict_over(self, limit: int) -> None:
        """Drop least recently used variants whose replicas are all idle until at most ``limit``
        variants remain (lock held)."""
        variants = list(dict.fromkeys(r.variant for r in self._entries))
        if len(variants) <= limit:
            return
        last_used = {v: max(e.last_used for r, e in self._entries.items() if r.variant == v) for v in variants}
        busy = {r.variant for r, e in self._entries.items() if e.leases}
        for variant in sorted((v for v in variants if v not in busy), key=last_used.__getitem__):
            if len(variants) <= limit:
                return
            for replica in [r for r in self._entries if r.variant == variant]:
                self._drop(replica)
            variants.remove(variant)

    def _make_core_room(self, replica: ReplicaKey) -> None:
        """Reserve NeuronCores for ``replica``, evicting LRU unleased pipelines until it fits (lock held).

        ``ModelTooLarge`` (from the plan) when no eviction could help; ``CoresBusy`` when only
        in-use pipelines stand in the way.
        """
        assert self.core_plan is not None
        while self.core_plan.place(replica) is None:
            victim = next((r for r, e in self._entries.items() if e.leases == 0), None)
            if victim is None:
                busy = [str(r) for r in self._entries] + [f"{r} (loading)" for r in self._loading]
                raise CoresBusy(
                    f"no NeuronCore pair has room for {replica} while {', '.join(busy) or 'other models'} "
                    f"{'is' if len(busy) == 1 else 'are'} in use; try again when a running request finishes")
            self._drop(victim)

    def _pair_of(self, replica: ReplicaKey) -> Optional[int]:
        placement = self.core_plan.placement(replica) if self.core_plan is not None else None
        return placement.pair_index if placement is not None else None

    def _device_ids_of(self, replica: ReplicaKey) -> tuple[int, ...]:
        placement = self.core_plan.placement(replica) if self.core_plan is not None else None
        return placement.device_ids if placement is not None else ()

    def _drop(self, replica: ReplicaKey) -> None:
        entry = self._entries.pop(replica)
        if self.core_plan is not None:
            self.core_plan.release(replica)
        if not any(r.variant == replica.variant for r in self._entries):
            self._capped.pop(replica.variant, None)
            self._failed_pairs.pop(replica.variant, None)
        log.info("evicting warm pipeline %s", replica)
        self._on_evict(entry.warm)
