"""Classic compatibility as found in the field (issue 11), core side: pgq_ext installed
over the oldest classic layout (skytools 2: no subconsumer_id) and the 3.0 layout (no
default), marks kept; the classic API's semantics in 2- and 3-key forms, on an empty
database and on the upgraded old layout; table_filter and keep_lag in the mover,
exactly once across a crash."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_pgq.core import faults, pgq, pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.core import test_privileges
from tests.core.test_pgq_ext import CLASSIC_LAYOUT
from tests.core.test_privileges import LoginMaker
from tests.helpers import Server, mark_of, produce, queue_events, register, run_mover, tick

MakeDb = Callable[..., Server]
login_in = test_privileges.login_in  # the fixture: a login holding only pgq_mover


def one(server: Server, query: str, params: tuple[Any, ...] = ()) -> Any:
    return server.execute(query, params)[0][0]


# -- the oldest layout ------------------------------------------------------------------

#: skytools 2's pgq_ext, as its tables and its 2-argument functions looked (written for
#: this test from the documented layout): no subconsumer_id anywhere.
SKYTOOLS2_LAYOUT = [
    "create schema pgq_ext",
    "create table pgq_ext.completed_tick (consumer_id text not null, last_tick_id bigint not null,"
    " primary key (consumer_id))",
    "create table pgq_ext.completed_batch (consumer_id text not null, last_batch_id bigint not null,"
    " primary key (consumer_id))",
    "create table pgq_ext.completed_event (consumer_id text not null, batch_id bigint not null,"
    " event_id bigint not null, primary key (consumer_id, batch_id, event_id))",
    "create table pgq_ext.partial_batch (consumer_id text not null, cur_batch_id bigint not null,"
    " primary key (consumer_id))",
    "create function pgq_ext.get_last_tick(a_consumer text) returns bigint language sql as"
    " $$ select last_tick_id from pgq_ext.completed_tick where consumer_id = a_consumer $$",
    "create function pgq_ext.set_last_tick(a_consumer text, a_tick_id bigint) returns integer"
    " language sql as $$ update pgq_ext.completed_tick set last_tick_id = a_tick_id"
    " where consumer_id = a_consumer; select 1 $$",
    "create function pgq_ext.is_batch_done(a_consumer text, a_batch_id bigint) returns boolean"
    " language sql as $$ select coalesce((select last_batch_id = a_batch_id from pgq_ext.completed_batch"
    " where consumer_id = a_consumer), false) $$",
    "create function pgq_ext.set_batch_done(a_consumer text, a_batch_id bigint) returns boolean"
    " language sql as $$ select true $$",
    "create function pgq_ext.is_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)"
    " returns boolean language sql as $$ select exists (select 1 from pgq_ext.completed_event"
    " where consumer_id = a_consumer and batch_id = a_batch_id and event_id = a_event_id) $$",
    "create function pgq_ext.set_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)"
    " returns boolean language sql as $$ select true $$",
    "create function pgq_ext.version() returns text language sql as $$ select '2.1.8'::text $$",
]

#: skytools 3.0 before its upgrade_schema(): subconsumer_id, but without a default (the
#: classic tables alone, without the classic functions).
SKYTOOLS30_LAYOUT = CLASSIC_LAYOUT[:5]


def build_skytools2(db: Server, mover_tick: int | None = None) -> None:
    """The oldest layout with a mark in every table."""
    for statement in SKYTOOLS2_LAYOUT:
        db.execute(statement)
    db.execute("insert into pgq_ext.completed_tick values ('old_mover', 12)")
    if mover_tick is not None:
        db.execute("insert into pgq_ext.completed_tick values ('mover', %s)", (mover_tick,))
    db.execute("insert into pgq_ext.completed_batch values ('old_consumer', 77)")
    db.execute("insert into pgq_ext.completed_event values ('old_consumer', 78, 1), ('old_consumer', 78, 2)")
    db.execute("insert into pgq_ext.partial_batch values ('old_consumer', 78)")


def install(db: Server) -> pgq_ext.InstallReport:
    conn = db.connect()
    try:
        return pgq_ext.install(conn)
    finally:
        conn.close()


def primary_key(db: Server, table: str) -> list[str]:
    rows = db.execute(
        "select a.attname::text from pg_catalog.pg_constraint c"
        " join lateral unnest(c.conkey) with ordinality k(attnum, n) on true"
        " join pg_catalog.pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum"
        " where c.conrelid = pg_catalog.format('pgq_ext.%%I', %s::text)::regclass and c.contype = 'p'"
        " order by k.n",
        (table,),
    )
    return [r[0] for r in rows]


def column_default(db: Server, table: str) -> str | None:
    return one(
        db,
        "select pg_catalog.pg_get_expr(d.adbin, d.adrelid) from pg_catalog.pg_attribute a"
        " left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum"
        " where a.attrelid = pg_catalog.format('pgq_ext.%%I', %s::text)::regclass"
        " and a.attname = 'subconsumer_id'",
        (table,),
    )


def classic_api_behaves(db: Server, c: str) -> None:
    """The classic functions' semantics, both argument forms, under consumer name c."""

    def q(text: str) -> Any:
        return one(db, text.replace("C", c))

    # ticks: the short form is subconsumer ''; a NULL tick forgets the mark
    assert q("select pgq_ext.get_last_tick('C')") is None
    assert q("select pgq_ext.set_last_tick('C', 10)") == 1
    assert q("select pgq_ext.get_last_tick('C', '')") == 10
    assert q("select pgq_ext.set_last_tick('C', 'sub', 20)") == 1
    assert (q("select pgq_ext.get_last_tick('C')"), q("select pgq_ext.get_last_tick('C', 'sub')")) == (10, 20)
    assert q("select pgq_ext.set_last_tick('C', 11)") == 1
    assert q("select pgq_ext.get_last_tick('C')") == 11
    assert q("select pgq_ext.set_last_tick('C', null)") == 1
    assert q("select pgq_ext.get_last_tick('C')") is None
    assert q("select pgq_ext.get_last_tick('C', 'sub')") == 20
    assert q("select pgq_ext.set_last_tick('C', 'sub', null)") == 1
    assert q("select count(*) from pgq_ext.completed_tick where consumer_id = 'C'") == 0

    # batches: only the last one is kept; false when it was done already
    assert q("select pgq_ext.is_batch_done('C', 5)") is False
    assert q("select pgq_ext.set_batch_done('C', 5)") is True
    assert q("select pgq_ext.set_batch_done('C', 5)") is False
    assert q("select pgq_ext.is_batch_done('C', '', 5)") is True
    assert q("select pgq_ext.is_batch_done('C', 'sub', 5)") is False
    assert q("select pgq_ext.set_batch_done('C', 'sub', 6)") is True
    assert q("select pgq_ext.set_batch_done('C', 7)") is True
    assert (q("select pgq_ext.is_batch_done('C', 5)"), q("select pgq_ext.is_batch_done('C', 7)")) == (False, True)
    assert q("select pgq_ext.is_batch_done('C', 'sub', 6)") is True
    # a batch id of 0 or below: answered true, never recorded (the classic rule)
    assert q("select pgq_ext.set_batch_done('C', 0)") is True
    assert q("select pgq_ext.set_batch_done('C', 'sub', -1)") is True
    assert q("select pgq_ext.is_batch_done('C', 7)") is True
    assert q("select pgq_ext.is_batch_done('C', 'sub', 6)") is True

    # events: only the batch in progress is remembered
    assert q("select pgq_ext.set_event_done('C', 1, 100)") is True
    assert q("select pgq_ext.set_event_done('C', 1, 100)") is False
    assert q("select pgq_ext.set_event_done('C', '', 1, 101)") is True
    assert q("select pgq_ext.is_event_done('C', 1, 101)") is True
    assert q("select pgq_ext.is_event_done('C', 'sub', 1, 100)") is False
    assert q("select pgq_ext.set_event_done('C', 'sub', 1, 100)") is True
    assert q("select pgq_ext.set_event_done('C', 2, 100)") is True  # the next batch
    assert q("select pgq_ext.is_event_done('C', 1, 100)") is False
    assert q("select pgq_ext.is_event_done('C', 2, 100)") is True
    assert q("select pgq_ext.is_event_done('C', 'sub', 1, 100)") is True  # other key untouched
    # an event already done answers false and changes nothing, not even the batch
    assert q("select pgq_ext.set_event_done('C', 2, 100)") is False
    assert q("select cur_batch_id from pgq_ext.partial_batch where consumer_id = 'C' and subconsumer_id = ''") == 2


