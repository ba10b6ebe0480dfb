"""The move journal (pgq_ext.move_journal): a row per applied batch, written with its
mark in the batch's target transaction, so that a batch's row exists exactly when its
mark moved. Checked by killing the mover between the protocol's steps and comparing
journal, marks and events event by event; plus its retention and its upgrade."""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections import Counter
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from airflow_provider_pgq.core import faults, journal, pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import PgqExtMissing
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.core.test_mover import APPLIED_POINTS, three_pending_batches
from tests.helpers import (
    Event,
    Server,
    mark_of,
    pretend_mover_schema,
    queue_events,
    spawn_mover,
    wait_mover,
)

JOURNAL = (
    "select batch_id, prev_tick_id, cur_tick_id, events, filtered, dead_lettered, login_role, pid, host, job"
    " from pgq_ext.move_journal where consumer_id = %s and subconsumer_id = %s order by journal_id"
)


def journal_rows(target: Server, consumer: str = "mover", subconsumer: str = "") -> list[dict[str, Any]]:
    names = ("batch_id", "prev_tick", "cur_tick", "events", "filtered", "dead_lettered", "role", "pid", "host", "job")
    return [dict(zip(names, r, strict=True)) for r in target.execute(JOURNAL, (consumer, subconsumer))]


def source_events_between(source: Server, prev_tick: int, cur_tick: int) -> Counter[Event]:
    """The source events of the tick range (prev_tick, cur_tick]: those whose txid the end
    tick's snapshot sees and the start tick's does not (PgQ's own rule for a batch)."""
    schema, name = source.execute("select queue_data_pfx from pgq.queue where queue_name = 'src_q'")[0][0].split(".")
    rows = source.execute(
        sql.SQL(
            "select e.ev_type, e.ev_data, e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4, e.ev_time"
            " from {} e, pgq.queue q, pgq.tick p, pgq.tick c"
            " where q.queue_name = 'src_q' and p.tick_queue = q.queue_id and c.tick_queue = q.queue_id"
            " and p.tick_id = %s and c.tick_id = %s"
            " and pg_catalog.txid_visible_in_snapshot(e.ev_txid, c.tick_snapshot)"
            " and not pg_catalog.txid_visible_in_snapshot(e.ev_txid, p.tick_snapshot)"
        ).format(sql.Identifier(schema, name)),
        (prev_tick, cur_tick),
    )
    return Counter(tuple(r) for r in rows)


def assert_journal_matches(source: Server, target: Server) -> list[dict[str, Any]]:
    """The journal is a chain of tick ranges ending at the mark; each row's events are
    exactly its range's source events, and together they are the target's events."""
    rows = journal_rows(target)
    assert rows, "no journal row"
    mark = mark_of(target, "mover")
    assert rows[-1]["cur_tick"] == mark
    for before, after in zip(rows, rows[1:], strict=False):
        assert after["prev_tick"] == before["cur_tick"], rows
    assert len({r["batch_id"] for r in rows}) == len(rows)
    moved: Counter[Event] = Counter()
    for r in rows:
        events = source_events_between(source, r["prev_tick"], r["cur_tick"])
        assert sum(events.values()) == r["events"], r
        moved += events
    assert moved == queue_events(target, "dst_q")
    return rows


@pytest.mark.parametrize("point", faults.POINTS)
def test_killed_mover_journals_exactly_the_batches_whose_mark_moved(
    source: Server, target: Server, point: str
) -> None:
    """A mover process dies (os._exit) at each step of its second batch: the journal has
    a row for each batch the target marked, none for the others; the retry (another
    process) adds the rest. Journal, marks and events agree event by event, and each row
    names the process that applied it."""
    ticks, _ = three_pending_batches(source)
    first = spawn_mover(source, target, fault=f"{point}:2")
    rc, _, err = wait_mover(first)
    assert rc == faults.FAULT_EXIT_CODE, err
    rows = assert_journal_matches(source, target)
    applied = 2 if point in APPLIED_POINTS else 1
    assert [r["cur_tick"] for r in rows] == ticks[:applied]
    assert [r["events"] for r in rows] == [100, 3000][:applied]
    assert {r["pid"] for r in rows} == {first.pid}
    second = spawn_mover(source, target)
    rc, report, err = wait_mover(second)
    assert rc == 0 and report is not None, err
    rows = assert_journal_matches(source, target)
    assert [r["cur_tick"] for r in rows] == ticks
    assert [r["pid"] for r in rows] == [first.pid] * applied + [second.pid] * (3 - applied)
    # the retry's own report counts only what it applied; the journal holds the whole move
    assert report["events"] == sum(r["events"] for r in rows[applied:])
    assert sum(r["events"] for r in rows) == 3200
    assert {r["role"] for r in rows} == {target.cluster.superuser}
    assert {r["host"] for r in rows} == {socket.gethostname()}
    assert all(r["filtered"] == 0 and r["dead_lettered"] == 0 and r["job"] is None for r in rows)


