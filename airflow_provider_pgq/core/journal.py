"""The move journal on the target (pgq_ext.move_journal): who moved which batch, when.

Each batch a mover applies leaves one row, written with its mark in the batch's own
target transaction (pgq_ext.mark_batch): a row exists exactly when the batch's mark
moved, whichever process, attempt or host applied it. Reports that must survive a
killed attempt (the operator's XCom across retries, the PgQ page's run history, the
CLI's --status) read it back from here.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg2.extensions import connection as Connection


@dataclass(frozen=True)
class Who:
    """Who runs a mover, as the journal records it: the Airflow task instance for the
    operator, the job name for the CLI; the host and pid of the process for both."""

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    try_number: int | None = None
    job: str | None = None
    host: str | None = None
    pid: int | None = None

    @classmethod
    def here(cls, **fields: Any) -> Who:
        """The given fields, with this process's host and pid."""
        return cls(**{"host": socket.gethostname(), "pid": os.getpid(), **fields})

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class JournalEntry:
    """One applied batch."""

    journal_id: int
    batch_id: int
    prev_tick_id: int | None
    cur_tick_id: int
    events: int
    filtered: int
    dead_lettered: int
    applied_at: dt.datetime
    login_role: str
    who: Who

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["applied_at"] = self.applied_at.isoformat()
        out["who"] = self.who.as_json()
        return out


# the columns of an entry, in _entry's order
_OF_KEY = (
    "select journal_id, batch_id, prev_tick_id, cur_tick_id, events, filtered, dead_lettered, applied_at,"
    " login_role, dag_id, run_id, task_id, map_index, try_number, job, host, pid"
    " from pgq_ext.move_journal"
    " where consumer_id = %s::text and subconsumer_id = %s::text"
    " order by applied_at desc, journal_id desc limit %s"
)

_OF_RUN = (
    "select journal_id, batch_id, prev_tick_id, cur_tick_id, events, filtered, dead_lettered, applied_at,"
    " login_role, dag_id, run_id, task_id, map_index, try_number, job, host, pid"
    " from pgq_ext.move_journal"
    " where consumer_id = %s::text and subconsumer_id = %s::text"
    " and dag_id = %s::text and run_id = %s::text and task_id = %s::text and map_index = %s::integer"
    " order by applied_at, journal_id"
)

_HAS_JOURNAL = "select pg_catalog.to_regclass('pgq_ext.move_journal') is not null"


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    (journal_id, batch_id, prev_tick, cur_tick, events, filtered, dead, applied_at, role,
     dag_id, run_id, task_id, map_index, try_number, job, host, pid) = row
    return JournalEntry(
        int(journal_id), int(batch_id), None if prev_tick is None else int(prev_tick), int(cur_tick),
        int(events), int(filtered), int(dead), applied_at, str(role),
        Who(dag_id, run_id, task_id, map_index, try_number, job, host, pid),
    )


def has_journal(conn: Connection) -> bool:
    """False on a pgq_ext older than mover schema 6 (or none): nothing to read."""
    with conn.cursor() as cur:
        cur.execute(_HAS_JOURNAL)
        row = cur.fetchone()
    return bool(row and row[0])


def last_entries(conn: Connection, consumer: str, subconsumer: str, limit: int = 10) -> list[JournalEntry]:
    """The key's newest ``limit`` entries, newest first; [] without a journal. Leaves
    the transaction open (the caller rolls back)."""
    if not has_journal(conn):
        return []
    with conn.cursor() as cur:
        cur.execute(_OF_KEY, (consumer, subconsumer, limit))
        return [_entry(r) for r in cur.fetchall()]


def run_entries(conn: Connection, consumer: str, subconsumer: str, dag_id: str, run_id: str, task_id: str,
                map_index: int) -> list[JournalEntry]:
    """Every entry of the key that one Airflow task instance (all its tries) wrote,
    oldest first; [] without a journal. Leaves the transaction open."""
    if not has_journal(conn):
        return []
    with conn.cursor() as cur:
        cur.execute(_OF_RUN, (consumer, subconsumer, dag_id, run_id, task_id, map_index))
        return [_entry(r) for r in cur.fetchall()]


@dataclass
class Totals:
    """What a set of journal entries moved."""

    events: int = 0
    batches: int = 0
    filtered: int = 0
    dead_lettered: int = 0
    first_tick: int | None = None
    last_tick: int | None = None

    def add(self, entry: JournalEntry) -> None:
        if self.batches == 0:  # the first entry's, even where it has none (as the SQL totals)
            self.first_tick = entry.prev_tick_id
        self.events += entry.events
        self.batches += 1
        self.filtered += entry.filtered
        self.dead_lettered += entry.dead_lettered
        self.last_tick = entry.cur_tick_id


@dataclass
class RunSummary:
    """A run's totals over all its attempts, and what each attempt (try) moved."""

    total: Totals = field(default_factory=Totals)
    by_try: dict[int, Totals] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: list[JournalEntry]) -> RunSummary:
        out = cls()
        for entry in entries:  # oldest first: first_tick/last_tick follow the order
            out.total.add(entry)
            out.by_try.setdefault(entry.who.try_number or 0, Totals()).add(entry)
        return out

    def attempts(self) -> list[dict[str, Any]]:
        return [{"try_number": n, **asdict(t)} for n, t in sorted(self.by_try.items())]


#: (consumer, subconsumer, dag_id, task_id, map_index, run_id): one Airflow task
#: instance's entries of one key.
RunKey = tuple[str, str, str, str, int, str]

_RUN_TOTALS = (
    "select w.c, w.s, w.d, w.t, w.m, w.r, pg_catalog.sum(j.events)::bigint, pg_catalog.count(*),"
    " pg_catalog.sum(j.filtered)::bigint, pg_catalog.sum(j.dead_lettered)::bigint,"
    " (pg_catalog.array_agg(j.prev_tick_id order by j.applied_at, j.journal_id))[1],"
    " pg_catalog.max(j.cur_tick_id)"
    " from rows from (pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[]),"
    "                 pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::integer[]), pg_catalog.unnest(%s::text[]))"
    " as w(c, s, d, t, m, r)"
    " join pgq_ext.move_journal j on j.dag_id = w.d and j.run_id = w.r and j.task_id = w.t and j.map_index = w.m"
    " and j.consumer_id = w.c and j.subconsumer_id = w.s"
    " group by 1, 2, 3, 4, 5, 6"
)


def run_totals(conn: Connection, runs: list[RunKey]) -> dict[RunKey, Totals]:
    """What each of these task instances moved over all its tries, in one statement (the
    PgQ page: runs whose XCom a killed try never wrote). A run without entries is absent;
    {} without a journal. Leaves the transaction open."""
    if not runs or not has_journal(conn):
        return {}
    columns = [list(c) for c in zip(*runs, strict=True)]
    with conn.cursor() as cur:
        cur.execute(_RUN_TOTALS, tuple(columns))
        rows = cur.fetchall()
    return {
        (c, s, d, t, int(m), r): Totals(int(events), int(batches), int(filtered), int(dead),
                                        None if first is None else int(first), int(last))
        for c, s, d, t, m, r, events, batches, filtered, dead, first, last in rows
    }
