"""The soak variant of the fault storm, on demand:

    .venv/bin/python -m tests.faults.soak --faults 300 --seed 7

Starts two throwaway clusters (source, target), runs the storm until that many
disruptions have landed, prints the summary by kind (faults, events produced and in
the target, lost, doubled, longest hang) and the details, and exits 0 only when
nothing was lost or doubled, every invariant held and every kind landed at least
once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tests.faults.driver import Database, Storm
from tests.support.cluster import ThrowawayCluster


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=200, help="disruptions that must land (default 200)")
    p.add_argument("--seed", type=int, default=7, help="seed of the fault schedule (default 7)")
    p.add_argument("--quiet", action="store_true", help="no line per fault, only the summary")
    args = p.parse_args(argv)
    if args.faults < 1:
        p.error("--faults must be at least 1")

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    started = time.monotonic()
    source_cluster = ThrowawayCluster().start()
    target_cluster = ThrowawayCluster().start()
    try:
        for c in (source_cluster, target_cluster):
            c.create_database("soak")
            c.execute("soak", "create extension pgq")
        storm = Storm(Database(source_cluster, "soak"), Database(target_cluster, "soak"), log=log)
        storm.setup()
        try:
            result = storm.run(args.faults, args.seed)
        finally:
            storm.teardown()
    finally:
        target_cluster.stop()
        source_cluster.stop()
    print()
    print(result.table())
    never = [kind for kind, (_, fired) in result.by_kind().items() if not fired]
    problems = result.unexpected_errors + result.invariant_violations + result.hung
    problems += [f"kind {kind} never landed" for kind in never]
    for problem in problems:
        print(f"\nPROBLEM: {problem}")
    verdict = "PASS" if result.ok and result.fired >= args.faults and not never else "FAIL"
    print(f"\n{verdict}: {result.fired} faults landed ({len(result.kinds)} kinds), {result.lost} lost,"
          f" {result.doubled} doubled; wall time {time.monotonic() - started:.0f} s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
