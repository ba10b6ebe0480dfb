"""core.transfer against a real PostgreSQL with PgQ: both write paths carry every
event exactly, in order, and a source that breaks off mid-stream never leaves a
partial batch behind.

Comparisons are event by event in ev_id order: (type, data, extra1..4, time), so a
NULL turned into '', an escaped tab, a re-encoded character, a time off by one
microsecond or two events swapped fails the test.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import faults, kept_ids, pgq, transfer
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import InvalidEvents
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoveReport, MoverOptions, QueueMover
from tests.helpers import Server, produce, register, tick
from tests.support.cluster import ThrowawayCluster, wait_until

UTC = dt.timezone.utc
COLUMNS = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"

#: Text that trips up COPY text format, array literals, SQL quoting or encodings.
NASTY: list[str | None] = [
    None,
    "",
    "tab\there",
    "new\nline",
    "cr\rand crlf\r\n",
    "back\\slash \\\\ \\N \\t",
    "quote ' single '' doubled",
    'quote " double ""',
    "{curly,braces}",
    "comma, (paren) [bracket]",
    "NULL",
    "\\N",
    "é✓ 日本語 Ωμέγα 🚀",
    " leading and trailing spaces ",
    "$$dollar$$ %s %(x)s",
]


def nasty_events() -> list[tuple[Any, ...]]:
    """Every text field takes every NASTY value (shifted per field), plus a 1 MB event;
    times with odd microseconds far apart, none of them now()."""
    base = dt.datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
    events: list[tuple[Any, ...]] = []
    n = len(NASTY)
    for i in range(3 * n):
        fields = tuple(NASTY[(i + shift) % n] for shift in range(6))
        when = base + dt.timedelta(days=397 * i, microseconds=7919 * i + 1)
        events.append((*fields, when))
    megabyte = ("\t\\\n'\"é✓🚀" + secrets.token_hex(8)) * 42_000  # 1.05 M characters
    events.append(("big", megabyte, "é", None, "\\", "\n", dt.datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=UTC)))
    events.append((None, None, None, None, None, None, dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)))
    return events


def ordered_events(server: Server, queue: str, with_ids: bool = False) -> list[tuple[Any, ...]]:
    """The queue's events in ev_id order, as (type, data, extra1..4, time[, id])."""
    rows = server.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))
    schema, name = rows[0][0].split(".")
    cols = sql.SQL(COLUMNS + (", ev_id" if with_ids else ""))
    return server.execute(
        sql.SQL("select {} from {} order by ev_id").format(cols, sql.Identifier(schema, name))
    )


@dataclass
class Role:
    name: str
    password: str

    def dsn(self, cluster: ThrowawayCluster, server: Server) -> str:
        return cluster.dsn(server.dbname, user=self.name, password=self.password)


@pytest.fixture
def make_role(cluster: ThrowawayCluster) -> Iterator[Callable[[str], Role]]:
    """make_role(member_of) -> a login role with a password, in the given PgQ role only."""
    made: list[str] = []

    def make(member_of: str) -> Role:
        role = Role(f"pgq_t_{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12))
        cluster.execute(
            "postgres",
            sql.SQL("create role {} login password %s in role {}").format(
                sql.Identifier(role.name), sql.Identifier(member_of)
            ),
            (role.password,),
        )
        made.append(role.name)
        return role

    yield make
    for name in made:
        # Its sessions (and their temporary tables) end asynchronously after close().
        wait_until(lambda name=name: not cluster.execute(
            "postgres", "select 1 from pg_stat_activity where usename = %s", (name,)
        ), timeout=10)
        cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


def move(source: Server, target_dsn: str, fault: faults.FaultHook | None = None, **kw: Any) -> MoveReport:
    """One drain of src_q -> dst_q with the target reached through target_dsn."""
    s = source.connect()
    t = connect(target_dsn, application_name="pgq-tests")
    try:
        options = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer="mover", **kw)
        return QueueMover(s, t, options, fault=fault).drain()
    finally:
        s.close()
        t.close()


