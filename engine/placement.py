"""NeuronCore discovery and the placement plan: which warm model sits on which NeuronCores.

Discovery
    ``discover_cores`` counts the NeuronCores this process may use: from ``neuron-ls --json-output``
    when the Neuron tools are installed, else from the ``/dev/neuron*`` device nodes (two
    NeuronCore-v2 per Inferentia2 / Trainium1 device), then keeps only the cores named by
    ``NEURON_RT_VISIBLE_CORES`` (passed in by the caller: this module reads no environment).
    Both sources are injectable so tests can describe any instance.

Placement
    Each warm model runs its UNet with ``torch_neuronx.DataParallel`` over a *pair* of cores (the
    classifier-free-guidance batch of two split one row per core) and its text encoders and VAE
    on one core of that pair, its *home* core. The UNet is therefore resident on both cores of the
    pair. ``CorePlan.place`` puts a model on the first pair whose two cores both have room
    (several models share a pair while device memory allows; further models go to further pairs),
    choosing as home the core of the pair with more room left. Sizes come from the artifact
    manifest (``footprint_from_manifest``). The warm pool asks the plan before each load and evicts
    least recently used idle models until the new one fits (see ``engine.pool``). A tensor-parallel
    model (PixArt-Sigma, ``tp_degree`` N > 2) reserves an aligned group of N consecutive cores
    instead (cores 0-7, 8-15, ...): one shard of its T5 encoder and transformer on each, its VAE
    decoder on the group's first core, its home.

Core ids: ``Placement.device_ids`` are *logical* ids, 0..n-1 over the visible cores, which is how
torch-neuronx numbers ``DataParallel`` device ids and ``neuron_cores_context`` start cores;
``Placement.physical`` maps them back to the hardware ids neuron-ls and neuron-top show.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Collection, Hashable, Mapping, Optional, Protocol, Sequence, runtime_checkable

from .errors import BackendUnavailable, EngineError
from .families import is_unet

GIB = 1024**3
# Inferentia2 and Trainium1 devices each carry two NeuronCore-v2.
CORES_PER_DEVICE = 2
# inf2: 32 GB of HBM per Inferentia2 device, shared by its two cores -> 16 GB per core. neuron-ls
# reports the real figure (``memory_size`` per device), which replaces this default when present.
HBM_PER_CORE = 16 * GIB
# Device memory a loaded NEFF needs beyond its file size: the runtime's scratchpad for activations
# and its I/O tensors. NOT measured (no published per-model activation figures in the samples); the
# margin is bounded from above by the samples running SDXL fp32 (about 13.6 GB of binaries on its
# home core) on one 16 GB core: at most ~17 % here, so 5 % is a floor, not a guarantee. Watch
# `neuron-top` on real loads and raise it if a placement the plan accepts fails to load.
DEVICE_OVERHEAD = 1.05
PAIR_SIZE = 2

INSTANCES_BY_CORES = {
    2: "inf2.xlarge or inf2.8xlarge",
    12: "inf2.24xlarge",
    24: "inf2.48xlarge",
    32: "trn1.32xlarge",
}

_CORE_LIST_RE = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?$")
_DEVICE_NODE_RE = re.compile(r"^neuron\d+$")


class PlacementError(EngineError):
    """A model cannot be placed on the NeuronCores."""


class ModelTooLarge(PlacementError):
    """The model does not fit on an empty core pair: no eviction can make room for it."""


class CoresBusy(PlacementError):
    """Every pair with room for the model is held by models that are in use right now."""


# --- discovery ------------------------------------------------------------------------------------


def parse_core_list(text: str) -> tuple[int, ...]:
    """``"0-3"`` -> (0, 1, 2, 3); ``"2,3"`` -> (2, 3); ``"4"`` -> (4,).

    The syntax of ``NEURON_RT_VISIBLE_CORES``, which the runtime accepts only as one contiguous range
    (``3,5,6`` is refused); raises ``BackendUnavailable`` on anything else.
    """
    cores: set[int] = set()
    for part in str(text).split(","):
        if not _CORE_LIST_RE.match(part):
            raise BackendUnavailable(
                f"NEURON_RT_VISIBLE_CORES={text!r} is not a NeuronCore list; write a range such as 0-3 "
                "or ids such as 0,1")
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            raise BackendUnavailable(f"NEURON_RT_VISIBLE_CORES={text!r}: the range {part.strip()} runs backwards")
        cores.update(range(first, last + 1))
    ordered = tuple(sorted(cores))
    if ordered and ordered[-1] - ordered[0] + 1 != len(ordered):
        raise BackendUnavailable(
            f"NEURON_RT_VISIBLE_CORES={text!r} is not one contiguous range; the Neuron runtime accepts only "
            f"ranges such as {ordered[0]}-{ordered[-1]} or {ordered[0]}-{ordered[0] + 1}. Run one process per "
            "contiguous range (docs/inferentia.md)")
    return ordered


def run_neuron_ls() -> Optional[list[dict[str, Any]]]:
    """``neuron-ls --json-output`` parsed, or None when the tool is missing or fails."""
    exe = shutil.which("neuron-ls") or next(
        (p for p in ("/opt/aws/neuron/bin/neuron-ls",) if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--json-output"], capture_output=True, text=True, timeout=30, check=True)
        data = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return data if isinstance(data, list) else None


def device_nodes() -> list[str]:
    """The ``/dev/neuronN`` device nodes of this machine (one per Neuron device)."""
    return sorted(p for p in glob.glob("/dev/neuron*") if _DEVICE_NODE_RE.match(os.path.basename(p)))


@dataclass(frozen=True)
class CoreInventory:
    """The NeuronCores this process may use.

    ``physical`` are hardware core ids in order; position i is logical core i (what torch-neuronx
    takes). ``hbm_bytes_per_core`` is the device memory of one core.
    """

    physical: tuple[int, ...]
    hbm_bytes_per_core: int = HBM_PER_CORE
    source: str = "given"

    @property
    def count(self) -> int:
        return len(self.physical)

    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Logical core pairs (0, 1), (2, 3), ...; an odd last core is left out."""
        return tuple((i, i + 1) for i in range(0, self.count - 1, PAIR_SIZE))

    def groups(self, size: int) -> tuple[tuple[int, ...], ...]:
        """Aligned groups of ``size`` consecutive logical cores (``size`` 2: the pairs)."""
        return tuple(tuple(range(i, i + size)) for i in range(0, self.count - size + 1, size))

    def physical_ids(self, logical: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.physical[i] for i in logical)

    def describe(self) -> str:
        instance = INSTANCES_BY_CORES.get(self.count)
        cores = _format_ids(self.physical)
        return (f"{self.count} NeuronCore{'s' if self.count != 1 else ''} ({cores}"
                f"{', like ' + instance if instance else ''}; {self.source})")


