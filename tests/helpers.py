"""Test helpers over a real database: produce events, tick, read queues back."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import DrainBounds, MoverOptions, MoveReport, QueueMover
from airflow_provider_pgq.testing.cluster import ThrowawayCluster

#: (ev_type, ev_data, extra1, extra2, extra3, extra4, ev_time)
Event = tuple[Any, ...]


@dataclass
class Server:
    cluster: ThrowawayCluster
    dbname: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.dbname)

    def uri(self, user: str | None = None, password: str | None = None) -> str:
        if user is None:
            return self.cluster.uri(self.dbname)
        return self.cluster.uri(self.dbname, user=user, password=password)

    def connect(self) -> psycopg2.extensions.connection:
        return connect(self.dsn, application_name="pgq-tests")

    def execute(self, query: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.cluster.execute(self.dbname, query, params)


def create_queue(server: Server, queue: str) -> None:
    server.execute("select pgq.create_queue(%s)", (queue,))


def produce(server: Server, queue: str, events: Iterable[Sequence[Any]]) -> int:
    """Inserts events (type, data, e1..e4[, time]) in one transaction, times kept."""
    conn = server.connect()
    n = 0
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.current_event_table(%s)", (queue,))
            table = cur.fetchone()[0]  # type: ignore[index]
            schema, name = table.split(".")
            insert = sql.SQL(
                "insert into {} (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)"
                " values (%s, %s, %s, %s, %s, %s, coalesce(%s, now()))"
            ).format(sql.Identifier(schema, name))
            rows = [tuple(e[:6]) + ((e[6] if len(e) > 6 else None),) for e in events]
            cur.executemany(insert, rows)
            n = len(rows)
        conn.commit()
    finally:
        conn.close()
    return n


def simple_events(n: int, start: int = 0, prefix: str = "ev") -> list[Event]:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [
        (f"{prefix}.type", f"{prefix}-data-{i}", f"x{i % 7}", None, "" if i % 3 == 0 else None,
         "é✓" if i % 5 == 0 else None, base + dt.timedelta(seconds=i, microseconds=i))
        for i in range(start, start + n)
    ]


def tick(server: Server, queue: str) -> int:
    """Makes a new tick on the queue now (what pgqd would do)."""
    conn = server.connect()
    try:
        before = pgq.force_tick(conn, queue)
        conn.commit()
        new = pgq.ticker(conn, queue)
        conn.commit()
        assert new is not None and (before is None or new > before), (before, new)
        return new
    finally:
        conn.close()


def queue_events(server: Server, queue: str, with_ids: bool = False) -> Counter[Event]:
    """Multiset of every event row in the queue's tables (type, data, extras, time[, id])."""
    rows = server.execute(
        "select queue_data_pfx from pgq.queue where queue_name = %s", (queue,)
    )
    schema, name = rows[0][0].split(".")
    cols = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time" + (
        ", ev_id" if with_ids else ""
    )
    data = server.execute(
        sql.SQL("select " + cols + " from {}").format(sql.Identifier(schema, name))  # noqa: S608
    )
    return Counter(tuple(r) for r in data)


def register(server: Server, queue: str, consumer: str) -> None:
    server.execute("select pgq.register_consumer(%s, %s)", (queue, consumer))


def run_mover(
    source: Server,
    target: Server,
    consumer: str = "mover",
    bounds: DrainBounds | None = None,
    **options: Any,
) -> MoveReport:
    opts = MoverOptions(
        source_queue=options.pop("source_queue", "src_q"),
        target_queue=options.pop("target_queue", "dst_q"),
        consumer=consumer,
        **options,
    )
    s, t = source.connect(), target.connect()
    try:
        return QueueMover(s, t, opts).drain(bounds)
    finally:
        s.close()
        t.close()


def mark_of(target: Server, consumer: str, subconsumer: str = "") -> int | None:
    rows = target.execute("select pgq_ext.get_last_tick(%s, %s)", (consumer, subconsumer))
    return rows[0][0]

