"""What a poison event costs: one batch of --events events from a SQL_ASCII source into a
UTF8 target, moved clean, with --poison events holding a Latin-1 byte under
invalid_events = "dead_letter" (the batch is refused, then sifted in halves under
savepoints), and under "stop" (sifted until the first ten are named, then rolled back).

    python -m benchmarks.bench_poison [--events 200000] [--poison 1] [--path copy|staged]

Prints seconds per run (best of --repeat); the clean batch is the baseline. A figure,
never a pass/fail: docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Callable

import psycopg2
from psycopg2 import sql

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import InvalidEvents
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.support.cluster import ThrowawayCluster


def _database(cluster: ThrowawayCluster, name: str, encoding: str, queue: str) -> None:
    cluster.execute("postgres", sql.SQL(
        "create database {} encoding {} template template0 lc_collate 'C' lc_ctype 'C'"
    ).format(sql.Identifier(name), sql.Literal(encoding)))
    cluster.execute(name, "create extension pgq")
    cluster.execute(name, "select pgq.create_queue(%s)", (queue,))
    cluster.execute(name, "select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (queue,))


def _fill(cluster: ThrowawayCluster, db: str, events: int, poison: int) -> None:
    """events in one tick, poison of them (spread evenly) with byte 0xe9 in ev_data."""
    every = events // poison if poison else 0
    conn = psycopg2.connect(cluster.dsn(db))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select pgq.insert_event('src_q', 'bench', case when %s > 0 and n %% %s = 0"
                " then pg_catalog.convert_from('\\x636166e9'::bytea, 'SQL_ASCII') else 'event ' || n end)"
                " from generate_series(1, %s) n", (every, every or 1, events))
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("select pgq.ticker('src_q')")
        conn.commit()
    finally:
        conn.close()


def run(cluster: ThrowawayCluster, events: int, poison: int, mode: str, target_dsn: Callable[[str], str]) -> float:
    tag = secrets.token_hex(4)
    src, dst = f"bp_src_{tag}", f"bp_dst_{tag}"
    _database(cluster, src, "SQL_ASCII", "src_q")
    _database(cluster, dst, "UTF8", "dst_q")
    conn = psycopg2.connect(cluster.dsn(dst))
    try:
        pgq_ext.install(conn)
    finally:
        conn.close()
    cluster.execute(src, "select pgq.register_consumer('src_q', 'bench')")
    _fill(cluster, src, events, poison)
    s, t = connect(cluster.dsn(src)), connect(target_dsn(dst))
    try:
        mover = QueueMover(s, t, MoverOptions("src_q", "dst_q", "bench", invalid_events=mode,
                                              batch_target_events=events))
        mover.prepare()
        started = time.monotonic()
        try:
            mover.drain()
        except InvalidEvents:
            pass
        return time.monotonic() - started
    finally:
        s.close()
        t.close()
        cluster.drop_database(src)
        cluster.drop_database(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--poison", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--path", choices=("copy", "staged"), default="copy")
    args = parser.parse_args(argv)
    cluster = ThrowawayCluster().start()
    try:
        def dsn(db: str) -> str:
            if args.path == "copy":
                return cluster.dsn(db)
            cluster.execute("postgres", "do $$ begin if not exists (select 1 from pg_roles"
                            " where rolname = 'bench_mover') then create role bench_mover login password"
                            " 'bench' in role pgq_mover; end if; end $$")
            return cluster.dsn(db, user="bench_mover", password="bench")

        for label, poison, mode in (("clean", 0, "dead_letter"), ("dead_letter", args.poison, "dead_letter"),
                                    ("stop", args.poison, "stop")):
            best = min(run(cluster, args.events, poison, mode, dsn) for _ in range(args.repeat))
            print(f"{args.path:6} {label:11} {args.events} events, {poison} poison: {best:.2f}s", flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
