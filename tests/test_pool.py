"""Warm pool policy: LRU eviction past the limit, leased pipelines are never evicted, loads happen once.

The loader here returns plain records instead of pipelines: this tests the pool's bookkeeping only;
real pipelines go through the pool in test_engine.py.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import pytest

from engine.pool import WarmPool
from engine.types import ReplicaKey, Size, VariantKey

# Every pool test takes milliseconds; a pool that hangs (a lease that never comes, an _acquire loop that
# never ends, a load lock never released) fails its test after this long instead of hanging the run.
DEADLINE_S = 6.0
WAIT_S = 4.0  # how long a test waits for one of its helper threads


class Hung(BaseException):
    """A test ran past ``DEADLINE_S``. A BaseException, so that the pool's ``except Exception`` around a
    load (a failed replica is logged and skipped) does not swallow it."""


@pytest.fixture(autouse=True)
def deadline():
    """SIGALRM raises ``Hung`` in the test's (main) thread after ``DEADLINE_S``, and again every second
    after that: a busy ``_acquire`` loop or a ``join`` / ``wait`` without a timeout becomes a failure.
    Helper threads are daemons, so a hung one does not keep the process alive either."""
    def hung(signum, frame):
        raise Hung(f"the test did not finish in {DEADLINE_S:g} s: the pool hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def start(target, *args) -> threading.Thread:
    """``target(*args)`` in a daemon thread; ``finish`` joins it."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), f"{thread.name} still runs after {WAIT_S:g} s: the pool hangs"


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
        barrier.wait(WAIT_S)
        with pool.lease(key("a")):
            pass

    finish(*[start(worker) for _ in range(4)])
    assert len(loads) == 1


def test_unload_refuses_in_use():
    pool, _, _ = make_pool(2)
    with pool.lease(key("a")):
        assert pool.unload(key("a")) == 0
    assert pool.unload(key("a")) == 1
    assert pool.snapshot() == []


# --- replicas ------------------------------------------------------------------------------------------


def hold_leases(pool, keys, count):
    """``count`` threads each lease ``keys`` at once and hold them; returns (leased pipelines, release).

    Every wait has a timeout: a lease that never comes fails the test (a broken barrier, a thread still
    alive) instead of hanging it."""
    leased, release, ready = [], threading.Event(), threading.Barrier(count + 1)

    def worker(k):
        with pool.lease(k) as warm:
            leased.append(warm)
            ready.wait(WAIT_S)
            release.wait(WAIT_S)

    threads = [start(worker, k) for k in keys[:count]]
    try:
        ready.wait(WAIT_S)
    except threading.BrokenBarrierError:
        release.set()
        pytest.fail(f"only {len(leased)} of {count} leases came within {WAIT_S:g} s")

    def release_all():
        release.set()
        finish(*threads)

    return leased, release_all


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


def broken_replica(index: int, attempts: list[int]):
    """A loader that records each replica index it is asked for and fails for ``index``."""
    def loader(r):
        attempts.append(r.index)
        if r.index == index:
            raise RuntimeError(f"replica {index} is broken")
        return Record(r)
    return loader


def test_a_replica_that_fails_to_load_leaves_the_others_serving():
    attempts: list[int] = []
    loader = broken_replica(1, attempts)
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
        assert release.wait(WAIT_S)
        return Timed(r.variant, load_seconds=1.5, device_ids=(2, 3), peak_rss_bytes=123, warmup_seconds=0.25)

    pool = WarmPool(loader, max_warm=1)
    before = time.time()
    thread = start(pool.ensure, key("a"))
    assert started.wait(WAIT_S)
    [loading] = pool.loading()
    assert (loading.key, loading.replica, loading.device_ids) == (key("a"), 0, ()) and loading.since >= before
    assert pool.snapshot() == [] and not pool.is_warm(key("a"))
    release.set()
    finish(thread)
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
            assert release_load.wait(WAIT_S)
        return Record(r)

    pool = WarmPool(loader, max_warm=1, replicas=lambda k: 2)
    pool.ensure(key("a"))
    before = time.time()
    thread = start(pool.ensure_replicas, key("a"), 2)
    assert started.wait(WAIT_S)
    [loading] = pool.loading()
    assert (loading.key, loading.replica) == (key("a"), 1) and loading.since >= before
    release_load.set()
    finish(thread)
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


# --- defaults, figures, timestamps ----------------------------------------------------------------------


def test_the_defaults_keep_two_variants_of_one_replica_each():
    loads = []
    pool = WarmPool(lambda r: loads.append(r) or Record(r))
    for name in "abc":
        with pool.lease(key(name)):
            pass
    assert [i.key.model for i in pool.snapshot()] == ["b", "c"]  # max_warm 2; evicting needs no on_evict
    with pool.lease(key("c")) as first, pool.lease(key("c")) as second:
        assert second is first  # one replica unless asked: the second lease shares it
    assert [(r.model, r.index) for r in loads] == [("a", 0), ("b", 0), ("c", 0)]


@pytest.mark.parametrize("max_warm", [0, -1])
def test_max_warm_below_one_is_refused(max_warm):
    with pytest.raises(ValueError) as info:
        WarmPool(lambda r: Record(r), max_warm)
    assert str(info.value) == "max_warm must be at least 1"
    assert WarmPool(lambda r: Record(r), 1).max_warm == 1


