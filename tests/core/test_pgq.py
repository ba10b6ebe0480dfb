"""The typed PgQ API (core/pgq.py, core/ticking.py) against the real extension:
each call's answer checked against what PgQ itself reports."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2
import pytest
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq, ticking
from airflow_provider_pgq.core.errors import (
    ConsumerNotRegistered,
    PgqNotInstalled,
    QueueDisabled,
    QueueNotFound,
    TickerNotRunning,
    TickNotFound,
)
from tests.helpers import Server, produce, queue_events, register, simple_events, tick, tick_plain

MakeDb = Callable[..., Server]


@contextmanager
def connection(server: Server) -> Iterator[Connection]:
    conn = server.connect()
    try:
        yield conn
    finally:
        conn.close()


def quiet_ticker(server: Server, queue: str = "src_q") -> None:
    """No tick from lag or idleness during a test: only events (or force_tick) tick."""
    for name, value in (("ticker_max_count", "1"), ("ticker_max_lag", "1 hour"), ("ticker_idle_period", "1 hour")):
        server.execute("select pgq.set_queue_config(%s, %s, %s)", (queue, name, value))


def warm_up(server: Server, queue: str = "src_q") -> int:
    """One event and a tick. A fresh queue's first tick records its event sequence
    before the sequence was ever used, so the first batch's sequence span is one short
    of its event count; after this, spans count events exactly."""
    produce(server, queue, simple_events(1, prefix="warm"))
    return tick(server, queue)


def test_version_and_require_pgq(source: Server, make_db: MakeDb) -> None:
    bare = make_db(pgq=False)
    with connection(source) as conn:
        ver = pgq.version(conn)
        assert ver is not None and ver.startswith("3.")
        assert pgq.require_pgq(conn, "source") == ver
    with connection(bare) as conn:
        assert pgq.version(conn) is None
        with pytest.raises(PgqNotInstalled) as info:
            pgq.require_pgq(conn, "target")
    assert "target database" in str(info.value) and repr(bare.dbname) in str(info.value)
    assert "create extension pgq" in str(info.value)


def test_queue_lifecycle(make_db: MakeDb) -> None:
    db = make_db()
    with connection(db) as conn:
        assert not pgq.queue_exists(conn, "q1")
        with pytest.raises(QueueNotFound) as info:
            pgq.require_queue(conn, "q1", "source")
        assert "source queue 'q1'" in str(info.value) and repr(db.dbname) in str(info.value)
        assert pgq.create_queue(conn, "q1") is True
        assert pgq.create_queue(conn, "q1") is False
        assert pgq.queue_exists(conn, "q1")
        pgq.require_queue(conn, "q1", "source")
        conn.rollback()  # nothing commits on its own
        assert not pgq.queue_exists(conn, "q1")
        pgq.create_queue(conn, "q1")
        conn.commit()
        pgq.drop_queue(conn, "q1")
        conn.commit()
        assert not pgq.queue_exists(conn, "q1")


def test_registration(source: Server) -> None:
    with connection(source) as conn:
        assert not pgq.is_registered(conn, "src_q", "c")
        assert pgq.get_consumer_info(conn, "src_q", "c") is None
        assert pgq.register_consumer(conn, "src_q", "c") is True
        assert pgq.register_consumer(conn, "src_q", "c") is False
        conn.commit()
        assert pgq.is_registered(conn, "src_q", "c")
        assert not pgq.is_registered(conn, "src_q", "other")
        pgq.unregister_consumer(conn, "src_q", "c")
        conn.commit()
        assert not pgq.is_registered(conn, "src_q", "c")


def test_batch_cycle(source: Server) -> None:
    warm_up(source)
    register(source, "src_q", "c")
    events = simple_events(30)
    with connection(source) as conn:
        assert pgq.next_batch_info(conn, "src_q", "c") is None  # no tick after registration
        conn.commit()
        start = pgq.get_consumer_info(conn, "src_q", "c")
        assert start is not None and start.last_tick is not None
        produce(source, "src_q", events)
        cur_tick = tick(source, "src_q")

        batch = pgq.next_batch_info(conn, "src_q", "c")
        conn.commit()
        assert batch is not None
        assert (batch.prev_tick_id, batch.cur_tick_id) == (start.last_tick, cur_tick)
        assert batch.prev_tick_time < batch.cur_tick_time
        assert batch.prev_tick_event_seq is not None and batch.cur_tick_event_seq is not None
        assert batch.cur_tick_event_seq - batch.prev_tick_event_seq == 30
        # PgQ's own view of the batch agrees field by field.
        with conn.cursor() as cur:
            cur.execute(
                "select prev_tick_id, tick_id, batch_start, batch_end, seq_start, seq_end"
                " from pgq.get_batch_info(%s)",
                (batch.batch_id,),
            )
            assert cur.fetchone() == (
                batch.prev_tick_id, batch.cur_tick_id, batch.prev_tick_time, batch.cur_tick_time,
                batch.prev_tick_event_seq, batch.cur_tick_event_seq,
            )
        # Unfinished, the same batch comes back.
        again = pgq.next_batch_info(conn, "src_q", "c")
        assert again == batch
        assert pgq.batch_is_active(conn, batch.batch_id)

        batch_sql = pgq.batch_event_sql(conn, batch.batch_id)
        with conn.cursor() as cur:
            cur.execute(batch_sql)
            rows = cur.fetchall()
            cur.execute("select ev_id, ev_data from pgq.get_batch_events(%s)", (batch.batch_id,))
            expected = cur.fetchall()
        assert sorted((r[0], r[5]) for r in rows) == sorted(expected)
        assert sorted(r[5] for r in rows) == sorted(e[1] for e in events)
        assert pgq.batch_max_event_id(conn, batch_sql) == max(r[0] for r in rows)

        assert pgq.finish_batch(conn, batch.batch_id) is True
        conn.commit()
        assert pgq.finish_batch(conn, batch.batch_id) is False  # not active any more
        assert not pgq.batch_is_active(conn, batch.batch_id)
        assert pgq.next_batch_info(conn, "src_q", "c") is None
        info = pgq.get_consumer_info(conn, "src_q", "c")
        assert info is not None and info.last_tick == cur_tick and info.current_batch is None
        conn.rollback()


def test_next_batch_info_for_unregistered_consumer_raises(source: Server) -> None:
    with connection(source) as conn:
        with pytest.raises(psycopg2.Error, match="Not subscriber to queue"):
            pgq.next_batch_info(conn, "src_q", "nobody")


def test_next_batch_custom_and_events_up_to_last_tick(source: Server) -> None:
    quiet_ticker(source)
    warm_up(source)
    register(source, "src_q", "c")
    ticks = []
    for i in range(4):
        produce(source, "src_q", simple_events(5, start=i * 5))
        ticks.append(tick_plain(source, "src_q"))
    with connection(source) as conn:
        assert pgq.events_up_to_last_tick(conn, "src_q", "c") == 20
        assert pgq.next_batch_custom(conn, "src_q", "c", min_count=21) is None
        batch = pgq.next_batch_custom(conn, "src_q", "c", min_count=8)
        assert batch is not None and batch.cur_tick_id == ticks[1]  # two ticks joined
        assert pgq.finish_batch(conn, batch.batch_id)
        assert pgq.events_up_to_last_tick(conn, "src_q", "c") == 10
        batch = pgq.next_batch_custom(conn, "src_q", "c", min_count=10)
        assert batch is not None and (batch.prev_tick_id, batch.cur_tick_id) == (ticks[1], ticks[3])
        assert pgq.finish_batch(conn, batch.batch_id)
        assert pgq.events_up_to_last_tick(conn, "src_q", "c") == 0
        conn.commit()


def test_register_consumer_at_repositions_and_drops_the_open_batch(source: Server) -> None:
    register(source, "src_q", "c")
    first = tick(source, "src_q")
    second = tick(source, "src_q")
    with connection(source) as conn:
        batch = pgq.next_batch_info(conn, "src_q", "c")
        assert batch is not None and batch.cur_tick_id == first
        assert pgq.register_consumer_at(conn, "src_q", "c", second) is False  # was registered
        conn.commit()
        assert not pgq.batch_is_active(conn, batch.batch_id)
        info = pgq.get_consumer_info(conn, "src_q", "c")
        assert info is not None and (info.last_tick, info.current_batch) == (second, None)
        with pytest.raises(psycopg2.Error, match="tick not found"):
            pgq.register_consumer_at(conn, "src_q", "c", 987654)
        conn.rollback()
        assert pgq.register_consumer_at(conn, "src_q", "fresh", first) is True
        conn.commit()
        info = pgq.get_consumer_info(conn, "src_q", "fresh")
        assert info is not None and info.last_tick == first


def test_force_tick_ticker_and_last_tick(source: Server) -> None:
    quiet_ticker(source)
    tick(source, "src_q")  # with a single tick, the ticker ticks even when idle
    with connection(source) as conn:
        newest = pgq.newest_tick(conn, "src_q")
        assert newest is not None
        assert pgq.ticker(conn, "src_q") is None  # nothing new: no reason to tick
        conn.commit()
        assert pgq.force_tick(conn, "src_q") == newest  # marks only, returns the newest tick
        conn.commit()
        assert pgq.newest_tick(conn, "src_q") == newest
        made = pgq.ticker(conn, "src_q")
        conn.commit()
        assert made is not None and made > newest
        assert pgq.newest_tick(conn, "src_q") == made
        assert pgq.newest_tick(conn, "no_such_q") is None


def test_queue_info_and_config(source: Server) -> None:
    with connection(source) as conn:
        info = pgq.get_queue_info(conn, "src_q")
        assert info.queue_name == "src_q"
        assert (info.external_ticker, info.ticker_paused, info.disable_insert) == (False, False, False)
        assert info.newest_tick == pgq.newest_tick(conn, "src_q")
        assert isinstance(info.ticker_max_lag, dt.timedelta)
        pgq.set_queue_config(conn, "src_q", "ticker_max_count", "123")
        pgq.set_queue_config(conn, "src_q", "ticker_paused", "true")
        conn.commit()
        info = pgq.get_queue_info(conn, "src_q")
        assert (info.ticker_max_count, info.ticker_paused) == (123, True)
        with pytest.raises(QueueNotFound, match="'no_such_q'"):
            pgq.get_queue_info(conn, "no_such_q")


def test_consumer_info(source: Server) -> None:
    quiet_ticker(source)
    warm_up(source)
    register(source, "src_q", "c")
    produce(source, "src_q", simple_events(7))
    new_tick = tick_plain(source, "src_q")
    with connection(source) as conn:
        info = pgq.get_consumer_info(conn, "src_q", "c")
        assert info is not None
        assert (info.queue_name, info.consumer_name, info.current_batch, info.next_tick) == ("src_q", "c", None, None)
        assert info.pending_events == 7
        assert info.lag is not None and info.lag >= dt.timedelta(0)
        batch = pgq.next_batch_info(conn, "src_q", "c")
        conn.commit()
        assert batch is not None
        info = pgq.get_consumer_info(conn, "src_q", "c")
        assert info is not None and (info.current_batch, info.next_tick) == (batch.batch_id, new_tick)


def test_current_event_table_insert_event_and_count(source: Server) -> None:
    with connection(source) as conn:
        table = pgq.current_event_table(conn, "src_q")
        schema, _, name = table.partition(".")
        assert schema == "pgq" and name.startswith("event_")
        ids = [pgq.insert_event(conn, "src_q", "t", f"d{i}", "x", None, "", None) for i in range(3)]
        conn.commit()
        assert len(set(ids)) == 3
        assert pgq.count_queue_events(conn, "src_q") == 3
        with pytest.raises(QueueNotFound):
            pgq.count_queue_events(conn, "no_such_q")
        conn.rollback()
    rows = queue_events(source, "src_q")
    assert sorted((r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows) == [
        ("t", f"d{i}", "x", None, "", None) for i in range(3)
    ]


def test_force_tick_and_wait_with_own_ticker(source: Server) -> None:
    with connection(source) as conn:
        before = pgq.newest_tick(conn, "src_q")
        conn.rollback()
        made = ticking.force_tick_and_wait(conn, "src_q", run_ticker=True, timeout=10)
        assert before is not None and made > before
        assert pgq.newest_tick(conn, "src_q") == made
        conn.rollback()


def test_force_tick_and_wait_refuses_external_ticker(source: Server) -> None:
    source.execute("update pgq.queue set queue_external_ticker = true where queue_name = 'src_q'")
    with connection(source) as conn:
        with pytest.raises(TickerNotRunning, match="external ticker"):
            ticking.force_tick_and_wait(conn, "src_q", run_ticker=True, timeout=10)


def _raised(conn: Connection, call: Callable[[], object]) -> BaseException:
    try:
        call()
    except psycopg2.Error as exc:
        conn.rollback()
        return exc
    raise AssertionError("PgQ raised nothing")


def test_pgq_errors_are_told_apart_by_sqlstate_and_pgq_own_messages(source: Server) -> None:
    """The one translator of PgQ's RAISE EXCEPTION errors, against PgQ's real messages."""
    with connection(source) as conn:
        assert pgq.pgq_error(_raised(conn, lambda: pgq.next_batch_info(conn, "src_q", "nobody"))) \
            is ConsumerNotRegistered
        register(source, "src_q", "c")
        assert pgq.pgq_error(_raised(conn, lambda: pgq.register_consumer_at(conn, "src_q", "c", 999999))) \
            is TickNotFound
        assert pgq.pgq_error(_raised(conn, lambda: pgq.current_event_table(conn, "no_such_q"))) is QueueNotFound
        source.execute("update pgq.queue set queue_disable_insert = true where queue_name = 'src_q'")
        assert pgq.pgq_error(_raised(conn, lambda: pgq.insert_event(conn, "src_q", "t", "d"))) is QueueDisabled
        assert pgq.pgq_error(_raised(conn, lambda: pgq.current_event_table(conn, "src_q"))) is QueueDisabled
        # other PgQ errors, and errors that are not PgQ's, are left alone
        def unmapped() -> None:  # PgQ's 'batch not found' (P0001), none of ours
            with conn.cursor() as cur:
                cur.execute("select * from pgq.get_batch_events(424242)")

        not_ours = _raised(conn, unmapped)
        assert isinstance(not_ours, psycopg2.errors.RaiseException) and pgq.pgq_error(not_ours) is None
        assert pgq.pgq_error(ValueError("Event queue not found")) is None
