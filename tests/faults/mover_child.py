"""The mover process the fault driver starts, disrupts and kills.

Builds a QueueMover from its arguments and two DSNs taken from the environment
(PGQ_FAULT_SOURCE_DSN, PGQ_FAULT_TARGET_DSN: never on argv, where `ps` would show
a password) and drains, once or in a loop for --loop-seconds. Both connections
carry ``<app-name>:src`` / ``<app-name>:tgt`` as application_name, so the driver
can find the child's backends in pg_stat_activity.

Ways to be disrupted, besides being killed from outside:
- PGQ_MOVER_FAULT=<point>[:n] in the environment: os._exit(77) at that point.
- --pause-at <point> --pause-file F: the first time the point is reached (in a
  batch of at least --pause-min-events events),
  the child writes F and waits until the driver deletes it (or --pause-timeout
  passes). Meanwhile the driver terminates a backend, restarts a server or sends
  a signal: the batch is open, half-written, exactly where the test wants it.
- --target-options '-c statement_timeout=5': settings for the target session.
- --sigterm-raises: SIGTERM raises SystemExit (as Airflow's task runner turns
  SIGTERM into an exception) instead of ending the process on the spot.
- --connect-timeout / --network-timeout / --statement-timeout / --lock-timeout:
  the bounds (core.guard.Timeouts) of both connections, for the quiet network
  faults (the driver routes such a child through its fault proxies and gives it
  small bounds, so that a frozen connection ends with WaitTimeout within seconds).

Exit codes: 0 drained cleanly, 1 a database or PgQ error, 77 a fault point;
a signal shows as the negative signal number. The last stdout line is a JSON
summary of the drains that completed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg2
from psycopg2 import sql

from airflow_provider_pgq.core import faults, pgq
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import PgqError
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import DrainBounds, MoveReport, MoverOptions, QueueMover
from tests.helpers import fault_from_environment

ENV_SOURCE = "PGQ_FAULT_SOURCE_DSN"
ENV_TARGET = "PGQ_FAULT_TARGET_DSN"


class ObservedMover(QueueMover):
    """A QueueMover that knows how many events the batch it works on holds, so that
    a pause can wait for a big one (big enough that COPY is still streaming)."""

    count_events = False
    current_events = 0

    def next_batch(self, *args: Any, **kwargs: Any) -> pgq.BatchInfo | None:
        batch = super().next_batch(*args, **kwargs)
        self.current_events = 0
        if batch is not None and self.count_events:
            # An exact count in a transaction of its own, ended before the protocol goes on.
            query = sql.SQL("select count(*) from ({}) b").format(
                sql.SQL(pgq.batch_event_sql(self.source, batch.batch_id))
            )
            with self.source.cursor() as cur:
                cur.execute(query)
                row = cur.fetchone()
            self.source.rollback()
            self.current_events = int(row[0]) if row else 0
        return batch


class Pause:
    """Holds the mover at one fault point until the driver lets it go."""

    def __init__(self, point: str | None, flag: Path | None, timeout: float, min_events: int) -> None:
        self.point = point
        self.flag = flag
        self.timeout = timeout
        self.min_events = min_events
        self.done = False
        self.mover: ObservedMover | None = None

    def __call__(self, reached: str) -> None:
        if self.done or self.point is None or self.flag is None or reached != self.point:
            return
        if self.min_events and (self.mover is None or self.mover.current_events < self.min_events):
            return
        self.done = True
        self.flag.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while self.flag.exists() and time.monotonic() < deadline:
            time.sleep(0.005)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mover_child", description=__doc__.splitlines()[0])
    p.add_argument("--source-queue", required=True)
    p.add_argument("--target-queue", required=True)
    p.add_argument("--consumer", required=True)
    p.add_argument("--subconsumer", default="")
    p.add_argument("--app-name", required=True)
    p.add_argument("--chunk-size", type=int, default=5000)
    p.add_argument("--batch-target-events", type=int, default=1)
    p.add_argument("--loop-seconds", type=float, default=0.0)
    p.add_argument("--max-events", type=int, default=None, help="each drain stops once this many events moved")
    p.add_argument("--pause-at", choices=faults.POINTS)
    p.add_argument("--pause-file", type=Path)
    p.add_argument("--pause-timeout", type=float, default=15.0)
    p.add_argument("--pause-min-events", type=int, default=0)
    p.add_argument("--target-options", default="")
    p.add_argument("--sigterm-raises", action="store_true")
    for bound in TIMEOUT_FIELDS:
        p.add_argument(f"--{bound.replace('_', '-')}", type=float, default=None, dest=bound)
    return p.parse_args(argv)


TIMEOUT_FIELDS = ("connect_timeout", "network_timeout", "statement_timeout", "lock_timeout")


def timeouts_from(args: argparse.Namespace) -> Timeouts | None:
    """The bounds given on the command line over Timeouts' defaults; None when none was given."""
    given = {name: getattr(args, name) for name in TIMEOUT_FIELDS if getattr(args, name) is not None}
    return Timeouts(**given) if given else None


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Drains (in a loop when asked) and sums up the reports of the drains that ended."""
    options = MoverOptions(
        source_queue=args.source_queue, target_queue=args.target_queue,
        consumer=args.consumer, subconsumer=args.subconsumer, chunk_size=args.chunk_size,
        batch_target_events=args.batch_target_events,
    )
    env_fault = fault_from_environment()
    pause = Pause(args.pause_at, args.pause_file, args.pause_timeout, args.pause_min_events)

    def fault(point: str) -> None:
        pause(point)
        if env_fault is not None:
            env_fault(point)

    extra = {"options": args.target_options} if args.target_options else {}
    timeouts = timeouts_from(args)
    source = connect(os.environ[ENV_SOURCE], application_name=f"{args.app_name}:src", timeouts=timeouts,
                     side="source")
    try:
        target = connect(os.environ[ENV_TARGET], application_name=f"{args.app_name}:tgt", timeouts=timeouts,
                         side="target", **extra)
        try:
            mover = ObservedMover(source, target, options, fault=fault)
            mover.count_events = args.pause_min_events > 0
            pause.mover = mover
            reports: list[MoveReport] = []
            deadline = time.monotonic() + args.loop_seconds
            while True:
                reports.append(mover.drain(DrainBounds(max_events=args.max_events)))
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        finally:
            target.close()
    finally:
        source.close()
    return {
        "drains": len(reports),
        "batches": sum(r.batches for r in reports),
        "skipped": sum(r.skipped for r in reports),
        "stale": sum(r.stale for r in reports),
        "events": sum(r.events for r in reports),
        "write_path": reports[-1].write_path if reports else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sigterm_raises:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        summary = run(args)
    except (PgqError, psycopg2.Error) as exc:
        # One line naming the failure; the DSNs never appear (connect() redacts them).
        print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
