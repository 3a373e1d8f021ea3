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
        assert pool.unload(key("a")) == 0
    assert pool.unload(key("a")) == 1
    assert pool.snapshot() == []


# --- replicas ------------------------------------------------------------------------------------------


def hold_leases(pool, keys, count):
    """``count`` threads each lease ``keys`` at once and hold them; returns (leased pipelines, release)."""
    leased, release, ready = [], threading.Event(), threading.Barrier(count + 1)

    def worker(k):
        with pool.lease(k) as warm:
            leased.append(warm)
            ready.wait()
            release.wait()

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys[:count]]
    for t in threads:
        t.start()
    ready.wait()
    return leased, lambda: (release.set(), [t.join() for t in threads])


def test_busy_replicas_make_the_pool_load_another_up_to_the_target():
    loads = []
    pool = WarmPool(lambda r: loads.append(r) or Record(r), max_warm=1, replicas=lambda k: 2)
    with pool.lease(key("a")) as first:
        with pool.lease(key("a")) as second:
            assert second is not first  # the first is busy: a second replica is loaded
            with pool.lease(key("a")) as third:
                assert third in (first, second)  # the target is 2: the third shares
    assert [r.index for r in loads] == [0, 1]
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1]
    with pool.lease(key("a")) as again:  # an idle replica is reused; nothing loads
        assert again in (first, second) and len(loads) == 2


def test_concurrent_requests_spread_over_the_replicas():
    pool = WarmPool(lambda r: Record(r), max_warm=1, replicas=lambda k: 3)
    pool.ensure_replicas(key("a"), 3)
    leased, release = hold_leases(pool, [key("a")] * 3, 3)
    try:
        assert len({id(w) for w in leased}) == 3
        assert all(i.in_use for i in pool.snapshot())
    finally:
        release()


def test_a_replica_that_fails_to_load_leaves_the_others_serving():
    attempts = []

    def loader(r):
        attempts.append(r.index)
        if r.index == 1:
            raise RuntimeError("replica 1 is broken")
        return Record(r)

    pool = WarmPool(loader, max_warm=1, replicas=lambda k: 2)
    with pool.lease(key("a")) as first:
        with pool.lease(key("a")) as second:  # the extra load fails: share the warm one
            assert second is first
        with pool.lease(key("a")) as third:  # and it is not retried on every request
            assert third is first
    assert attempts == [0, 1] and [i.replica for i in pool.snapshot()] == [0]
    assert pool.loading() == []
    assert pool.ensure_replicas(key("a"), 2) == 1 and attempts == [0, 1, 1, 1]  # asked again: tried (twice) again


@dataclass
class Timed(Record):
    peak_rss_bytes: int = 0
    warmup_seconds: float = 0.0


def test_snapshot_and_loading_report_what_the_status_page_shows():
    started, release = threading.Event(), threading.Event()

    def loader(r):
        started.set()
        assert release.wait(10)
        return Timed(r.variant, load_seconds=1.5, device_ids=(2, 3), peak_rss_bytes=123, warmup_seconds=0.25)

    pool = WarmPool(loader, max_warm=1)
    before = time.time()
    thread = threading.Thread(target=pool.ensure, args=(key("a"),))
    thread.start()
    assert started.wait(10)
    [loading] = pool.loading()
    assert (loading.key, loading.replica, loading.device_ids) == (key("a"), 0, ()) and loading.since >= before
    assert pool.snapshot() == [] and not pool.is_warm(key("a"))
    release.set()
    thread.join()
    assert pool.loading() == []
    [info] = pool.snapshot()
    assert (info.key, info.in_use, info.load_seconds, info.device_ids, info.peak_rss_bytes, info.warmup_seconds,
            info.replica) == (key("a"), False, 1.5, (2, 3), 123, 0.25, 0)
    assert info.last_used >= before and pool.is_warm(key("a"))
    with pool.lease(key("a")):
        assert [i.in_use for i in pool.snapshot()] == [True]


def test_a_cap_from_a_failed_load_is_forgotten_when_asked_again_or_evicted():
    """A failed extra load caps the replicas (not retried per request) until ``ensure_replicas`` asks
    again or the model is evicted; after that, busy leases load up to the target again."""
    broken = {1}
    pool = WarmPool(lambda r: (_ for _ in ()).throw(RuntimeError("broken")) if r.index in broken else Record(r),
                    max_warm=1, replicas=lambda k: 3)
    with pool.lease(key("a")), pool.lease(key("a")):
        pass  # replica 1 failed: capped at 1
    broken.clear()
    assert pool.ensure_replicas(key("a"), 2) == 2  # asked again: the cap is gone, two are warm
    leased, release = hold_leases(pool, [key("a")] * 3, 3)  # the target is 3: a third loads when both are busy
    release()
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1, 2]

    pool = WarmPool(lambda r: (_ for _ in ()).throw(RuntimeError("broken")) if r.index in broken else Record(r),
                    max_warm=1, replicas=lambda k: 2)
    broken.add(1)
    with pool.lease(key("a")), pool.lease(key("a")):
        pass
    assert pool.unload(key("a")) == 1  # evicted: the cap goes with it
    broken.clear()
    leased, release = hold_leases(pool, [key("a")] * 2, 2)
    release()
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1]


def test_an_extra_replica_loading_is_listed_with_its_start_time():
    started, release_load = threading.Event(), threading.Event()

    def loader(r):
        if r.index == 1:
            started.set()
            assert release_load.wait(10)
        return Record(r)

    pool = WarmPool(loader, max_warm=1, replicas=lambda k: 2)
    pool.ensure(key("a"))
    before = time.time()
    thread = threading.Thread(target=pool.ensure_replicas, args=(key("a"), 2))
    thread.start()
    assert started.wait(10)
    [loading] = pool.loading()
    assert (loading.key, loading.replica) == (key("a"), 1) and loading.since >= before
    release_load.set()
    thread.join()
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1]


def test_each_busy_lease_loads_one_more_replica_until_the_target():
    pool = WarmPool(lambda r: Record(r), max_warm=1, replicas=lambda k: 3)
    with pool.lease(key("a")) as first, pool.lease(key("a")) as second, pool.lease(key("a")) as third:
        assert len({id(first), id(second), id(third)}) == 3  # a loaded extra replica does not cap the next
        with pool.lease(key("a")) as fourth:
            assert fourth in (first, second, third)  # the target reached: the fourth shares
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1, 2]


def test_room_is_made_before_a_load_so_peak_memory_stays_within_max_warm():
    warm_during_load = []
    pool = WarmPool(lambda r: warm_during_load.append([i.key.model for i in pool.snapshot()]) or Record(r), max_warm=1)
    pool.ensure(key("a"))
    pool.ensure(key("b"))
    assert warm_during_load == [[], []]  # a was evicted before b's load began