def test_a_pipeline_without_memory_or_warmup_figures_shows_zero():
    pool = WarmPool(lambda r: Record(r), 1)
    pool.ensure(key("a"))
    [info] = pool.snapshot()
    assert (info.peak_rss_bytes, info.warmup_seconds) == (0, 0.0)
    assert type(info.peak_rss_bytes) is int and type(info.warmup_seconds) is float


def test_a_new_replica_shows_when_it_was_loaded_while_still_leased():
    pool = WarmPool(lambda r: Record(r), max_warm=1, replicas=lambda k: 2)
    before = time.time()
    with pool.lease(key("a")):
        [info] = pool.snapshot()
        assert info.in_use and before <= info.last_used <= time.time()
    assert pool.ensure_replicas(key("a"), 2) == 2
    [extra] = [i for i in pool.snapshot() if i.replica == 1]
    assert not extra.in_use and before <= extra.last_used <= time.time()  # loaded, never leased


# --- loads running side by side ------------------------------------------------------------------------------


def test_a_cold_model_loads_while_another_model_is_loading():
    started, release = threading.Event(), threading.Event()

    def loader(r):
        if r.model == "a":
            started.set()
            assert release.wait(WAIT_S)
        return Record(r)

    pool = WarmPool(loader, max_warm=2)
    slow = start(pool.ensure, key("a"))
    try:
        assert started.wait(WAIT_S)
        fast = start(pool.ensure, key("b"))  # each replica has its own load lock: b does not wait for a
        fast.join(WAIT_S / 2)
        assert not fast.is_alive(), "loading b waited for a's load"
        assert [i.key.model for i in pool.snapshot()] == ["b"]
        assert [i.key.model for i in pool.loading()] == ["a"]
    finally:
        release.set()
    finish(slow)
    assert {i.key.model for i in pool.snapshot()} == {"a", "b"}


@pytest.mark.parametrize("target, loads_expected", [(2, [0, 1]), (3, [0, 1, 2])])
def test_a_replica_being_loaded_counts_toward_the_target(target, loads_expected):
    """Replica 0 busy, replica 1 loading for another lease: with a target of 2 the next lease shares
    replica 0; with 3 it loads replica 2 (the free index after 0 and 1)."""
    started, release, loads = threading.Event(), threading.Event(), []

    def loader(r):
        loads.append(r.index)
        if r.index == 1:
            started.set()
            assert release.wait(WAIT_S)
        return Record(r)

    pool = WarmPool(loader, max_warm=1, replicas=lambda k: target)
    with pool.lease(key("a")) as first:
        loading = start(pool.ensure, key("a"))  # replica 0 is busy: this lease loads replica 1
        try:
            assert started.wait(WAIT_S)
            with pool.lease(key("a")) as next_one:
                assert (next_one is first) == (target == 2)
                assert loads == loads_expected
        finally:
            release.set()
        finish(loading)
    assert sorted(i.replica for i in pool.snapshot()) == loads_expected


def test_a_replica_another_thread_is_loading_or_has_loaded_is_not_loaded_again():
    """Two leases that pick the same extra replica at once (between the pick and the load): the
    second finds it loading, or warm, and loads nothing (``_load_extra`` is that second step)."""
    started, release, loads = threading.Event(), threading.Event(), []

    def loader(r):
        loads.append(r.index)
        if r.index == 1:
            started.set()
            assert release.wait(WAIT_S)
        return Record(r)

    pool = WarmPool(loader, max_warm=1, replicas=lambda k: 3)
    pool.ensure(key("a"))
    loading = start(pool.ensure_replicas, key("a"), 2)
    try:
        assert started.wait(WAIT_S)
        assert pool._load_extra(ReplicaKey(key("a"), 1)) is True  # being loaded: it will be there
        assert loads == [0, 1]
    finally:
        release.set()
    finish(loading)
    assert pool._load_extra(ReplicaKey(key("a"), 1)) is True and loads == [0, 1]  # warm already
    assert pool._load_extra(ReplicaKey(key("a"), 2)) is True and loads == [0, 1, 2]  # a new one loads
    assert sorted(i.replica for i in pool.snapshot()) == [0, 1, 2]


# --- caps on replicas after failures -------------------------------------------------------------------------


def test_replicas_that_ensure_replicas_could_not_load_are_not_retried_per_request():
    attempts: list[int] = []
    loader = broken_replica(2, attempts)
    pool = WarmPool(loader, max_warm=1, replicas=lambda k: 3)
    assert pool.ensure_replicas(key("a"), 3) == 2 and attempts == [0, 1, 2, 2]  # tried as often as asked for
    with pool.lease(key("a")), pool.lease(key("a")), pool.lease(key("a")) as third:
        assert attempts == [0, 1, 2, 2]  # capped at the 2 warm: the third lease shares
        assert third.key.index in (0, 1)


def test_evicting_a_model_forgets_its_cap_while_other_models_stay_warm():
    broken, attempts = {1}, []

    def loader(r):
        attempts.append((r.model, r.index))
        if r.model == "a" and r.index in broken:
            raise RuntimeError("broken")
        return Record(r)

    pool = WarmPool(loader, max_warm=2, replicas=lambda k: 2)
    with pool.lease(key("a")), pool.lease(key("a")):
        pass  # replica 1 of a failed: a is capped at 1
    pool.ensure(key("b"))
    assert pool.unload(key("a")) == 1  # a is gone (b stays): its cap goes with it
    broken.clear()
    with pool.lease(key("a")), pool.lease(key("a")) as second:
        assert second.key == ReplicaKey(key("a"), 1)
    assert attempts == [("a", 0), ("a", 1), ("b", 0), ("a", 0), ("a", 1)]
