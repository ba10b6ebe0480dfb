"""pgq_ext on a real target: installing (again, over marks, over a classic layout),
the classic API's behaviour, and what the mover adds (source binding, key lock,
the pgq_writer insert path)."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.errors import KeyLocked, PgqExtMissing
from tests.helpers import (
    Server,
    mark_of,
    produce,
    queue_events,
    register,
    run_mover,
    simple_events,
    tick,
)

MakeDb = Callable[..., Server]

TABLES = ("completed_tick", "completed_batch", "completed_event", "partial_batch")


@contextmanager
def connection(server: Server) -> Iterator[psycopg2.extensions.connection]:
    conn = server.connect()
    try:
        yield conn
    finally:
        conn.close()


def one(server: Server, query: str, params: tuple[Any, ...] = ()) -> Any:
    return server.execute(query, params)[0][0]


def snapshot(server: Server, tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the given pgq_ext tables, sorted: to compare before and after."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name in tables:
        rows = server.execute(
            psycopg2.sql.SQL("select * from {}").format(psycopg2.sql.Identifier("pgq_ext", name))
        )
        out[name] = sorted(rows, key=repr)
    return out


def install(server: Server) -> None:
    with connection(server) as conn:
        pgq_ext.install(conn)


def fill_marks(server: Server) -> None:
    """Some state in every table, written through the API."""
    for q in (
        "select pgq_ext.set_last_tick('c1', 5)",
        "select pgq_ext.set_last_tick('c1', 'sub', 7)",
        "select pgq_ext.set_batch_done('c2', 41)",
        "select pgq_ext.set_event_done('c3', 'sub', 9, 100)",
        "select pgq_ext.set_event_done('c3', 'sub', 9, 101)",
        "select pgq_ext.bind_source('c1', '', 'sys', 'db', 'q')",
    ):
        server.execute(q)


# -- installing -------------------------------------------------------------------


def test_install_twice_on_a_fresh_database(make_db: MakeDb) -> None:
    db = make_db()
    with connection(db) as conn:
        assert pgq_ext.mover_schema_version(conn) is None
        assert not pgq_ext.classic_present(conn)
        pgq_ext.install(conn)
        pgq_ext.install(conn)
        assert pgq_ext.mover_schema_version(conn) == pgq_ext.REQUIRED_MOVER_SCHEMA
        assert not pgq_ext.installed_as_extension(conn)
        pgq_ext.require(conn)  # no exception
        conn.rollback()
    counts = dict(
        db.execute(
            "select p.proname, count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'pgq_ext' group by 1"
        )
    )
    # One definition per argument list, none left over from the first run.
    assert counts["get_last_tick"] == 2 and counts["set_last_tick"] == 2
    assert counts["set_event_done"] == 2 and counts["version"] == 1
    assert counts["mover_schema_version"] == 1 and counts["bind_source"] == 1
    assert snapshot(db) == {t: [] for t in TABLES}


def test_concurrent_installs_both_succeed(make_db: MakeDb) -> None:
    """Two movers starting at once with install_pgq_ext: the install lock serializes them."""
    db = make_db()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with connection(db) as conn:
                barrier.wait(timeout=30)
                pgq_ext.install(conn)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert one(db, "select pgq_ext.mover_schema_version()") == pgq_ext.REQUIRED_MOVER_SCHEMA


def test_install_over_an_installation_with_marks_keeps_them(target: Server) -> None:
    fill_marks(target)
    before = snapshot(target, TABLES + ("tracking_source",))
    assert before["completed_tick"] and before["completed_event"] and before["tracking_source"]
    install(target)
    assert snapshot(target, TABLES + ("tracking_source",)) == before
    assert one(target, "select pgq_ext.get_last_tick('c1')") == 5
    assert one(target, "select pgq_ext.get_last_tick('c1', 'sub')") == 7
    assert one(target, "select pgq_ext.is_batch_done('c2', 41)") is True
    assert one(target, "select pgq_ext.is_event_done('c3', 'sub', 9, 101)") is True


CLASSIC_LAYOUT = [
    "create schema pgq_ext",
    "create table pgq_ext.completed_tick (consumer_id text not null, subconsumer_id text not null,"
    " last_tick_id bigint not null, primary key (consumer_id, subconsumer_id))",
    "create table pgq_ext.completed_batch (consumer_id text not null, subconsumer_id text not null,"
    " last_batch_id bigint not null, primary key (consumer_id, subconsumer_id))",
    "create table pgq_ext.completed_event (consumer_id text not null, subconsumer_id text not null,"
    " batch_id bigint not null, event_id bigint not null,"
    " primary key (consumer_id, subconsumer_id, batch_id, event_id))",
    "create table pgq_ext.partial_batch (consumer_id text not null, subconsumer_id text not null,"
    " cur_batch_id bigint not null, primary key (consumer_id, subconsumer_id))",
    # Same names and argument types as ours, other argument names (and one other
    # return type): "create or replace" would refuse to replace these.
    "create function pgq_ext.get_last_tick(cons text, subcons text) returns bigint language sql as"
    " $$ select last_tick_id from pgq_ext.completed_tick where consumer_id = cons"
    " and subconsumer_id = subcons $$",
    "create function pgq_ext.get_last_tick(cons text) returns bigint language sql as"
    " $$ select pgq_ext.get_last_tick(cons, '') $$",
    "create function pgq_ext.set_last_tick(cons text, subcons text, tick bigint) returns integer"
    " language sql as $$ update pgq_ext.completed_tick set last_tick_id = tick"
    " where consumer_id = cons and subconsumer_id = subcons; select 1 $$",
    "create function pgq_ext.set_last_tick(cons text, tick bigint) returns integer language sql as"
    " $$ select pgq_ext.set_last_tick(cons, '', tick) $$",
    "create function pgq_ext.is_batch_done(cons text, subcons text, batch bigint) returns boolean"
    " language sql as $$ select false $$",
    "create function pgq_ext.set_batch_done(cons text, subcons text, batch bigint) returns boolean"
    " language sql as $$ select true $$",
    "create function pgq_ext.is_event_done(cons text, subcons text, batch bigint, ev bigint)"
    " returns boolean language sql as $$ select false $$",
    "create function pgq_ext.set_event_done(cons text, subcons text, batch bigint, ev bigint)"
    " returns integer language sql as $$ select 1 $$",
    "create function pgq_ext.version() returns text language sql as $$ select '3.1'::text $$",
]


def build_classic(db: Server, mover_tick: int | None = None) -> None:
    """A classic pgq_ext made by hand, with data in all four tables."""
    for statement in CLASSIC_LAYOUT:
        db.execute(statement)
    db.execute(
        "insert into pgq_ext.completed_tick values ('old_mover', '', 12), ('old_mover', 'part2', 13)"
    )
    if mover_tick is not None:
        db.execute("insert into pgq_ext.completed_tick values ('mover', '', %s)", (mover_tick,))
    db.execute("insert into pgq_ext.completed_batch values ('old_consumer', '', 77)")
    db.execute("insert into pgq_ext.completed_event values ('old_consumer', '', 78, 1), ('old_consumer', '', 78, 2)")
    db.execute("insert into pgq_ext.partial_batch values ('old_consumer', '', 78)")


def test_install_over_a_classic_layout_keeps_its_data_and_works(source: Server, make_db: MakeDb) -> None:
    target = make_db(queue="dst_q")
    register(source, "src_q", "mover")
    start = one(source, "select last_tick from pgq.get_consumer_info('src_q', 'mover')")
    build_classic(target, mover_tick=start)
    before = snapshot(target)

    with connection(target) as conn:
        assert pgq_ext.classic_present(conn) and pgq_ext.mover_schema_version(conn) is None
        with pytest.raises(PgqExtMissing, match="older than this mover needs.*classic"):
            pgq_ext.require(conn)
        conn.rollback()
        pgq_ext.install(conn)
        assert pgq_ext.mover_schema_version(conn) == pgq_ext.REQUIRED_MOVER_SCHEMA
        conn.rollback()

    assert snapshot(target) == before
    assert one(target, "select pgq_ext.version()") != "3.1"  # ours replaced the classic ones
    assert one(target, "select pgq_ext.get_last_tick('old_mover')") == 12
    assert one(target, "select pgq_ext.get_last_tick('old_mover', 'part2')") == 13
    assert one(target, "select pgq_ext.is_batch_done('old_consumer', 77)") is True
    assert one(target, "select pgq_ext.is_event_done('old_consumer', 78, 2)") is True
    # The classic set_last_tick could only update; ours inserts a new key too.
    assert one(target, "select pgq_ext.set_last_tick('new_one', 3)") == 1
    assert one(target, "select pgq_ext.get_last_tick('new_one')") == 3

    # A target once fed by the classic queue_mover: the mover continues from its mark.
    events = simple_events(40)
    produce(source, "src_q", events)
    last = tick(source, "src_q")
    report = run_mover(source, target)
    assert (report.events, report.first_tick, report.last_tick) == (40, start, last)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last
    assert one(target, "select pgq_ext.get_last_tick('old_mover')") == 12


def test_mover_installs_pgq_ext_over_classic_when_asked(source: Server, make_db: MakeDb) -> None:
    target = make_db(queue="dst_q")
    register(source, "src_q", "mover")
    build_classic(target)
    before = snapshot(target)
    with pytest.raises(PgqExtMissing, match="classic"):
        run_mover(source, target)
    assert snapshot(target) == before
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    assert run_mover(source, target, install_pgq_ext=True).events == 5
    after = snapshot(target)
    assert {k: v for k, v in after.items() if k != "completed_tick"} == {
        k: v for k, v in before.items() if k != "completed_tick"
    }
    assert set(before["completed_tick"]) < set(after["completed_tick"])


# -- the classic API ---------------------------------------------------------------


def test_last_tick_both_forms_and_null_clears(target: Server) -> None:
    def q(text: str) -> Any:
        return one(target, text)

    assert q("select pgq_ext.get_last_tick('c')") is None
    assert q("select pgq_ext.get_last_tick('c', '')") is None
    assert q("select pgq_ext.set_last_tick('c', 10)") == 1
    assert q("select pgq_ext.get_last_tick('c')") == 10
    assert q("select pgq_ext.get_last_tick('c', '')") == 10  # the short form is subconsumer ''
    assert q("select pgq_ext.set_last_tick('c', 's', 20)") == 1
    assert (q("select pgq_ext.get_last_tick('c', 's')"), q("select pgq_ext.get_last_tick('c')")) == (20, 10)
    assert q("select pgq_ext.set_last_tick('c', 11)") == 1  # moves, never adds a row
    assert q("select pgq_ext.get_last_tick('c')") == 11
    assert q("select count(*) from pgq_ext.completed_tick where consumer_id = 'c'") == 2
    assert q("select pgq_ext.set_last_tick('c', null)") == 1
    assert q("select pgq_ext.get_last_tick('c')") is None
    assert q("select pgq_ext.get_last_tick('c', 's')") == 20
    assert q("select pgq_ext.set_last_tick('c', 's', null)") == 1
    assert q("select count(*) from pgq_ext.completed_tick") == 0
    assert q("select pgq_ext.set_last_tick('never', null)") == 1  # clearing nothing is fine


def test_batch_done_both_forms(target: Server) -> None:
    def q(text: str) -> Any:
        return one(target, text)

    assert q("select pgq_ext.is_batch_done('c', 5)") is False
    assert q("select pgq_ext.set_batch_done('c', 5)") is True
    assert q("select pgq_ext.is_batch_done('c', 5)") is True
    assert q("select pgq_ext.is_batch_done('c', '', 5)") is True
    assert q("select pgq_ext.set_batch_done('c', 5)") is False  # already done
    assert q("select pgq_ext.is_batch_done('c', 's', 5)") is False  # other subconsumer
    assert q("select pgq_ext.set_batch_done('c', 's', 5)") is True
    assert q("select pgq_ext.set_batch_done('c', 6)") is True
    assert q("select pgq_ext.is_batch_done('c', 6)") is True
    assert q("select pgq_ext.is_batch_done('c', 5)") is False  # only the last batch is kept
    assert q("select pgq_ext.is_batch_done('c', 's', 5)") is True
    assert q("select count(*) from pgq_ext.completed_batch") == 2


def test_event_done_both_forms(target: Server) -> None:
    def q(text: str) -> Any:
        return one(target, text)

    assert q("select pgq_ext.is_event_done('c', 1, 100)") is False
    assert q("select pgq_ext.set_event_done('c', 1, 100)") is True
    assert q("select pgq_ext.is_event_done('c', 1, 100)") is True
    assert q("select pgq_ext.is_event_done('c', '', 1, 100)") is True
    assert q("select pgq_ext.set_event_done('c', 1, 100)") is False  # already done
    assert q("select pgq_ext.set_event_done('c', 1, 101)") is True
    assert q("select pgq_ext.is_event_done('c', 1, 102)") is False
    assert q("select pgq_ext.is_event_done('c', 's', 1, 100)") is False  # other subconsumer
    assert q("select pgq_ext.set_event_done('c', 's', 1, 100)") is True
    # A new batch forgets the events of the old one (it is finished on the source).
    assert q("select pgq_ext.set_event_done('c', 2, 100)") is True
    assert q("select pgq_ext.is_event_done('c', 1, 100)") is False
    assert q("select pgq_ext.is_event_done('c', 1, 101)") is False
    assert q("select pgq_ext.is_event_done('c', 2, 100)") is True
    assert q("select pgq_ext.is_event_done('c', 's', 1, 100)") is True  # untouched
    assert q("select cur_batch_id from pgq_ext.partial_batch where consumer_id = 'c' and subconsumer_id = ''") == 2


def test_version(target: Server) -> None:
    version = one(target, "select pgq_ext.version()")
    assert isinstance(version, str)
    major, minor = version.split(".")[:2]
    assert int(major) >= 3 and minor.isdigit()


def test_api_works_for_a_role_without_table_rights(target: Server, cluster: Any) -> None:
    """The functions are security definer: a role holding only the mover role reads and
    writes marks without any privilege on the tables themselves."""
    target.execute("do $$ begin create role pgq_ext_user login password 'pw-ext-user';"
                   " exception when duplicate_object then null; end $$")
    target.execute("grant pgq_mover to pgq_ext_user")
    conn = psycopg2.connect(cluster.dsn(target.dbname, user="pgq_ext_user", password="pw-ext-user"))
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq_ext.set_last_tick('w', 4)")
            cur.execute("select pgq_ext.get_last_tick('w')")
            assert cur.fetchone() == (4,)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("insert into pgq_ext.completed_tick values ('x', '', 1)")
        conn.rollback()
    finally:
        conn.close()


# -- what the mover adds ---------------------------------------------------------------


def test_bind_source_and_unbind(target: Server) -> None:
    def q(text: str) -> Any:
        return one(target, text)

    assert q("select pgq_ext.bind_source('m', '', 'sys1', 'db1', 'q')") is None
    assert q("select pgq_ext.bind_source('m', '', 'sys1', 'db1', 'q')") is None  # same source again
    assert q("select pgq_ext.bind_source('m', '', 'sys1', 'db2', 'q')") == "sys1/db1/q"
    assert q("select pgq_ext.bind_source('m', '', 'sys2', 'db1', 'q')") == "sys1/db1/q"
    assert q("select pgq_ext.bind_source('m', '', 'sys1', 'db1', 'q2')") == "sys1/db1/q"
    assert q("select pgq_ext.bind_source('m', 'other', 'sys1', 'db2', 'q')") is None  # own key
    assert q("select pgq_ext.unbind_source('m', '')") == 1
    assert q("select pgq_ext.unbind_source('m', '')") == 0
    assert q("select pgq_ext.bind_source('m', '', 'sys1', 'db1', 'q')") is None  # free again
    # one source consumer feeds one key: sys1/db2/q is fed into subconsumer 'other' already
    assert "subconsumer 'other'" in q("select pgq_ext.bind_source('m', '', 'sys1', 'db2', 'q')")


def test_lock_key_serializes_one_key_only(target: Server) -> None:
    with connection(target) as a, connection(target) as b:
        pgq_ext.lock_key(a, "m", "")
        with b.cursor() as cur:
            cur.execute("set lock_timeout = '200ms'")
        pgq_ext.lock_key(b, "m", "other")  # another key: free
        pgq_ext.lock_key(b, "n", "")
        with pytest.raises(KeyLocked) as info:
            pgq_ext.lock_key(b, "m", "")
        # the error names the session holding the key, and how to end it
        assert info.value.holder_pid == a.get_backend_pid()
        assert f"pg_terminate_backend({a.get_backend_pid()})" in str(info.value)
        assert isinstance(info.value.__cause__, psycopg2.errors.LockNotAvailable)
        b.rollback()
        a.rollback()  # transaction-scoped: released with the transaction
        with b.cursor() as cur:
            cur.execute("set lock_timeout = '200ms'")
        pgq_ext.lock_key(b, "m", "")
        b.rollback()


def test_require_reports_missing_and_installs_when_asked(make_db: MakeDb) -> None:
    db = make_db()
    with connection(db) as conn:
        with pytest.raises(PgqExtMissing) as info:
            pgq_ext.require(conn)
        assert "not installed" in str(info.value) and db.dbname in str(info.value)
        conn.rollback()
        assert one(db, "select to_regnamespace('pgq_ext') is null") is True
        pgq_ext.require(conn, install_if_missing=True)
        assert pgq_ext.mover_schema_version(conn) == pgq_ext.REQUIRED_MOVER_SCHEMA


def test_insert_event_chunk_keeps_fields_and_times(target: Server) -> None:
    """The pgq_writer path: arrays in, rows in the current event table with their
    times, NULLs and '' kept apart, ids from the queue's sequence unless given."""
    t0 = dt.datetime(2026, 3, 1, 8, 0, 0, 250000, tzinfo=dt.timezone.utc)
    rows = [
        ("a", "", None, "", "ü", None, t0),
        (None, None, "", None, None, "€", t0 + dt.timedelta(microseconds=1)),
    ]
    cols = [list(c) for c in zip(*rows, strict=True)]
    n = one(
        target,
        "select pgq_ext.insert_event_chunk('dst_q', %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::text[], %s::timestamptz[])",
        tuple(cols),
    )
    assert n == 2
    assert queue_events(target, "dst_q") == Counter(rows)
    # explicit ids: only inside the transaction that holds the (empty) queue's kept-id claim
    target.execute("select pgq.create_queue('ids_q')")
    with connection(target) as conn, conn.cursor() as cur:
        cur.execute("select pgq_ext.kept_ids_claim('k', '', 'ids_q')")
        assert cur.fetchone() == (None,)
        cur.execute(
            "select pgq_ext.insert_event_chunk('ids_q', %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::text[], %s::text[], %s::timestamptz[], %s::bigint[])",
            (["k"], ["kept id"], [None], [None], [None], [None], [t0], [900001]),
        )
        assert cur.fetchone() == (1,)
        conn.commit()
    with_ids = queue_events(target, "ids_q", with_ids=True)
    assert ("k", "kept id", None, None, None, None, t0, 900001) in with_ids
