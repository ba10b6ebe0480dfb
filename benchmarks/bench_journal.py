"""What the move journal costs a batch on the target: step 5 of the protocol as it was
(pgq_ext.set_last_tick + COMMIT, one round trip) against mover schema 6's
pgq_ext.mark_batch + COMMIT (the mark and the journal row, the retention's index range
delete, and every 32nd call the keep_rows cut; also one round trip).

    python -m benchmarks.bench_journal [--calls 2000] [--rounds 5] [--rows 100000]

One throwaway cluster, a database with pgq and our pgq_ext; the journal first holds
--rows entries of the key (as a busy key under the default keep_rows would), so the
range delete and the cut meet a full index. The two statements run interleaved in
--rounds rounds of --calls transactions each, over a local socket. Printed: per call,
the median over rounds of the client's wall time and of the target backend's CPU time
(from /proc). A figure, never a pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import psycopg2

from benchmarks.bench_roundtrips import pgq_database
from tests.support.cluster import ThrowawayCluster

DB = "journal_bench"
SET_LAST_TICK = "select pgq_ext.set_last_tick('bench_old', '', %s::bigint); commit"
MARK_BATCH = ("select pgq_ext.mark_batch('bench_new', '', %s::bigint, %s::bigint - 1, %s::bigint, 10, 0, 0,"
              " '{\"dag_id\": \"bench\", \"run_id\": \"r\", \"task_id\": \"t\", \"map_index\": -1,"
              " \"try_number\": 1, \"host\": \"h\", \"pid\": 1}'::jsonb); commit")


def backend_cpu(pid: int) -> float:
    """utime + stime of a local backend, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(conn: psycopg2.extensions.connection, statement: str, start: int, calls: int,
        arity: int) -> tuple[float, float]:
    """(wall, backend CPU) seconds per call over ``calls`` transactions; the statement takes
    the call's number ``arity`` times."""
    pid = conn.get_backend_pid()
    cpu, wall = backend_cpu(pid), time.perf_counter()
    with conn.cursor() as cur:
        for i in range(start, start + calls):
            cur.execute(statement, (i,) * arity)
    return (time.perf_counter() - wall) / calls, (backend_cpu(pid) - cpu) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000, help="journal entries of the key beforehand")
    args = parser.parse_args()
    cluster = ThrowawayCluster().start()
    try:
        pgq_database(cluster, DB, with_pgq_ext=True)
        cluster.execute(DB, "insert into pgq_ext.move_journal (consumer_id, batch_id, cur_tick_id, events,"
                        " login_role, applied_at) select 'bench_new', -g, -g, 10, 'x',"
                        " pg_catalog.now() - interval '1 day' + g * interval '1 ms'"
                        " from pg_catalog.generate_series(1, %s) g", (args.rows,))
        cluster.execute(DB, "vacuum analyze pgq_ext.move_journal")
        conn = psycopg2.connect(cluster.dsn(DB))
        conn.autocommit = True  # the statements carry their own COMMIT, as commit_after sends it
        old: list[tuple[float, float]] = []
        new: list[tuple[float, float]] = []
        position = 1
        for _ in range(args.rounds):
            old.append(run(conn, SET_LAST_TICK, position, args.calls, 1))
            new.append(run(conn, MARK_BATCH, position, args.calls, 3))
            position += args.calls
        conn.close()
        kept = cluster.execute(DB, "select count(*) from pgq_ext.move_journal where consumer_id = 'bench_new'")[0][0]
    finally:
        cluster.stop()
    print(f"{args.rounds} rounds of {args.calls} transactions each, {args.rows:,} journal entries beforehand"
          f" ({kept:,} kept at the end); medians per call; load average {os.getloadavg()[0]:.1f}")
    print(f"{'step 5':<40} {'wall ms':>8} {'backend CPU ms':>15}")
    for name, values in (("set_last_tick + commit (schema 5)", old), ("mark_batch + commit (schema 6)", new)):
        wall = statistics.median(v[0] for v in values) * 1000
        cpu = statistics.median(v[1] for v in values) * 1000
        print(f"{name:<40} {wall:>8.3f} {cpu:>15.3f}")


if __name__ == "__main__":
    main()
