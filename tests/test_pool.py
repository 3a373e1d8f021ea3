"""Warm pool policy: LRU eviction past the limit, leased pipelines are never evicted, loads happen once.

The loader here returns plain records instead of pipelines: this tests the pool's bookkeeping only;
real pipelines go through the pool in test_engine.py.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from engine.pool import WarmPool
from engine.types import Size, VariantKey


@dataclass
class Record:
    key: VariantKey
    load_seconds: float = 0.0
    device_ids: tuple = ()


def make_pool(max_warm: int):
    loads, evictions = [], []

    def loader(key):
        loads.append(key.model)
        return Record(key)

    return WarmPool(loader, max_warm, on_evict=lambda warm: evictions.append(warm.key.model)), loads, evictions


def key(name: str) -> VariantKey:
    return VariantKey(name, Size(64, 64))


def test_lru_eviction_past_limit():
    pool, loads, evictions = make_pool(2)
    for name in ["a", "b", "a", "c"]:
        with pool.lease(key(name)):
            pass
    assert loads == ["a", "b", "c"]
    assert evictions == ["b"]  # a was used more recently than b
    assert {i.key.model for i in pool.snapshot()} == {"a", "c"}


def test_leased_pipeline_is_never_evicted():
    pool, loads, evictions = make_pool(1)
    with pool.lease(key("a")):
        with pool.lease(key("b")):
            assert {i.key.model for i in pool.snapshot()} == {"a", "b"}
            assert all(i.in_use for i in pool.snapshot())
        # b is released while a is still leased: b is the one that goes
        assert evictions == ["b"]
        assert [i.key.model for i in pool.snapshot()] == ["a"]
    assert len(pool.snapshot()) == 1


def test_concurrent_requests_load_once():
    barrier = threading.Barrier(4)
    loads = []

    def slow_loader(k):
        loads.append(k)
        time.sleep(0.05)
        return Record(k)

    pool = WarmPool(slow_loader, 2)

    def worker():
        barrier.wait()
        with pool.lease(key("a")):
            pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1


def test_unload_refuses_in_use():
    pool, _, _ = make_pool(2)
    with pool.lease(key("a")):
        assert pool.unload(key("a")) is False
    assert pool.unload(key("a")) is True
    assert pool.snapshot() == []
