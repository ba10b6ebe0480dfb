"""Where a catch-up's time goes, batch by batch: the server time of each statement on
each side, and what the source's batch read costs against a plain scan.

    python -m benchmarks.bench_batch_split [--events 1000000] [--ticks-of 100]

Loads N events in ticks of B into a throwaway cluster (as bench_mover does), logs every
statement's duration (log_min_duration_statement = 0) and runs one QueueMover.drain
over direct connections; prints the mover's seconds per batch and the server seconds
per kind of statement, summed over the drain (a multi-statement string is logged once,
under its first statement). Then, for a batch in the middle, the source's batch read
(PgQ's batch_event_sql as the mover's COPY wraps it) timed into /dev/null: as it is,
with the sort in memory (a transaction-local work_mem), without the ORDER BY, and the
plain scan of the same number of rows that the COPY limit's read does; and its plan.
Server times include waiting for the other side (a COPY FROM waits for the source's
rows), so the two sides overlap. A figure, never a pass/fail timing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import psycopg2
from psycopg2 import sql

from benchmarks.bench_mover import CONSUMER, SOURCE_QUEUE, load_source
from benchmarks.bench_roundtrips import pgq_database
from tests.support.cluster import ThrowawayCluster

COLUMNS = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"
_LOGGED = re.compile(r"\[(\d+)\].*duration: ([0-9.]+) ms\s+statement: (.*)")
_ENTRY = re.compile(r"\d{4}-\d\d-\d\d ")
#: statement kind by a word of its text, first match wins
_KINDS = (("to stdout", "COPY out"), ("from stdin", "COPY in"), ("advisory_xact_lock", "take_batch"),
          ("pgq.subscription", "the checks (prepare)"), ("mover_schema_version", "the checks (prepare)"),
          ("batch_event_sql", "batch_event_sql"), ("finish_batch", "finish_batch"),
          ("begin_batch", "begin_batch"), ("set_last_tick", "mark + commit"),
          ("current_event_table", "event table"), ("insert_staged_events", "insert from staging"))


def _kind(statement: str) -> str:
    return next((kind for word, kind in _KINDS if word in statement), statement[:40])


def drain_split(cluster: ThrowawayCluster) -> None:
    from airflow_provider_pgq.core.connect import connect
    from airflow_provider_pgq.core.mover import BatchResult, MoverOptions, QueueMover

    pgq_database(cluster, "split_dst", with_pgq_ext=True)
    cluster.execute("split_dst", "select pgq.create_queue('split_dst_q')")
    cluster.execute("postgres", "alter system set log_min_duration_statement = 0")
    cluster.execute("postgres", "select pg_catalog.pg_reload_conf()")
    time.sleep(0.5)
    mark = cluster.logfile.stat().st_size
    source = connect(cluster.dsn("split_src"), side="source")
    target = connect(cluster.dsn("split_dst"), side="target")
    sides = {source.get_backend_pid(): "source", target.get_backend_pid(): "target"}
    results: list[BatchResult] = []
    mover = QueueMover(source, target, MoverOptions(SOURCE_QUEUE, "split_dst_q", CONSUMER), on_batch=results.append)
    mover.prepare()
    started = time.perf_counter()
    report = mover.drain()
    seconds = time.perf_counter() - started
    source.close()
    target.close()
    cluster.execute("postgres", "alter system reset log_min_duration_statement")
    cluster.execute("postgres", "select pg_catalog.pg_reload_conf()")
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    entries: list[str] = []  # a string of several lines is logged over several lines
    for line in cluster.logfile.read_text(errors="replace")[mark:].splitlines():
        if _ENTRY.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += " " + line.strip()
    for entry in entries:
        found = _LOGGED.search(entry)
        if found and int(found.group(1)) in sides:
            spent[(sides[int(found.group(1))], _kind(found.group(3)))] += float(found.group(2)) / 1000
    print(f"drain: {report.events:,} events in {report.batches} batches, {seconds:.2f} s;"
          f" seconds per batch {[round(r.seconds, 3) for r in results]}")
    for (side, kind), total in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {side:<7} {kind:<22} {total:8.3f} s server time over the drain")


def read_split(cluster: ThrowawayCluster, target_events: int, start_tick: int) -> None:
    conn = psycopg2.connect(cluster.dsn("split_src"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.register_consumer_at(%s, %s, %s)", (SOURCE_QUEUE, CONSUMER, start_tick))
            batch = None
            for _ in range(2):  # the second batch: one from the middle of the table
                if batch is not None:
                    cur.execute("select pgq.finish_batch(%s)", (batch,))
                cur.execute("select batch_id from pgq.next_batch_custom(%s, %s, null, %s, null)",
                            (SOURCE_QUEUE, CONSUMER, target_events))
                batch = cur.fetchone()[0]
            cur.execute("select pgq.batch_event_sql(%s)", (batch,))
            batch_sql = str(cur.fetchone()[0])
            cur.execute(sql.SQL("select pg_catalog.count(*) from ({}) b").format(sql.SQL(batch_sql)))
            rows = int(cur.fetchone()[0])
            cur.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (SOURCE_QUEUE,))
            schema, _, name = str(cur.fetchone()[0]).partition(".")
            table = sql.Identifier(schema, name)
            columns = sql.SQL(COLUMNS)  # our own constant
            print(f"\nthe read of batch {batch} ({rows:,} events), best of 3 into /dev/null:")
            # PgQ's own text for the batch (not input), as transfer.py wraps it
            read = sql.SQL("select {} from ({}) b").format(columns, sql.SQL(batch_sql))
            unsorted = sql.SQL("select {} from ({}) b").format(
                columns, sql.SQL(batch_sql.rsplit(" order by 1", 1)[0]))
            plain = sql.SQL("select {} from {} limit {}").format(columns, table, sql.Literal(rows))
            for label, query, setting in (
                ("PgQ's batch read, as the mover's COPY", read, None),
                ("  with work_mem = 256MB (sort in memory)", read, "256MB"),
                ("  without its ORDER BY ev_id", unsorted, None),
                ("a plain scan of as many rows (the COPY limit's read)", plain, None),
            ):
                best = float("inf")
                for _ in range(3):
                    cur.execute("begin")
                    if setting:
                        cur.execute("select pg_catalog.set_config('work_mem', %s, true)", (setting,))
                    with open(os.devnull, "wb") as sink:
                        started = time.perf_counter()
                        cur.copy_expert(sql.SQL("copy ({}) to stdout (format binary)").format(query), sink)
                        best = min(best, time.perf_counter() - started)
                    cur.execute("rollback")
                print(f"  {label:<55} {best * 1000:8.1f} ms")
            cur.execute(sql.SQL("explain (analyze, buffers, timing off) {}").format(read))
            print("  plan:")
            for (line,) in cur.fetchall():
                print("    " + line[:150])
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--ticks-of", dest="ticks_of", type=int, default=100)
    parser.add_argument("--batch-events", type=int, default=200_000,
                        help="events of the batch whose read is timed (the mover's default target)")
    args = parser.parse_args(argv)
    cluster = ThrowawayCluster().start()
    try:
        cluster.create_database("split_src")
        conn = psycopg2.connect(cluster.dsn("split_src"))
        conn.autocommit = True
        try:
            start_tick, _ = load_source(conn, args.events, args.ticks_of)
            with conn.cursor() as cur:
                cur.execute("vacuum analyze")
        finally:
            conn.close()
        print(f"{args.events:,} events in ticks of {args.ticks_of:,}; load average {os.getloadavg()[0]:.1f}")
        drain_split(cluster)
        read_split(cluster, args.batch_events, start_tick)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