def test_classic_api_on_an_empty_database(make_db: MakeDb) -> None:
    db = make_db(ext=True)
    classic_api_behaves(db, "c")


def test_install_over_the_skytools2_layout_keeps_every_mark(source: Server, make_db: MakeDb) -> None:
    target = make_db(queue="dst_q")
    register(source, "src_q", "mover")
    start = one(source, "select last_tick from pgq.get_consumer_info('src_q', 'mover')")
    build_skytools2(target, mover_tick=start)

    report = install(target)
    assert report.taken_over  # the classic functions of our names were replaced

    # every row kept, now under subconsumer ''; keys and defaults as the classic upgrade left them
    assert target.execute("select consumer_id, subconsumer_id, last_tick_id from pgq_ext.completed_tick"
                          " order by 1") == [("mover", "", start), ("old_mover", "", 12)]
    assert target.execute("select * from pgq_ext.completed_batch") == [("old_consumer", 77, "")]
    assert sorted(target.execute("select consumer_id, subconsumer_id, batch_id, event_id"
                                 " from pgq_ext.completed_event")) == [
        ("old_consumer", "", 78, 1), ("old_consumer", "", 78, 2)]
    assert target.execute("select consumer_id, subconsumer_id, cur_batch_id from pgq_ext.partial_batch") == [
        ("old_consumer", "", 78)]
    for table in ("completed_tick", "completed_batch", "partial_batch"):
        assert primary_key(target, table) == ["consumer_id", "subconsumer_id"]
        assert column_default(target, table) == "''::text"
    assert primary_key(target, "completed_event") == ["consumer_id", "subconsumer_id", "batch_id", "event_id"]

    # the marks read back through both forms of the API
    assert one(target, "select pgq_ext.get_last_tick('old_mover')") == 12
    assert one(target, "select pgq_ext.get_last_tick('old_mover', '')") == 12
    assert one(target, "select pgq_ext.is_batch_done('old_consumer', 77)") is True
    assert one(target, "select pgq_ext.is_batch_done('old_consumer', '', 77)") is True
    assert one(target, "select pgq_ext.is_event_done('old_consumer', 78, 2)") is True
    assert one(target, "select pgq_ext.is_event_done('old_consumer', '', 78, 1)") is True
    # the old consumer's batch in progress continues: event 3 of batch 78 is new, 1 is not
    assert one(target, "select pgq_ext.set_event_done('old_consumer', 78, 3)") is True
    assert one(target, "select pgq_ext.set_event_done('old_consumer', 78, 1)") is False
    classic_api_behaves(target, "fresh")

    # a second install changes nothing
    before = {t: sorted(target.execute(f"select * from pgq_ext.{t}"), key=repr)  # noqa: S608
              for t in ("completed_tick", "completed_batch", "completed_event", "partial_batch")}
    assert install(target).created == []
    assert before == {t: sorted(target.execute(f"select * from pgq_ext.{t}"), key=repr)  # noqa: S608
                      for t in before}

    # a target once fed by the skytools 2 queue_mover: the mover continues from its mark
    produce(source, "src_q", [("t", f"d{i}", None, None, None, None) for i in range(30)])
    last = tick(source, "src_q")
    report_move = run_mover(source, target)
    assert (report_move.events, report_move.first_tick, report_move.last_tick) == (30, start, last)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last