def discover_cores(
    visible_cores: Optional[str] = None,
    *,
    num_cores: Optional[str] = None,
    own_pid: Optional[int] = None,
    neuron_ls: Callable[[], Optional[list[dict[str, Any]]]] = run_neuron_ls,
    devices: Callable[[], Sequence[str]] = device_nodes,
    cores_per_device: int = CORES_PER_DEVICE,
) -> CoreInventory:
    """The NeuronCores present, restricted to ``visible_cores`` (``NEURON_RT_VISIBLE_CORES``: one
    contiguous range, as the runtime requires) or else to ``num_cores`` (``NEURON_RT_NUM_CORES``: the
    runtime takes that many free cores; we plan with the first ones present).

    Device nodes ``/dev/neuronN`` carry cores ``N*2`` and ``N*2+1`` (device 1 -> cores 2, 3).
    Raises ``BackendUnavailable`` when no core is found, the settings name cores that are absent, or
    neuron-ls shows another process on the cores this one would use.
    """
    listing = neuron_ls()
    hbm = HBM_PER_CORE
    if listing:
        physical, per_core_memory = _from_neuron_ls(listing)
        if per_core_memory:
            hbm = min(per_core_memory)
        source = "neuron-ls"
    else:
        nodes = list(devices())
        indexes = sorted(int(re.sub(r"\D", "", os.path.basename(node)) or 0) for node in nodes)
        physical = [index * cores_per_device + core for index in indexes for core in range(cores_per_device)]
        source = f"{len(nodes)} /dev/neuron* device{'s' if len(nodes) != 1 else ''} x {cores_per_device} cores"
    if not physical:
        raise BackendUnavailable(
            "no NeuronCores found: neuron-ls is not installed or lists nothing, and there is no /dev/neuron* "
            "device. Run on an inf2/trn1 instance with the Neuron driver installed (see docs/inferentia.md).")
    if visible_cores:
        wanted = parse_core_list(visible_cores)
        missing = [c for c in wanted if c not in physical]
        if missing:
            raise BackendUnavailable(
                f"NEURON_RT_VISIBLE_CORES={visible_cores!r} names NeuronCore(s) {_format_ids(missing)}, but this "
                f"machine has {_format_ids(physical)}")
        physical = [c for c in physical if c in wanted]
        source += f", NEURON_RT_VISIBLE_CORES={visible_cores}"
    elif num_cores:
        count = int(num_cores) if str(num_cores).strip().isdigit() else 0
        if not 1 <= count <= len(physical):
            raise BackendUnavailable(
                f"NEURON_RT_NUM_CORES={num_cores!r}: expected a whole number from 1 to {len(physical)} (the "
                f"NeuronCores this machine has: {_format_ids(physical)})")
        physical = sorted(physical)[:count]
        source += f", NEURON_RT_NUM_CORES={count}"
    owners = core_owners(listing, physical, own_pid)
    if owners:
        raise BackendUnavailable(owners_message(owners))
    return CoreInventory(tuple(sorted(physical)), hbm, source)


