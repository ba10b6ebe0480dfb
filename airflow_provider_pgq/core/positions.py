"""Where many movers stand on one database, read in one statement.

A status page shows every mover at once; movers share databases (eight partitions
feeding one central target). Reading each mover's position with the per-consumer
calls would cost a round trip per mover and per side; this module asks one database
everything the page needs about it in a single statement: each consumer's position on
its source queue and each tracking key's mark in pgq_ext, as JSON, with the names
passed as array parameters. Read-only: it never allocates a batch or writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import PgqNotInstalled
from airflow_provider_pgq.core.journal import RunKey, Totals
from airflow_provider_pgq.core.pending import PendingStatus


@dataclass(frozen=True)
class TargetMark:
    """A tracking key's mark in the target's pgq_ext (None: nothing applied yet)."""

    target_queue: str
    consumer_name: str
    subconsumer: str
    queue_exists: bool
    mark: int | None


@dataclass(frozen=True)
class Positions:
    #: (queue, consumer) -> the consumer's status (pending.PendingStatus, the package's one
    #: status model); no entry for a queue that does not exist (see ``missing_queues``).
    sources: dict[tuple[str, str], PendingStatus]
    targets: dict[tuple[str, str, str], TargetMark]
    #: Source queues asked for that do not exist.
    missing_queues: frozenset[str] = frozenset()
    #: Why the targets could not be read although the sources could (pgq_ext missing).
    target_problem: str | None = None
    #: What Airflow runs moved by the target's move journal (journal.run_totals), for the
    #: runs the reader asked about: the PgQ page's history where a run's XCom is missing.
    runs: dict[RunKey, Totals] = field(default_factory=dict)


_SOURCES = sql.SQL(
    "select coalesce(pg_catalog.json_agg(pg_catalog.json_build_object("
    " 'queue_name', w.queue_name, 'consumer_name', w.consumer_name,"
    " 'queue_exists', q.queue_id is not null, 'registered', c.consumer_name is not null,"
    " 'last_tick', c.last_tick, 'current_batch', c.current_batch, 'next_tick', c.next_tick,"
    " 'pending_events', c.pending_events,"
    " 'lag_seconds', pg_catalog.date_part('epoch', c.lag)::float8,"
    " 'last_seen_seconds', pg_catalog.date_part('epoch', c.last_seen)::float8,"
    " 'newest_tick', (select pg_catalog.max(t.tick_id) from pgq.tick t where t.tick_queue = q.queue_id)"
    ")), '[]')"
    " from rows from (pg_catalog.unnest(%(src_queues)s::text[]), pg_catalog.unnest(%(src_consumers)s::text[]))"
    " as w(queue_name, consumer_name)"
    " left join pgq.queue q on q.queue_name = w.queue_name"
    " left join lateral pgq.get_consumer_info(w.queue_name, w.consumer_name) c on q.queue_id is not null"
)

_TARGETS = sql.SQL(
    "select coalesce(pg_catalog.json_agg(pg_catalog.json_build_object("
    " 'target_queue', w.queue_name, 'consumer_name', w.consumer_name, 'subconsumer', w.subconsumer,"
    " 'queue_exists', exists (select 1 from pgq.queue q where q.queue_name = w.queue_name),"
    " 'mark', pgq_ext.get_last_tick(w.consumer_name, w.subconsumer)"
    ")), '[]')"
    " from rows from (pg_catalog.unnest(%(tgt_queues)s::text[]), pg_catalog.unnest(%(tgt_consumers)s::text[]),"
    "                pg_catalog.unnest(%(tgt_subconsumers)s::text[]))"
    " as w(queue_name, consumer_name, subconsumer)"
)

_NONE = sql.SQL("'[]'::json")

# invalid_schema_name, undefined_function, undefined_table: pgq or pgq_ext is not there.
_MISSING = ("3F000", "42883", "42P01")


def _statement(with_sources: bool, with_targets: bool) -> sql.Composed:
    return sql.SQL("select ({}), ({})").format(_SOURCES if with_sources else _NONE,
                                              _TARGETS if with_targets else _NONE)


def read_positions(
    conn: Connection,
    sources: Sequence[tuple[str, str]],
    targets: Sequence[tuple[str, str, str]],
) -> Positions:
    """Positions of ``sources`` ((queue, consumer) pairs) and marks of ``targets``
    ((target_queue, consumer, subconsumer)) in one statement, then a rollback.

    A database without pgq_ext still answers for its sources (a second statement, only
    then), with ``target_problem`` saying why the marks are missing. A database without
    pgq raises PgqNotInstalled.
    """
    src, tgt = sorted(set(sources)), sorted(set(targets))
    params = {
        "src_queues": [q for q, _ in src], "src_consumers": [c for _, c in src],
        "tgt_queues": [q for q, _, _ in tgt], "tgt_consumers": [c for _, c, _ in tgt],
        "tgt_subconsumers": [s for _, _, s in tgt],
    }
    problem = None
    try:
        source_rows, target_rows = _run(conn, _statement(bool(src), bool(tgt)), params)
    except psycopg2.Error as exc:
        conn.rollback()
        if exc.pgcode not in _MISSING:
            raise
        if not _has_schema(conn, "pgq"):
            raise PgqNotInstalled(
                f"database {_database(conn)!r} has no pgq schema: install the extension there"
                " (create extension pgq) or point the connection at the right database"
            ) from None
        if not tgt or _has_schema(conn, "pgq_ext"):
            raise
        problem = _pgq_ext_problem(conn)
        if not src:
            return Positions({}, {}, target_problem=problem)
        source_rows, target_rows = _run(conn, _statement(True, False), params)
    finally:
        conn.rollback()
    return Positions(
        sources={(r["queue_name"], r["consumer_name"]): _status(r) for r in source_rows if r["queue_exists"]},
        targets={(r["target_queue"], r["consumer_name"], r["subconsumer"]): TargetMark(**r) for r in target_rows},
        missing_queues=frozenset(r["queue_name"] for r in source_rows if not r["queue_exists"]),
        target_problem=problem,
    )


def _status(row: dict[str, Any]) -> PendingStatus:
    return PendingStatus(**{k: v for k, v in row.items() if k != "queue_exists"})


def _run(conn: Connection, statement: sql.Composed, params: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        row = cur.fetchone()
    assert row is not None
    return list(row[0]), list(row[1])


def _has_schema(conn: Connection, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("select pg_catalog.to_regnamespace(%s) is not null", (name,))
        row = cur.fetchone()
    conn.rollback()
    return bool(row and row[0])


def _database(conn: Connection) -> str:
    return str(conn.info.dbname)


def _pgq_ext_problem(conn: Connection) -> str:
    return (f"pgq_ext is not installed in database {_database(conn)!r}: the mover installs it on its first"
            " run with install_pgq_ext=True (or run 'pgq-queue-mover --install')")