def test_journal_records_who_and_filtered_and_reads_back(source: Server, target: Server) -> None:
    """who as the caller gives it (the CLI's job), the table_filter count, and the
    read functions the operator and --status use."""
    ticks, _ = three_pending_batches(source)
    who = journal.Who(dag_id="d", run_id="r1", task_id="t", map_index=3, try_number=2, job=None)
    opts = MoverOptions("src_q", "dst_q", "mover", table_filter=("nothing_matches",), who=who)
    s, t = connect(source.dsn), connect(target.dsn)
    try:
        report = QueueMover(s, t, opts).drain()
        assert report.events == 0 and report.filtered == 3200
        last = journal.last_entries(t, "mover", "", limit=2)
        run = journal.run_entries(t, "mover", "", "d", "r1", "t", 3)
        other_run = journal.run_entries(t, "mover", "", "d", "r1", "t", 4)
        t.rollback()
    finally:
        s.close()
        t.close()
    assert [e.cur_tick_id for e in last] == [ticks[2], ticks[1]]  # newest first
    assert [e.cur_tick_id for e in run] == ticks and other_run == []
    assert [e.filtered for e in run] == [100, 3000, 100] and all(e.events == 0 for e in run)
    e = run[0]
    assert (e.who.dag_id, e.who.run_id, e.who.task_id, e.who.map_index, e.who.try_number) == ("d", "r1", "t", 3, 2)
    assert e.who.pid == os.getpid() and e.who.host == socket.gethostname()
    summary = journal.RunSummary.of(run)
    assert summary.total.batches == 3 and summary.total.filtered == 3200
    assert summary.total.first_tick == run[0].prev_tick_id and summary.total.last_tick == ticks[2]
    assert summary.attempts() == [{"try_number": 2, "events": 0, "batches": 3, "filtered": 3200,
                                   "dead_lettered": 0, "first_tick": run[0].prev_tick_id, "last_tick": ticks[2]}]


def mark_batch(conn: Any, consumer: str, batch_id: int) -> int:
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.mark_batch(%s, '', %s, %s, %s, 1, 0, 0, '{}'::jsonb)",
                    (consumer, batch_id, batch_id, batch_id + 1))
        row = cur.fetchone()
    conn.commit()
    return int(row[0])


def test_retention_prunes_by_age_and_by_rows(target: Server) -> None:
    """keep_for: older entries of the key go with its next batch (a range of its index);
    keep_rows: once in 32 of the key's rows (keep_rows / 100 for a larger keep_rows) the key
    is cut to its newest keep_rows. Other keys keep theirs."""
    conn = psycopg2.connect(target.dsn)
    try:
        for i in range(3):
            mark_batch(conn, "other", i)
        target.execute("select pgq_ext.set_journal_retention('1 day', 10)")
        target.execute("update pgq_ext.move_journal set applied_at = applied_at - interval '2 days'")
        for i in range(5):
            mark_batch(conn, "k", i)
        target.execute("update pgq_ext.move_journal set applied_at = applied_at - interval '2 days'"
                       " where consumer_id = 'k' and batch_id < 2")
        mark_batch(conn, "k", 5)
        assert [r[0] for r in target.execute(
            "select batch_id from pgq_ext.move_journal where consumer_id = 'k' order by 1")] == [2, 3, 4, 5]
        for i in range(6, 80):
            mark_batch(conn, "k", i)
    finally:
        conn.close()
    kept = [r[0] for r in target.execute(
        "select batch_id from pgq_ext.move_journal where consumer_id = 'k' order by 1")]
    assert 10 <= len(kept) <= 10 + 31 and kept[-1] == 79 and kept == list(range(80 - len(kept), 80))
    # the other key had no batch since: its (old) rows stay until its next one
    assert target.execute("select count(*) from pgq_ext.move_journal where consumer_id = 'other'")[0][0] == 3
    assert mark_of(target, "k") == 80