def test_install_over_the_skytools30_layout_adds_the_default(make_db: MakeDb) -> None:
    target = make_db()
    for statement in SKYTOOLS30_LAYOUT:
        target.execute(statement)
    target.execute("insert into pgq_ext.completed_tick values ('m', '', 5), ('m', 'p2', 6)")
    target.execute("insert into pgq_ext.completed_batch values ('b', '', 9)")
    target.execute("insert into pgq_ext.completed_event values ('b', '', 10, 1)")
    target.execute("insert into pgq_ext.partial_batch values ('b', '', 10)")
    install(target)
    for table in ("completed_tick", "completed_batch", "completed_event", "partial_batch"):
        assert column_default(target, table) == "''::text"
    assert (one(target, "select pgq_ext.get_last_tick('m')"), one(target, "select pgq_ext.get_last_tick('m', 'p2')")) \
        == (5, 6)
    assert one(target, "select pgq_ext.is_event_done('b', 10, 1)") is True
    target.execute("insert into pgq_ext.completed_tick (consumer_id, last_tick_id) values ('n', 1)")
    assert one(target, "select pgq_ext.get_last_tick('n')") == 1
    classic_api_behaves(target, "fresh")


# -- table_filter -------------------------------------------------------------------------

TABLES3 = ("public.orders", "public.users", "public.audit")


def three_table_events(n: int, start: int = 0) -> list[tuple[Any, ...]]:
    base = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
    return [
        ("I:id", f"id={i}", TABLES3[i % 3], None, None, None, base + dt.timedelta(seconds=i))
        for i in range(start, start + n)
    ]


def events_of(server: Server, queue: str, tables: tuple[str, ...]) -> Counter[tuple[Any, ...]]:
    return Counter({e: c for e, c in queue_events(server, queue).items() if e[2] in tables})


def consumer_done(source: Server, consumer: str) -> pgq.ConsumerInfo:
    conn = source.connect()
    try:
        info = pgq.get_consumer_info(conn, "src_q", consumer)
        newest = pgq.newest_tick(conn, "src_q")
    finally:
        conn.close()
    assert info is not None and info.last_tick == newest and info.current_batch is None
    return info