def _from_neuron_ls(listing: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    physical: list[int] = []
    per_core_memory: list[int] = []
    for device in listing:
        count = int(device.get("nc_count") or len(device.get("neuroncore_ids") or ()) or CORES_PER_DEVICE)
        ids = device.get("neuroncore_ids")
        if not ids:
            index = int(device.get("neuron_device", len(physical) // count))
            ids = range(index * count, (index + 1) * count)
        physical.extend(int(i) for i in ids)
        memory = device.get("memory_size")
        if isinstance(memory, (int, float)) and memory > 0:
            per_core_memory.append(int(memory) // count)
    return physical, per_core_memory


@dataclass(frozen=True)
class CoreOwner:
    """Another process holding NeuronCores (from ``neuron-ls``): a core belongs to one process."""

    pid: int
    command: str
    cores: tuple[int, ...]


def core_owners(listing: Optional[list[dict[str, Any]]], cores: Sequence[int],
                own_pid: Optional[int] = None) -> list[CoreOwner]:
    """The processes other than ``own_pid`` that ``neuron-ls --json-output`` shows on the devices
    carrying ``cores``. neuron-ls reports processes per device (two cores on inf2/trn1)."""
    own_pid = os.getpid() if own_pid is None else own_pid
    owners: dict[int, CoreOwner] = {}
    offset = 0
    for device in listing or ():
        count = int(device.get("nc_count") or len(device.get("neuroncore_ids") or ()) or CORES_PER_DEVICE)
        ids = tuple(int(i) for i in (device.get("neuroncore_ids") or range(offset, offset + count)))
        offset += count
        shared = tuple(c for c in ids if c in cores)
        for process in device.get("neuron_processes") or ():
            pid = int(process.get("pid", 0) or 0) if isinstance(process, dict) else 0
            if pid and pid != own_pid and shared:
                known = owners.get(pid)
                owners[pid] = CoreOwner(pid, str(process.get("command", "?"))[:80],
                                        tuple(sorted({*(known.cores if known else ()), *shared})))
    return list(owners.values())


def owners_message(owners: Sequence[CoreOwner]) -> str:
    held = "; ".join(f"process {o.pid} ({o.command}) holds NeuronCores {_format_ids(o.cores)}" for o in owners)
    return (f"{held}. A NeuronCore belongs to one process: stop that process, or give this one other cores "
            "with NEURON_RT_VISIBLE_CORES=<first>-<last> (one contiguous range; see docs/inferentia.md)")


def _format_ids(ids: Sequence[int]) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    ids = sorted(ids)
    if not ids:
        return "none"
    runs, start, prev = [], ids[0], ids[0]
    for core in ids[1:] + [None]:  # type: ignore[operator]
        if core is not None and core == prev + 1:
            prev = core
            continue
        runs.append(f"{start}-{prev}" if prev > start else str(start))
        if core is not None:
            start = prev = core
    return ",".join(runs)


# --- footprints and the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """Device memory a warm model needs: its UNet on *each* core of its pair, the rest on its home core;
    a tensor-parallel model one shard on each of its ``cores`` (``sharded_bytes``: one core's shards)."""

    unet_bytes: int = 0
    other_bytes: int = 0
    sharded_bytes: int = 0
    cores: int = PAIR_SIZE

    @property
    def home_core_bytes(self) -> int:
        return self.unet_bytes + self.sharded_bytes + self.other_bytes

    @property
    def other_core_bytes(self) -> int:
        return self.unet_bytes + self.sharded_bytes


def footprint_from_manifest(manifest: Mapping[str, Any], overhead: float = DEVICE_OVERHEAD) -> Footprint:
    """The footprint of a compiled variant from its manifest's component sizes (0 if unknown)."""
    components = manifest.get("components") or {}
    sharded = {name: e for name, e in components.items() if int(e.get("tp_degree", 1)) > 1}
    unet = sum(int(e.get("bytes", 0)) for name, e in components.items() if is_unet(name))
    other = sum(int(e.get("bytes", 0)) for name, e in components.items() if not is_unet(name) and name not in sharded)
    # each rank's file goes to its own core: plan with the largest rank
    per_core = sum(max([int(e.get("bytes", 0)), *(int(s.get("bytes", 0)) for s in e.get("shards") or ())])
                   for e in sharded.values())
    cores = max([PAIR_SIZE, *(int(e["tp_degree"]) for e in sharded.values())])
    return Footprint(int(unet * overhead), int(other * overhead), int(per_core * overhead), cores)


@dataclass(frozen=True)
class Placement:
    """Where one warm model sits. ``device_ids`` (logical) start with the home core: the UNet runs
    DataParallel over all of them, the text encoders and VAE on ``device_ids[0]``; a tensor-parallel
    model's shards go to all of them in order (rank r on ``device_ids[r]``). ``pair_index``: the
    first core pair it uses."""

    key: Hashable
    pair_index: int
    device_ids: tuple[int, ...]
    physical: tuple[int, ...]
    footprint: Footprint

    @property
    def home(self) -> int:
        return self.device_ids[0]

    @property
    def pair_indexes(self) -> frozenset[int]:
        """Every core pair this placement uses (one, or tp_degree / 2 for a sharded model)."""
        return frozenset(core // PAIR_SIZE for core in self.device_ids)


@runtime_checkable
class PlacedBackend(Protocol):
    """A backend whose warm models are placed on NeuronCores (the neuron backend)."""

    def core_inventory(self) -> CoreInventory: ...


class CorePlan:
    """Which warm (or loading) model sits on which core pair, and how much memory each core has left.

    Thread-safe. The plan places and releases; it never evicts (the pool decides what goes).
    ``footprint_of(key)`` is asked once per placement.
    """

    def __init__(self, inventory: CoreInventory, footprint_of: Callable[[Hashable], Footprint]):
        if inventory.count < PAIR_SIZE:
            raise BackendUnavailable(
                f"a warm model needs a pair of NeuronCores (its UNet runs DataParallel over two cores); this process "
                f"sees {inventory.describe()}. Make at least two cores visible, e.g. NEURON_RT_VISIBLE_CORES=0-1")
        self.inventory = inventory
        self._footprint_of = footprint_of
        self._placements: dict[Hashable, Placement] = {}
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.inventory.hbm_bytes_per_core

    def place(self, key: Hashable, apart_from: Collection[Hashable] = (),
              avoid_pairs: Collection[int] = ()) -> Optional[Placement]:
        """Reserve room for ``key`` (idempotent); None when no pair has room right now.

        ``apart_from``: keys whose pairs ``key`` must not share (the other replicas of a model, so
        that each replica runs on cores of its own); ``avoid_pairs``: pair indexes not to use (where
        a replica failed to load). Raises ``ModelTooLarge`` when the model would
        not fit even on an empty pair.
        """
        with self._lock:
            if key in self._placements:
                return self._placements[key]
            footprint = self._footprint_of(key)
            if footprint.home_core_bytes > self.capacity:
                raise ModelTooLarge(self._too_large_message(key, footprint))
            if footprint.cores > self.inventory.count:
                raise ModelTooLarge(
                    f"{key} is sharded over {footprint.cores} NeuronCores (tp_degree) but this process sees "
                    f"{self.inventory.describe()}; make {footprint.cores} cores visible or lower its tp_degree")
            taken = {i for k in apart_from if k in self._placements for i in self._placements[k].pair_indexes}
            taken |= set(avoid_pairs)
            for group in self.inventory.groups(footprint.cores):
                if any(core // PAIR_SIZE in taken for core in group):
                    continue
                used = self._used_locked()
                # A pair: prefer as home the core with more room left, so models sharing a pair alternate
                # homes. A tensor-parallel group keeps its order (shard r on core group[r], home first).
                orders = [group] if len(group) > PAIR_SIZE else sorted((group, group[::-1]), key=lambda o: used[o[0]])
                for order in orders:
                    if (used[order[0]] + footprint.home_core_bytes <= self.capacity
                            and all(used[c] + footprint.other_core_bytes <= self.capacity for c in order[1:])):
                        placement = Placement(key, group[0] // PAIR_SIZE, tuple(order),
                                              self.inventory.physical_ids(order), footprint)
                        self._placements[key] = placement
                        return placement
            return None

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._placements.pop(key, None)

    def placement(self, key: Hashable) -> Optional[Placement]:
        with self._lock:
            return self._placements.get(key)

    def used_bytes(self) -> dict[int, int]:
        """Bytes reserved on each logical core."""
        with self._lock:
            return self._used_locked()

    def describe(self) -> dict[str, Any]:
        """For ``Engine.status()``: the cores, and per pair the models on it and the memory left."""
        with self._lock:
            used = self._used_locked()
            pairs = []
            for index, pair in enumerate(self.inventory.pairs()):
                models = [{"model": str(p.key), "home_core": p.home, "device_ids": list(p.device_ids)}
                          for p in self._placements.values() if index in p.pair_indexes]
                pairs.append({
                    "device_ids": list(pair),
                    "physical_cores": list(self.inventory.physical_ids(pair)),
                    "models": models,
                    "used_gib": [round(used[c] / GIB, 2) for c in pair],
                    "free_gib": [round((self.capacity - used[c]) / GIB, 2) for c in pair],
                })
            return {"cores": self.inventory.describe(), "hbm_gib_per_core": round(self.capacity / GIB, 2),
                    "pairs": pairs}

    def _used_locked(self) -> dict[int, int]:
        used = {core: 0 for core in range(self.inventory.count)}
        for p in self._placements.values():
            used[p.device_ids[0]] += p.footprint.home_core_bytes
            for core in p.device_ids[1:]:
                used[core] += p.footprint.other_core_bytes
        return used

    def _too_large_message(self, key: Hashable, footprint: Footprint) -> str:
        return (
            f"{key} does not fit on a NeuronCore pair: its home core needs {footprint.home_core_bytes / GIB:.1f} GiB "
            f"(UNet {footprint.unet_bytes / GIB:.1f} GiB, resident on both cores of the pair, plus text encoders and "
            f"VAE {footprint.other_bytes / GIB:.1f} GiB) but a core has {self.capacity / GIB:.1f} GiB of device "
            f"memory. Compile it as bf16 (dtype: bf16 in the registry) or at a smaller resolution.")