def open_batch(conn: Connection, queue: str, consumer: str) -> str:
    """Takes the consumer's next batch (committed) and returns its batch SQL."""
    batch = pgq.next_batch_info(conn, queue, consumer)
    conn.commit()
    assert batch is not None
    return pgq.batch_event_sql(conn, batch.batch_id)


def backend_gone(cluster: ThrowawayCluster, pid: int) -> bool:
    return not cluster.execute("postgres", "select 1 from pg_stat_activity where pid = %s", (pid,))


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgq-copy-out"]


# -- both paths carry every event exactly -------------------------------------------


def test_copy_path_moves_every_event_exactly_in_order(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    events = nasty_events()
    produce(source, "src_q", events)
    tick(source, "src_q")
    report = move(source, target.dsn)
    assert report.write_path == COPY_PATH
    assert report.events == len(events)
    moved = ordered_events(target, "dst_q")
    assert moved == ordered_events(source, "src_q")
    assert [tuple(r) for r in moved] == [tuple(e) for e in events]
    assert len(moved[-2][1]) >= 1_000_000


def revoke_temporary(server: Server) -> None:
    """Roles without TEMPORARY take the source-arrays variant of the chunk path."""
    server.execute(sql.SQL("revoke temporary on database {} from public").format(sql.Identifier(server.dbname)))


@pytest.mark.parametrize("temporary", [True, False], ids=["staged", "source-arrays"])
def test_mover_role_takes_the_chunk_path_exactly_in_order(
    cluster: ThrowawayCluster,
    source: Server,
    target: Server,
    make_role: Callable[[str], Role],
    temporary: bool,
) -> None:
    writer = make_role("pgq_mover")
    if not temporary:
        # No TEMPORARY: the source renders the chunks as text. Odd time zones (and date
        # styles, which psycopg2 resets to ISO) on both sides: times must not shift.
        revoke_temporary(target)
        target.execute(sql.SQL("alter database {} set datestyle = 'SQL, DMY'").format(
            sql.Identifier(target.dbname)))
        target.execute(sql.SQL("alter database {} set timezone = 'Asia/Kathmandu'").format(
            sql.Identifier(target.dbname)))
        source.execute(sql.SQL("alter database {} set datestyle = 'German, MDY'").format(
            sql.Identifier(source.dbname)))
        source.execute(sql.SQL("alter database {} set timezone = 'America/St_Johns'").format(
            sql.Identifier(source.dbname)))
    register(source, "src_q", "mover")
    events = nasty_events()
    produce(source, "src_q", events)
    tick(source, "src_q")
    # chunk_size 7 cuts the batch into several chunks: their order must hold too.
    report = move(source, writer.dsn(cluster, target), chunk_size=7)
    assert report.write_path == CHUNK_PATH
    assert report.events == len(events)
    moved = ordered_events(target, "dst_q")
    assert moved == ordered_events(source, "src_q")
    assert [tuple(r) for r in moved] == [tuple(e) for e in events]


def test_role_that_may_write_event_tables_takes_copy(
    cluster: ThrowawayCluster, source: Server, target: Server, make_role: Callable[[str], Role]
) -> None:
    admin = make_role("pgq_admin")
    target.execute(sql.SQL("grant pgq_mover to {}").format(sql.Identifier(admin.name)))  # marks
    register(source, "src_q", "mover")
    events = nasty_events()[:20]
    produce(source, "src_q", events)
    tick(source, "src_q")
    report = move(source, admin.dsn(cluster, target))
    assert report.write_path == COPY_PATH
    assert ordered_events(target, "dst_q") == ordered_events(source, "src_q")


@pytest.mark.parametrize("temporary", [True, False], ids=["staged", "source-arrays"])
def test_chunk_path_keeps_event_ids_when_asked(
    cluster: ThrowawayCluster,
    source: Server,
    target: Server,
    make_role: Callable[[str], Role],
    temporary: bool,
) -> None:
    writer = make_role("pgq_mover")
    if not temporary:
        revoke_temporary(target)
    register(source, "src_q", "mover")
    produce(source, "src_q", nasty_events()[:30])
    tick(source, "src_q")
    s = source.connect()
    t = connect(writer.dsn(cluster, target))
    try:
        batch_sql = open_batch(s, "src_q", "mover")
        kept_ids.claim(t, "mover", "", "dst_q", "consumer 'mover'")  # explicit ids need the claim
        written = transfer.insert_chunks(s, t, batch_sql, "dst_q", keep_event_id=True, chunk_size=4)
        t.commit()
    finally:
        s.close()
        t.close()
    assert written == 30
    assert ordered_events(target, "dst_q", with_ids=True) == ordered_events(source, "src_q", with_ids=True)


def test_staging_leftovers_are_never_written_twice(
    cluster: ThrowawayCluster, source: Server, target: Server, make_role: Callable[[str], Role]
) -> None:
    """Two calls in one target transaction: each writes its own batch once, and the
    transaction's planner settings are as the caller left them."""
    writer = make_role("pgq_mover")
    register(source, "src_q", "mover")
    produce(source, "src_q", nasty_events()[:10])
    tick(source, "src_q")
    s = source.connect()
    t = connect(writer.dsn(cluster, target))
    try:
        batch_sql = open_batch(s, "src_q", "mover")
        with t.cursor() as cur:
            cur.execute("set enable_bitmapscan = off")  # the caller's own planner setting
        first = transfer.insert_chunks(s, t, batch_sql, "dst_q", chunk_size=3)
        second = transfer.insert_chunks(s, t, batch_sql, "dst_q", chunk_size=3)
        with t.cursor() as cur:
            # The planner settings steered for the chunk queries are the caller's again.
            cur.execute("select current_setting('enable_sort'), current_setting('enable_bitmapscan')")
            assert cur.fetchone() == ("on", "off")
        t.commit()
        # The staging table empties itself at commit.
        with t.cursor() as cur:
            cur.execute(sql.SQL("select count(*) from {}").format(
                sql.Identifier("pg_temp", transfer.STAGING_TABLE)))
            assert cur.fetchone() == (0,)
        t.rollback()
    finally:
        s.close()
        t.close()
    assert (first, second) == (10, 10)
    assert len(ordered_events(target, "dst_q")) == 20


@pytest.mark.parametrize("temporary", [True, False], ids=["staged", "source-arrays"])
def test_empty_batch_writes_nothing(
    cluster: ThrowawayCluster,
    source: Server,
    target: Server,
    make_role: Callable[[str], Role],
    temporary: bool,
) -> None:
    writer = make_role("pgq_mover")
    if not temporary:
        revoke_temporary(target)
    register(source, "src_q", "mover")
    tick(source, "src_q")
    s = source.connect()
    t = connect(writer.dsn(cluster, target))
    a = target.connect()
    try:
        batch_sql = open_batch(s, "src_q", "mover")
        assert transfer.insert_chunks(s, t, batch_sql, "dst_q") == 0
        table = pgq.current_event_table(a, "dst_q")
        assert transfer.copy_stream(s, a, batch_sql, table) == 0
        t.commit()
        a.commit()
    finally:
        s.close()
        t.close()
        a.close()
    assert ordered_events(target, "dst_q") == []


# -- databases in different encodings ------------------------------------------------

LATIN1_TEXT: list[tuple[Any, ...]] = [
    ("café", "naïve été £ ÿ ß", "Ærø", None, "", "tab\there", dt.datetime(2020, 2, 29, 12, 0, 0, 1, tzinfo=UTC)),
    ("plain", "ascii only", None, None, None, None, dt.datetime(2020, 3, 1, tzinfo=UTC)),
]


@pytest.fixture
def make_latin1_db(make_db: Callable[..., Server]) -> Callable[..., Server]:
    """make_latin1_db(queue, ext=False) -> a LATIN1 database with pgq and the queue."""
    return lambda queue, ext=False: make_db(queue, ext=ext, encoding="LATIN1")


@pytest.mark.parametrize("writer", [False, True], ids=["copy", "staged"])
def test_latin1_source_into_utf8_target_keeps_every_character(
    cluster: ThrowawayCluster,
    target: Server,
    make_latin1_db: Callable[..., Server],
    make_role: Callable[[str], Role],
    writer: bool,
) -> None:
    """Binary COPY sends text in the session's encoding: without realigning the two
    sessions the target refuses the LATIN1 bytes (or, the other way round, stores them
    mangled)."""
    source = make_latin1_db("src_q")
    register(source, "src_q", "mover")
    produce(source, "src_q", LATIN1_TEXT)
    tick(source, "src_q")
    dsn = make_role("pgq_mover").dsn(cluster, target) if writer else target.dsn
    report = move(source, dsn)
    assert report.write_path == (CHUNK_PATH if writer else COPY_PATH)
    assert ordered_events(target, "dst_q") == ordered_events(source, "src_q")
    assert [tuple(r) for r in ordered_events(target, "dst_q")] == LATIN1_TEXT


def test_utf8_source_into_latin1_target_converts_or_refuses(
    source: Server, make_latin1_db: Callable[..., Server]
) -> None:
    """What LATIN1 can hold arrives as the same characters; a batch with a character it
    cannot hold fails whole (on the source's side), never stored as other characters."""
    target = make_latin1_db("dst_q", ext=True)
    register(source, "src_q", "mover")
    produce(source, "src_q", LATIN1_TEXT)
    first = tick(source, "src_q")
    produce(source, "src_q", [("check", "✓ is not LATIN1", None, None, None, None)])
    tick(source, "src_q")
    with pytest.raises(InvalidEvents, match=r"cannot convert into target .* \(LATIN1\) 1 event\(s\) of batch") as info:
        move(source, target.dsn)
    assert isinstance(info.value.__cause__, psycopg2.errors.UntranslatableCharacter)
    assert info.value.side == "source"  # the UTF8 source's server cannot convert it for the client
    assert [tuple(r) for r in ordered_events(target, "dst_q")] == LATIN1_TEXT
    assert target.execute("select pgq_ext.get_last_tick('mover', '')") == [(first,)]


# -- failures mid-stream ---------------------------------------------------------------

BIG_EVENTS = 40  # 40 x 1 MB: far more than the pipe and socket buffers hold


def produce_big(server: Server, queue: str, count: int = BIG_EVENTS) -> None:
    """count events of 1 MB each, generated server-side (fast, compresses on disk)."""
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            table = pgq.current_event_table(conn, queue)
            schema, name = table.split(".")
            cur.execute(
                sql.SQL(
                    "insert into {} (ev_type, ev_data, ev_time)"
                    " select 'big', repeat(md5(i::text), 32768), now() from generate_series(1, %s) i"
                ).format(sql.Identifier(schema, name)),
                (count,),
            )
        conn.commit()
    finally:
        conn.close()


def test_source_terminated_mid_stream_raises_and_leaves_nothing(
    cluster: ThrowawayCluster, source: Server, target: Server
) -> None:
    register(source, "src_q", "mover")
    produce_big(source, "src_q")
    tick(source, "src_q")
    s = source.connect()
    t = target.connect()
    pid = s.get_backend_pid()
    terminated: list[bool] = []

    def kill_source() -> None:
        # Called once the target has begun receiving rows: the source is mid-stream.
        cluster.execute("postgres", "select pg_terminate_backend(%s)", (pid,))
        terminated.append(wait_until(lambda: backend_gone(cluster, pid), timeout=10))

    try:
        batch_sql = open_batch(s, "src_q", "mover")
        table = pgq.current_event_table(t, "dst_q")
        with pytest.raises(psycopg2.DatabaseError):  # psycopg2 reports a dead COPY vaguely
            transfer.copy_stream(s, t, batch_sql, table, mid_stream=kill_source)
        assert terminated == [True]
        # The target took some of the rows in its open transaction, but not all:
        # exactly what must never be committed.
        with t.cursor() as cur:
            cur.execute(sql.SQL("select count(*) from {}").format(transfer.split_table_name(table)))
            row = cur.fetchone()
        assert row is not None and 0 < row[0] < BIG_EVENTS
        t.rollback()
    finally:
        s.close()
        t.close()
    assert not copy_threads()
    assert ordered_events(target, "dst_q") == []


def test_source_error_mid_stream_raises(source: Server, target: Server) -> None:
    """A batch query that fails after thousands of rows: the target saw a clean end
    of data, so only copy_stream's own check stands between it and a commit."""
    failing = (
        "select g as ev_id, 'x'::text as ev_type,"
        " case when g < 3000 then repeat('d', 1000) else (1 / (g - g))::text end as ev_data,"
        " null::text as ev_extra1, null::text as ev_extra2, null::text as ev_extra3,"
        " null::text as ev_extra4, now() as ev_time from generate_series(1, 6000) g"
    )
    s = source.connect()
    t = target.connect()
    try:
        table = pgq.current_event_table(t, "dst_q")
        with pytest.raises(psycopg2.errors.DivisionByZero):
            transfer.copy_stream(s, t, failing, table)
        with t.cursor() as cur:
            cur.execute(sql.SQL("select count(*) from {}").format(transfer.split_table_name(table)))
            row = cur.fetchone()
        assert row is not None and 0 < row[0] < 6000
        t.rollback()
    finally:
        s.close()
        t.close()
    assert ordered_events(target, "dst_q") == []


def test_target_failure_mid_stream_raises_and_source_stays_usable(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce_big(source, "src_q")
    tick(source, "src_q")
    target.execute(
        "create table sink (ev_type text, ev_data text, ev_extra1 text, ev_extra2 text,"
        " ev_extra3 text, ev_extra4 text, ev_time timestamptz,"
        " check (ev_data <> repeat(md5('5'), 32768)))"
    )
    s = source.connect()
    t = target.connect()
    try:
        batch_sql = open_batch(s, "src_q", "mover")
        with pytest.raises(psycopg2.errors.CheckViolation):
            transfer.copy_stream(s, t, batch_sql, "public.sink")
        t.rollback()
        s.rollback()
        # The abandoned COPY OUT is drained by the rollback: the source takes queries.
        with s.cursor() as cur:
            cur.execute("select 41 + 1")
            assert cur.fetchone() == (42,)
    finally:
        s.close()
        t.close()
    assert not copy_threads()
    assert target.execute("select count(*) from sink") == [(0,)]


def test_mover_killed_source_mid_stream_then_retry_moves_batch_once(
    cluster: ThrowawayCluster, source: Server, target: Server
) -> None:
    register(source, "src_q", "mover")
    produce_big(source, "src_q")
    produce(source, "src_q", nasty_events()[:15])
    tick(source, "src_q")

    def kill_own_source(point: str) -> None:
        if point == faults.MID_STREAM:
            rows = cluster.execute(
                "postgres",
                "select pid from pg_stat_activity where datname = %s and query ilike '%%copy (%%'",
                (source.dbname,),
            )
            assert len(rows) == 1
            cluster.execute("postgres", "select pg_terminate_backend(%s)", (rows[0][0],))
            assert wait_until(lambda: backend_gone(cluster, rows[0][0]), timeout=10)

    with pytest.raises(psycopg2.DatabaseError):  # psycopg2 reports a dead COPY vaguely
        move(source, target.dsn, fault=kill_own_source)
    assert ordered_events(target, "dst_q") == []
    assert target.execute("select pgq_ext.get_last_tick('mover', '')") == [(None,)]
    report = move(source, target.dsn)
    assert report.events == BIG_EVENTS + 15
    assert ordered_events(target, "dst_q") == ordered_events(source, "src_q")