def test_table_filter_moves_only_the_named_tables(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    for i in range(3):
        produce(source, "src_q", three_table_events(30, start=i * 30))
        tick(source, "src_q")
    # a name without schema means public.<name>, as skytools' fq_name made it
    report = run_mover(source, target, table_filter=("orders", "public.users"))
    assert (report.events, report.filtered) == (60, 30)
    moved = queue_events(target, "dst_q")
    assert moved == events_of(source, "src_q", ("public.orders", "public.users"))
    assert max(moved.values()) == 1
    consumer_done(source, "mover")  # the audit events are consumed, not left behind
    assert run_mover(source, target, table_filter=("orders", "users")).events == 0


@pytest.mark.parametrize("point", [faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT, faults.AFTER_TARGET_COMMIT,
                                   faults.BEFORE_SOURCE_COMMIT])
def test_table_filter_retry_after_a_crash_moves_once(source: Server, target: Server, point: str) -> None:
    register(source, "src_q", "mover")
    for i in range(2):
        produce(source, "src_q", three_table_events(30, start=i * 30))
        tick(source, "src_q")
    options = MoverOptions("src_q", "dst_q", "mover", table_filter=("public.orders", "public.users"))

    class Crash(RuntimeError):
        pass

    def crash(reached: str) -> None:
        if reached == point:
            raise Crash(point)

    s, t = source.connect(), target.connect()
    try:
        with pytest.raises(Crash):
            QueueMover(s, t, options, fault=crash).drain()
    finally:
        s.close()
        t.close()
    report = run_mover(source, target, table_filter=("public.orders", "public.users"))
    moved = queue_events(target, "dst_q")
    assert moved == events_of(source, "src_q", ("public.orders", "public.users"))
    assert sum(moved.values()) == 40 and max(moved.values()) == 1
    assert report.skipped == (1 if point in (faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT) else 0)
    consumer_done(source, "mover")


def test_table_filter_on_the_chunk_path(source: Server, target: Server, login_in: LoginMaker) -> None:
    """A mover role without pgq_admin writes through insert_event_chunk: same filter."""
    register(source, "src_q", "mover")
    produce(source, "src_q", three_table_events(45))
    tick(source, "src_q")
    writer = login_in(target, "pgq_mover")
    opts = MoverOptions("src_q", "dst_q", "mover", table_filter=("public.audit",))
    s, t = source.connect(), connect(writer.dsn(target))
    try:
        mover = QueueMover(s, t, opts)
        report = mover.drain()
        assert mover.write_path == "insert_event_chunk"
    finally:
        s.close()
        t.close()
    assert (report.events, report.filtered) == (15, 30)
    assert queue_events(target, "dst_q") == events_of(source, "src_q", ("public.audit",))


def test_table_filter_refuses_bad_names() -> None:
    with pytest.raises(InvalidParameter, match="table_filter"):
        MoverOptions("a", "b", "c", table_filter="public.orders")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter, match="table_filter"):
        MoverOptions("a", "b", "c", table_filter=("",))
    assert MoverOptions("a", "b", "c", table_filter=["x", "s.y", "x"]).table_filter == (  # type: ignore[arg-type]
        "public.x", "s.y")


# -- keep_lag ---------------------------------------------------------------------------


def test_keep_lag_leaves_young_batches_until_they_are_old_enough(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", [("t", f"old{i}", None, None, None, None) for i in range(10)])
    tick(source, "src_q")
    lag = dt.timedelta(seconds=3)
    first_done = time.monotonic()
    assert run_mover(source, target, keep_lag=lag).events == 0  # younger than the lag
    assert sum(queue_events(target, "dst_q").values()) == 0
    time.sleep(max(0.0, 3.2 - (time.monotonic() - first_done)))
    produce(source, "src_q", [("t", f"new{i}", None, None, None, None) for i in range(5)])
    tick(source, "src_q")
    report = run_mover(source, target, keep_lag=lag)
    assert report.events == 10  # the old batch only; the new one is younger than the lag
    assert run_mover(source, target, keep_lag=lag).events == 0
    time.sleep(3.2)
    assert run_mover(source, target, keep_lag=lag).events == 5
    moved = queue_events(target, "dst_q")
    assert moved == queue_events(source, "src_q") and max(moved.values()) == 1


def test_keep_lag_with_coalescing(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    for i in range(3):
        produce(source, "src_q", [("t", f"{i}-{j}", None, None, None, None) for j in range(4)])
        tick(source, "src_q")
    time.sleep(1.2)
    report = run_mover(source, target, keep_lag=dt.timedelta(seconds=1), min_batch_events=8)
    assert report.events == 12
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_keep_lag_refuses_bad_values() -> None:
    for bad in (dt.timedelta(0), dt.timedelta(days=400), 5):
        with pytest.raises(InvalidParameter, match="keep_lag"):
            MoverOptions("a", "b", "c", keep_lag=bad)  # type: ignore[arg-type]
