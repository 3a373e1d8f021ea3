"""NeuronCore discovery and the placement plan, with the warm pool evicting by device memory.

No hardware: discovery reads injected ``neuron-ls`` output or device-node lists; the pool loads
plain records (its bookkeeping is what is tested; real pipelines go through the pool in
test_neuron_contract.py).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pytest

from engine.errors import BackendUnavailable
from engine.placement import (GIB, CoreInventory, CorePlan, CoresBusy, Footprint, ModelTooLarge, discover_cores,
                              footprint_from_manifest, parse_core_list)
from engine.pool import WarmPool
from engine.types import ReplicaKey, Size, VariantKey
from test_pool import WAIT_S, deadline, finish, start  # noqa: F401  (deadline: autouse, a hung pool fails)

# Sizes of real artifacts, roughly: what the plan is for.
SD21_FP32 = Footprint(unet_bytes=int(3.5 * GIB), other_bytes=int(1.6 * GIB))  # home core 5.1 GiB
SDXL_FP32 = Footprint(unet_bytes=int(10.3 * GIB), other_bytes=int(3.3 * GIB))  # home core 13.6 GiB
HUGE = Footprint(unet_bytes=15 * GIB, other_bytes=3 * GIB)  # more than a 16 GiB core


def key(name: str) -> VariantKey:
    return VariantKey(name, Size(512, 512))


def cores(count: int) -> CoreInventory:
    return CoreInventory(tuple(range(count)), 16 * GIB, "test")


def neuron_ls(devices: int, cores_per_device: int = 2, memory: int = 32 * GIB) -> list[dict]:
    """Shaped like ``neuron-ls --json-output`` (one entry per device)."""
    return [{"neuron_device": d, "bdf": f"0000:00:{d:02x}.0", "connected_to": None, "nc_count": cores_per_device,
             "memory_size": memory, "neuroncore_ids": list(range(d * cores_per_device, (d + 1) * cores_per_device)),
             "neuron_processes": []} for d in range(devices)]


# --- discovery -------------------------------------------------------------------------------------


@pytest.mark.parametrize("devices,expected,instance", [
    (1, 2, "inf2.xlarge"), (6, 12, "inf2.24xlarge"), (12, 24, "inf2.48xlarge"), (16, 32, "trn1.32xlarge")])
def test_discovery_from_device_nodes(devices, expected, instance):
    inventory = discover_cores(neuron_ls=lambda: None, devices=lambda: [f"/dev/neuron{i}" for i in range(devices)])
    assert inventory.count == expected and inventory.physical == tuple(range(expected))
    assert inventory.hbm_bytes_per_core == 16 * GIB
    assert instance in inventory.describe() and "/dev/neuron" in inventory.describe()
    assert len(inventory.pairs()) == expected // 2


def test_discovery_prefers_neuron_ls_and_its_memory_size():
    listing = json.loads(json.dumps(neuron_ls(6, memory=32 * GIB)))
    inventory = discover_cores(neuron_ls=lambda: listing, devices=lambda: pytest.fail("device nodes not needed"))
    assert inventory.count == 12 and inventory.source == "neuron-ls"
    assert inventory.hbm_bytes_per_core == 16 * GIB
    assert inventory.pairs()[:2] == ((0, 1), (2, 3))


@pytest.mark.parametrize("visible,physical", [("0-3", (0, 1, 2, 3)), ("0,1", (0, 1)), ("2-3,4", (2, 3, 4)),
                                              ("6-7", (6, 7))])
def test_visible_cores_restrict_discovery(visible, physical):
    inventory = discover_cores(visible, neuron_ls=lambda: neuron_ls(12), devices=lambda: [])
    assert inventory.physical == physical
    assert f"NEURON_RT_VISIBLE_CORES={visible}" in inventory.describe()
    # logical ids 0..n-1 are what torch-neuronx takes; physical ids are what neuron-ls shows
    assert inventory.physical_ids((0, 1)) == physical[:2]


@pytest.mark.parametrize("visible", ["3,5,6", "0-1,4-5", "0,2"])
def test_visible_cores_must_be_one_contiguous_range(visible):
    """The runtime rejects gaps: say so before it does, with the range to use instead."""
    with pytest.raises(BackendUnavailable, match="not one contiguous range.*such as"):
        discover_cores(visible, neuron_ls=lambda: neuron_ls(12), devices=lambda: [])


def test_num_cores_limits_discovery_when_no_cores_are_named():
    inventory = discover_cores(num_cores="4", neuron_ls=lambda: neuron_ls(12), devices=lambda: [])
    assert inventory.physical == (0, 1, 2, 3) and "NEURON_RT_NUM_CORES=4" in inventory.describe()
    assert discover_cores("2-3", num_cores="8", neuron_ls=lambda: neuron_ls(12), devices=lambda: []).physical == (2, 3)
    with pytest.raises(BackendUnavailable, match="NEURON_RT_NUM_CORES='30'.*from 1 to 24"):
        discover_cores(num_cores="30", neuron_ls=lambda: neuron_ls(12), devices=lambda: [])


def test_device_nodes_number_cores_from_the_device_index():
    """Only /dev/neuron1 and /dev/neuron3 are present (e.g. a container given those): cores 2,3 and 6,7."""
    inventory = discover_cores(neuron_ls=lambda: None, devices=lambda: ["/dev/neuron1", "/dev/neuron3"])
    assert inventory.physical == (2, 3, 6, 7)


def test_visible_cores_errors_are_clear():
    with pytest.raises(BackendUnavailable, match="names NeuronCore.*2-5.*this machine has 0-1"):
        discover_cores("0-5", neuron_ls=lambda: neuron_ls(1), devices=lambda: [])
    with pytest.raises(BackendUnavailable, match="not a NeuronCore list"):
        parse_core_list("cores 0 to 3")
    with pytest.raises(BackendUnavailable, match="no NeuronCores found"):
        discover_cores(neuron_ls=lambda: None, devices=lambda: [])


def test_a_plan_needs_a_core_pair():
    with pytest.raises(BackendUnavailable, match="pair of NeuronCores.*NEURON_RT_VISIBLE_CORES=0-1"):
        CorePlan(CoreInventory((3,), 16 * GIB, "test"), lambda k: SD21_FP32)


def test_footprint_from_manifest():
    manifest = {"components": {"unet": {"bytes": 100}, "text_encoder": {"bytes": 30}, "vae_decoder": {"bytes": 20},
                               "vae_encoder": {"bytes": 10}}}
    assert footprint_from_manifest(manifest, overhead=1.0) == Footprint(100, 60)
    assert footprint_from_manifest(manifest, overhead=1.5) == Footprint(150, 90)
    assert footprint_from_manifest({}) == Footprint(0, 0)


# --- the plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 12, 24])
def test_three_sdxl_models(count):
    """An SDXL model fills a pair: one at a time on 2 cores, three side by side on 12 and 24."""
    plan = CorePlan(cores(count), lambda k: SDXL_FP32)
    placed = [plan.place(key(name)) for name in ("a", "b", "c")]
    if count == 2:
        assert placed[0].device_ids == (0, 1) and placed[1] is None and placed[2] is None
    else:
        assert [p.device_ids for p in placed] == [(0, 1), (2, 3), (4, 5)]
        assert [p.pair_index for p in placed] == [0, 1, 2]


@pytest.mark.parametrize("count", [2, 12, 24])
def test_three_sd21_models_share_the_first_pair(count):
    """5.1 GiB on the home core, 3.5 on the other: three fit on one pair, homes alternate."""
    plan = CorePlan(cores(count), lambda k: SD21_FP32)
    placed = [plan.place(key(name)) for name in ("a", "b", "c")]
    assert [p.device_ids for p in placed] == [(0, 1), (1, 0), (0, 1)]
    used = plan.used_bytes()
    assert used[0] == 2 * SD21_FP32.home_core_bytes + SD21_FP32.unet_bytes
    assert used[1] == SD21_FP32.home_core_bytes + 2 * SD21_FP32.unet_bytes
    assert all(used[c] == 0 for c in range(2, count))
    # a fourth does not fit on pair 0 any more
    fourth = plan.place(key("d"))
    assert (fourth is None) if count == 2 else (fourth.device_ids[0] in (2, 3) and fourth.pair_index == 1)


def test_mixed_models_fill_pairs_first_fit():
    sizes = {"xl": SDXL_FP32, "sd": SD21_FP32}
    plan = CorePlan(cores(12), lambda k: sizes[k.model.rstrip("0123456789")])
    assert plan.place(key("xl1")).pair_index == 0
    assert plan.place(key("sd1")).pair_index == 1  # 13.6 + 5.1 > 16 on pair 0's cores
    assert plan.place(key("sd2")).pair_index == 1
    assert plan.place(key("xl2")).pair_index == 2
    plan.release(key("xl1"))
    assert plan.place(key("sd3")).pair_index == 0  # freed memory is reused first
    description = plan.describe()
    assert [m["model"] for m in description["pairs"][1]["models"]] == ["sd1@512x512", "sd2@512x512"]
    assert description["hbm_gib_per_core"] == 16.0 and "12 NeuronCores" in description["cores"]


def test_too_large_for_any_pair_says_why():
    plan = CorePlan(cores(24), lambda k: HUGE)
    with pytest.raises(ModelTooLarge, match=r"needs 18\.0 GiB.*UNet 15\.0 GiB.*16\.0 GiB.*bf16"):
        plan.place(key("huge"))
    assert plan.used_bytes()[0] == 0


# --- the pool evicting by device memory ------------------------------------------------------------------


@dataclass
class Record:
    key: VariantKey
    load_seconds: float = 0.0
    device_ids: tuple = ()


def make_pool(count: int, sizes: dict[str, Footprint], max_warm: int = 10):
    loads, evictions = [], []
    plan = CorePlan(cores(count), lambda k: sizes[k.model])

    def loader(k):
        loads.append(k.model)
        return Record(k, device_ids=plan.placement(k).device_ids)

    pool = WarmPool(loader, max_warm, on_evict=lambda warm: evictions.append(warm.key.model), core_plan=plan)
    return pool, plan, loads, evictions


def use(pool, *names):
    for name in names:
        with pool.lease(key(name)):
            pass


def test_pool_evicts_least_recently_used_until_the_model_fits():
    pool, plan, loads, evictions = make_pool(2, {"a": SD21_FP32, "b": SD21_FP32, "c": SD21_FP32, "xl": SDXL_FP32})
    use(pool, "a", "b", "c", "a")
    assert evictions == [] and loads == ["a", "b", "c"]
    use(pool, "xl")  # needs the whole pair: b, then c, then a (least recently used first)
    assert evictions == ["b", "c", "a"]
    assert [i.key.model for i in pool.snapshot()] == ["xl"]
    assert pool.snapshot()[0].device_ids == (0, 1)
    use(pool, "a")
    assert evictions == ["b", "c", "a", "xl"]


def test_pool_evicts_only_as_much_as_needed():
    pool, plan, loads, evictions = make_pool(2, {"a": SD21_FP32, "b": SD21_FP32, "c": SD21_FP32, "d": SD21_FP32})
    use(pool, "a", "b", "c", "b", "d")
    assert evictions == ["a"]  # one SD model out makes room for the next
    assert {i.key.model for i in pool.snapshot()} == {"b", "c", "d"}


def test_pool_places_further_models_on_further_pairs():
    sizes = {name: SDXL_FP32 for name in ("a", "b", "c")}
    pool, plan, loads, evictions = make_pool(24, sizes)
    use(pool, "a", "b", "c")
    assert evictions == []
    assert {i.key.model: i.device_ids for i in pool.snapshot()} == {"a": (0, 1), "b": (2, 3), "c": (4, 5)}


def test_leased_models_are_never_evicted_for_room():
    pool, plan, loads, evictions = make_pool(2, {"a": SDXL_FP32, "b": SDXL_FP32})
    with pool.lease(key("a")):
        with pytest.raises(CoresBusy, match="no NeuronCore pair has room for b@512x512 while a@512x512 is in use"):
            use(pool, "b")
    assert evictions == [] and plan.placement(ReplicaKey(key("b"))) is None
    use(pool, "b")  # once a is released it can go
    assert evictions == ["a"]


def test_too_large_model_evicts_nothing():
    pool, plan, loads, evictions = make_pool(2, {"a": SD21_FP32, "huge": HUGE})
    use(pool, "a")
    with pytest.raises(ModelTooLarge):
        use(pool, "huge")
    assert evictions == [] and loads == ["a"]


def test_failed_load_releases_its_cores():
    plan = CorePlan(cores(2), lambda k: SDXL_FP32)

    def loader(k):
        raise RuntimeError("load failed")

    pool = WarmPool(loader, 2, core_plan=plan)
    with pytest.raises(RuntimeError):
        use(pool, "a")
    assert plan.placement(ReplicaKey(key("a"))) is None and plan.used_bytes() == {0: 0, 1: 0}
    assert pool.loading() == []


def test_unload_frees_the_cores():
    pool, plan, loads, evictions = make_pool(2, {"a": SDXL_FP32})
    use(pool, "a")
    assert plan.used_bytes()[0] > 0
    assert pool.unload(key("a")) == 1
    assert plan.used_bytes() == {0: 0, 1: 0}


def test_count_limit_still_applies():
    pool, plan, loads, evictions = make_pool(24, {n: SD21_FP32 for n in "abc"}, max_warm=2)
    use(pool, "a", "b", "c")
    assert evictions == ["a"] and plan.placement(ReplicaKey(key("a"))) is None


# --- replicas of one model on disjoint pairs -------------------------------------------------------------


def test_replicas_go_to_pairs_of_their_own_even_when_one_pair_has_room():
    """Two SD2.1 models share a pair, but two *replicas* of one never do: each needs its own cores."""
    pool, plan, loads, evictions = make_pool(24, {"a": SD21_FP32, "b": SD21_FP32})
    use(pool, "a")
    assert pool.ensure_replicas(key("a"), 12) == 12
    pairs = sorted(i.device_ids for i in pool.snapshot())
    assert len({frozenset(p) for p in pairs}) == 12 and sorted(c for p in pairs for c in p) == list(range(24))
    assert sorted(i.replica for i in pool.snapshot()) == list(range(12))
    use(pool, "b")  # another model still shares a pair with a replica
    assert evictions == [] and len(pool.snapshot()) == 13


def test_replicas_stop_where_the_cores_end_and_the_rest_keep_serving():
    pool, plan, loads, evictions = make_pool(6, {"a": SDXL_FP32, "b": SDXL_FP32})
    use(pool, "b")
    assert pool.ensure_replicas(key("a"), 12) == 2  # b holds one of the three pairs; nothing is evicted
    assert evictions == [] and {i.key.model for i in pool.snapshot()} == {"a", "b"}


def test_evicting_a_model_drops_all_its_idle_replicas_and_frees_their_cores():
    pool, plan, loads, evictions = make_pool(4, {"a": SDXL_FP32, "b": SDXL_FP32}, max_warm=1)
    pool.ensure_replicas(key("a"), 2)
    assert len(pool.snapshot()) == 2  # max_warm counts models, not replicas
    use(pool, "b")
    assert evictions == ["a", "a"] and [i.key.model for i in pool.snapshot()] == ["b"]
    assert plan.placement(ReplicaKey(key("a"), 1)) is None


def test_cores_held_by_another_process_are_refused_naming_it():
    listing = neuron_ls(2)
    listing[0]["neuron_processes"] = [{"pid": 4242, "command": "python app.py --port 7861"}]
    with pytest.raises(BackendUnavailable, match=r"process 4242 \(python app.py --port 7861\) holds NeuronCores 0-1"
                                                 r".*belongs to one process.*NEURON_RT_VISIBLE_CORES"):
        discover_cores(neuron_ls=lambda: listing, devices=lambda: [], own_pid=1)
    # our own process, or another process on cores we do not use, is no obstacle
    assert discover_cores(neuron_ls=lambda: listing, devices=lambda: [], own_pid=4242).count == 4
    assert discover_cores("2-3", neuron_ls=lambda: listing, devices=lambda: [], own_pid=1).physical == (2, 3)


def test_a_pair_where_a_replica_failed_is_skipped_and_its_cores_freed():
    sizes = {"a": SDXL_FP32}
    plan = CorePlan(cores(8), lambda k: sizes[k.model])
    attempts = []

    def loader(r):
        placed = plan.placement(r)
        attempts.append(placed.pair_index)
        if placed.pair_index == 1:
            raise RuntimeError("NRT: pair 1 is broken")
        return Record(r, device_ids=placed.device_ids)

    pool = WarmPool(loader, 2, core_plan=plan, replicas=lambda k: 4)
    assert pool.ensure_replicas(key("a"), 3) == 3
    assert attempts == [0, 1, 2, 3]  # pair 1 failed once, then was not tried again
    assert sorted(i.device_ids for i in pool.snapshot()) == [(0, 1), (4, 5), (6, 7)]
    assert plan.used_bytes()[2] == plan.used_bytes()[3] == 0
    # busy replicas do not retry the broken pair either: the target of 4 is capped at the 3 that work
    with pool.lease(key("a")), pool.lease(key("a")), pool.lease(key("a")), pool.lease(key("a")):
        assert attempts == [0, 1, 2, 3]


def test_cores_busy_names_every_model_in_use_or_other_holders():
    pool, plan, loads, evictions = make_pool(2, {"a": SD21_FP32, "b": SD21_FP32, "c": SD21_FP32, "xl": SDXL_FP32})
    with pool.lease(key("a")), pool.lease(key("b")), pool.lease(key("c")):
        with pytest.raises(CoresBusy) as info:
            use(pool, "xl")
    assert str(info.value) == ("no NeuronCore pair has room for xl@512x512 while a@512x512, b@512x512, c@512x512 are "
                               "in use; try again when a running request finishes")
    assert pool.unload(key("a")) + pool.unload(key("b")) + pool.unload(key("c")) == 3
    plan.place(ReplicaKey(key("c")))  # cores reserved outside the pool
    with pytest.raises(CoresBusy) as info:
        use(pool, "xl")
    assert str(info.value) == ("no NeuronCore pair has room for xl@512x512 while other models are in use; try again "
                               "when a running request finishes")
    assert evictions == ["a", "b", "c"]


def test_a_replica_being_loaded_is_listed_with_its_cores():
    plan = CorePlan(cores(4), lambda k: SDXL_FP32)
    started, release = threading.Event(), threading.Event()

    def loader(r):
        started.set()
        assert release.wait(WAIT_S)
        return Record(r, device_ids=plan.placement(r).device_ids)

    pool = WarmPool(loader, 2, core_plan=plan)
    thread = start(pool.ensure, key("a"))
    assert started.wait(WAIT_S)
    try:
        assert [(i.key, i.device_ids, i.replica) for i in pool.loading()] == [(key("a"), (0, 1), 0)]
    finally:
        release.set()
    finish(thread)
    assert pool.loading() == [] and pool.snapshot()[0].device_ids == (0, 1)


def test_a_failed_replica_caps_the_busy_leases_until_an_eviction_forgets_its_pair():
    plan = CorePlan(cores(8), lambda k: SDXL_FP32)
    broken, attempts = {1}, []

    def loader(r):
        pair = plan.placement(r).pair_index
        attempts.append(pair)
        if pair in broken:
            raise RuntimeError(f"NRT: pair {pair} is broken")
        return Record(r, device_ids=plan.placement(r).device_ids)

    pool = WarmPool(loader, 2, core_plan=plan, replicas={key("a"): 2}.get)
    with pool.lease(key("a")), pool.lease(key("a")):
        pass  # replica 1 failed on pair 1: the second lease shares replica 0, and no other pair is tried
    assert attempts == [0, 1] and [i.replica for i in pool.snapshot()] == [0]
    assert pool.unload(key("a")) == 1  # evicted: its failed pair is forgotten with it
    broken.clear()
    with pool.lease(key("a")), pool.lease(key("a")):
        pass
    assert attempts == [0, 1, 0, 1]
    assert sorted(i.device_ids for i in pool.snapshot()) == [(0, 1), (2, 3)]


def test_ensure_replicas_tries_a_failed_pair_again():
    """A failed pair is avoided by busy leases, but an operator asking for replicas again (after fixing
    the cores) gets it tried again."""
    plan = CorePlan(cores(4), lambda k: SDXL_FP32)
    broken, attempts = {1}, []

    def loader(r):
        attempts.append(plan.placement(r).pair_index)
        if plan.placement(r).pair_index in broken:
            raise RuntimeError("NRT: pair 1 is broken")
        return Record(r, device_ids=plan.placement(r).device_ids)

    pool = WarmPool(loader, 2, core_plan=plan, replicas=lambda k: 2)
    with pool.lease(key("a")), pool.lease(key("a")):
        pass
    assert attempts == [0, 1]
    broken.clear()
    assert pool.ensure_replicas(key("a"), 2) == 2 and attempts == [0, 1, 1]
    assert sorted(i.device_ids for i in pool.snapshot()) == [(0, 1), (2, 3)]


def test_a_replica_that_cannot_be_placed_at_all_is_not_loaded():
    """The plan refuses an extra replica outright (ModelTooLarge, a PlacementError): nothing loads
    without cores; the warm replica serves every lease."""
    plan = CorePlan(cores(8), lambda r: HUGE if r.index == 1 else SDXL_FP32)
    loads = []

    def loader(r):
        loads.append(r.index)
        return Record(r, device_ids=plan.placement(r).device_ids)

    pool = WarmPool(loader, 2, core_plan=plan, replicas=lambda k: 2)
    with pool.lease(key("a")) as first, pool.lease(key("a")) as second:
        assert second is first
    assert pool.ensure_replicas(key("a"), 2) == 1
    assert loads == [0] and [i.replica for i in pool.snapshot()] == [0]
    assert plan.placement(ReplicaKey(key("a"), 1)) is None
