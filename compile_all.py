"""Admin tool: compile every model x resolution of the registry into artifacts.

    python compile_all.py                       # everything missing or stale, on the auto backend
    python compile_all.py --list                # status table, compiles nothing
    python compile_all.py --models deliberate --resolutions 512x768 --force
    python compile_all.py --verify              # re-hash every compiled file against its manifest

A compiled file's sha256 is recorded at compile and checked at its first load (then remembered by
size, mtime and inode, so restarts do not hash again); ``--verify`` checks everything now.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import artifacts
from engine.cli import quiet_libraries
from engine.backends import BACKEND_NAMES, NEURON_TARGETS, make_backend
from engine.compile import compile_all, plan
from engine.errors import EngineError
from engine.registry import DEFAULT_REGISTRY, load_registry
from engine.types import Size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="model registry YAML")
    parser.add_argument("--backend", choices=[b for b in BACKEND_NAMES if b != "eager"], default="auto",
                        help="auto = neuron when the Neuron SDK and a device are present, else cpu")
    parser.add_argument("--neuron-target", choices=NEURON_TARGETS, default="inf2",
                        help="what neuronx-cc compiles for (serve with the same --neuron-target)")
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], help="comma-separated model ids")
    parser.add_argument("--resolutions", type=lambda s: [Size.parse(r) for r in s.split(",") if r],
                        help="comma-separated sizes such as 512x512,768x512")
    parser.add_argument("--force", action="store_true", help="recompile even what is up to date")
    parser.add_argument("--dry-run", action="store_true", help="show what would be compiled")
    parser.add_argument("--list", action="store_true", help="print the status table and exit")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="let .ckpt (pickle) sources be read; convert them to .safetensors instead if you can")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every compiled file against its manifest's sha256 and exit (1 if any is broken)")
    return parser.parse_args(argv)


def print_table(rows, backend_name: str) -> None:
    print(f"{'model':<20} {'resolution':<11} {'batches':<15} {'tokens':<8} {'backend':<8} status")
    for row in rows:
        reason = f" ({row.status.reason})" if row.status.reason and row.status.state != "missing" else ""
        batches = ",".join(str(b) for b in row.spec.batch_sizes) + ("+nocfg" if row.spec.cfg_free_unet else "")
        tokens = ",".join(str(75 * c) for c in row.spec.prompt_chunks)
        print(f"{row.spec.id:<20} {str(row.size):<11} {batches:<15} {tokens:<8} {backend_name:<8} "
              f"{row.status.state}{reason}")


def verify(rows, registry, backend_name: str) -> int:
    """Hash every compiled variant's files; print one line per variant; 1 if any is broken."""
    broken = 0
    for row in rows:
        if row.status.state != "compiled":
            print(f"{row.spec.id:<20} {str(row.size):<11} {row.status.state} (not checked)")
            continue
        directory = artifacts.variant_dir(registry.artifacts_dir, row.spec.id, row.size, backend_name)
        bad = artifacts.verify_checksums(directory, artifacts.read_manifest(directory), force=True)
        broken += bool(bad)
        print(f"{row.spec.id:<20} {str(row.size):<11} " + (f"BROKEN: {', '.join(bad)}" if bad else "ok"))
    if broken:
        print(f"{broken} variant(s) broken: recompile them with --force", file=sys.stderr)
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        registry = load_registry(args.registry, args.allow_unsafe_pickle)
        backend = make_backend(args.backend, args.neuron_target)
        if backend.name == "eager":
            raise EngineError("the eager backend runs without artifacts; choose --backend cpu or neuron")
        for restored in artifacts.restore_interrupted_publishes(registry.artifacts_dir):
            print(f"restored a variant an interrupted compile had moved aside: {restored}")
        for leftover in artifacts.leftover_partials(registry.artifacts_dir):
            print(f"removing leftover of an interrupted compile: {leftover}")
            artifacts.discard_partial(leftover)
        rows = plan(registry, backend, args.models, args.resolutions)
        if args.verify:
            return verify(rows, registry, backend.name)
        if args.list or args.dry_run:
            print_table(rows, backend.name)
            if args.dry_run:
                todo = [r for r in rows if args.force or r.status.state != "compiled"]
                print(f"would compile {len(todo)} of {len(rows)} variants")
            return 0
        outcomes = compile_all(registry, backend, args.models, args.resolutions, force=args.force)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was published", file=sys.stderr)
        return 130
    failed = [o for o in outcomes if o.state == "failed"]
    counts = {state: sum(o.state == state for o in outcomes) for state in ("compiled", "skipped", "failed")}
    print(f"summary: {counts['compiled']} compiled, {counts['skipped']} up to date, {counts['failed']} failed")
    for outcome in failed:
        print(f"  FAILED {outcome.model} {outcome.size}: {outcome.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