def test_retention_by_rows_cuts_every_key_whatever_their_batches_interleave(target: Server) -> None:
    """The cut counts each key's own rows: by the journal's shared ids, two keys taking turns
    got only even or only odd ids, and the odd one was never cut (period 32)."""
    conn = psycopg2.connect(target.dsn)
    try:
        target.execute("select pgq_ext.set_journal_retention(null, 10)")
        for i in range(80):
            for key in ("a", "b"):
                mark_batch(conn, key, i)
    finally:
        conn.close()
    for key in ("a", "b"):
        kept = target.execute("select count(*) from pgq_ext.move_journal where consumer_id = %s", (key,))[0][0]
        assert 10 <= kept < 10 + 32, f"key {key} holds {kept} entries, keep_rows 10"


def test_retention_setting_is_for_admins_only(target: Server, cluster: Any) -> None:
    from tests.helpers import create_login

    member = create_login(cluster, "jr", in_role="pgq_mover")
    conn = member.raw(target)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            with conn.cursor() as cur:
                cur.execute("select pgq_ext.set_journal_retention(null, null)")
        conn.rollback()
    finally:
        conn.close()
    assert target.execute("select keep_for, keep_rows from pgq_ext.move_journal_retention") == [
        (dt.timedelta(days=30), 100000)]
    assert target.execute("select pgq_ext.set_journal_retention(null, 5)")[0][0] == "keep_for 30 days, keep_rows 100000"


def test_upgrade_from_mover_schema_5_keeps_marks_and_adds_the_journal(source: Server, target: Server) -> None:
    """An install of mover schema 5 (no journal): the mover refuses it as too old; install
    keeps the marks, adds the journal (readable by PUBLIC, written by pgq_mover only)."""
    ticks, _ = three_pending_batches(source)
    s, t = connect(source.dsn), connect(target.dsn)
    try:
        QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover")).drain()
    finally:
        s.close()
        t.close()
    target.execute("drop function pgq_ext.mark_batch(text, text, bigint, bigint, bigint, bigint, bigint, bigint,"
                   " jsonb)")
    target.execute("drop function pgq_ext.set_journal_retention(interval, integer)")
    target.execute("drop table pgq_ext.move_journal, pgq_ext.move_journal_retention")
    pretend_mover_schema(target, 5)
    marks = target.execute("select * from pgq_ext.completed_tick order by 1, 2")
    conn = psycopg2.connect(target.dsn)
    try:
        with pytest.raises(PgqExtMissing, match=f"schema 5 < {pgq_ext.REQUIRED_MOVER_SCHEMA}"):
            pgq_ext.require(conn)
        conn.rollback()
        assert journal.last_entries(conn, "mover", "") == []  # no journal yet: nothing, no error
        conn.rollback()
        pgq_ext.install(conn)
    finally:
        conn.close()
    assert target.execute("select * from pgq_ext.completed_tick order by 1, 2") == marks
    assert mark_of(target, "mover") == ticks[2]
    assert target.execute("select pgq_ext.mover_schema_version()")[0][0] == pgq_ext.REQUIRED_MOVER_SCHEMA
    assert target.execute(
        "select has_table_privilege('public', 'pgq_ext.move_journal', 'SELECT'),"
        " has_table_privilege('public', 'pgq_ext.move_journal', 'INSERT'),"
        " has_function_privilege('public', 'pgq_ext.mark_batch(text, text, bigint, bigint, bigint, bigint, bigint,"
        " bigint, jsonb)', 'EXECUTE'),"
        " has_function_privilege('pgq_mover', 'pgq_ext.mark_batch(text, text, bigint, bigint, bigint, bigint,"
        " bigint, bigint, jsonb)', 'EXECUTE'),"
        " has_function_privilege('public', 'pgq_ext.set_journal_retention(interval, integer)', 'EXECUTE')"
    ) == [(True, False, False, True, False)]
