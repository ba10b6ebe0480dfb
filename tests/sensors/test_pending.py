"""The "is there work" check (core.pending) and PgqHook.get_lag against a real queue."""

from __future__ import annotations

import dataclasses
import time

import pytest

from airflow_provider_pgq.core.errors import ConsumerNotRegistered, QueueNotFound
from airflow_provider_pgq.core.pending import PendingStatus, pending_status, queue_statuses, require_registered
from airflow_provider_pgq.hooks.pgq import PgqHook
from tests.helpers import Server, produce, register, run_mover, simple_events, tick_plain


@pytest.fixture
def src(make_db, monkeypatch) -> Server:
    """src_q ticking on every new event; one event ticked before 'mover' registers (on a
    queue that never had an event PgQ's estimate is one low). Connection pgq_src."""
    db = make_db(queue="src_q")
    db.execute("select pgq.set_queue_config('src_q', 'ticker_max_count', '1')")
    produce(db, "src_q", simple_events(1, start=-1))
    tick_plain(db, "src_q")
    register(db, "src_q", "mover")
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", db.uri())
    return db


def _status(db: Server, consumer: str = "mover", queue: str = "src_q") -> PendingStatus:
    conn = db.connect()
    try:
        return pending_status(conn, queue, consumer)
    finally:
        conn.close()


def test_get_lag_reflects_pending_events(src, make_db):
    hook = PgqHook("pgq_src")
    assert hook.get_lag("src_q", "mover").pending_events == 0
    produce(src, "src_q", simple_events(12))
    assert hook.get_lag("src_q", "mover").pending_events == 0  # not ticked: not pending yet
    tick_plain(src, "src_q")
    lag = hook.get_lag("src_q", "mover")
    assert lag.registered and lag.pending_events == 12 and lag.lag_seconds is not None and lag.lag_seconds >= 0
    # one status model: the hook's answer is the sensor's and the triggers' check
    assert isinstance(lag, PendingStatus)
    assert dataclasses.replace(lag, lag_seconds=None) == dataclasses.replace(_status(src), lag_seconds=None)
    produce(src, "src_q", simple_events(5, start=12))
    tick_plain(src, "src_q")
    assert hook.get_lag("src_q", "mover").pending_events == 17
    run_mover(src, make_db(queue="dst_q", ext=True), consumer="mover")
    assert hook.get_lag("src_q", "mover").pending_events == 0
    nobody = hook.get_lag("src_q", "nobody").to_dict()
    assert (nobody["registered"], nobody["lag_seconds"], nobody["pending_events"]) == (False, None, None)
    assert nobody["consumer_name"] == "nobody" and nobody["newest_tick"] is not None
    with pytest.raises(QueueNotFound):
        hook.get_lag("no_such_q", "mover")


def test_status_thresholds_and_positions(src):
    empty = _status(src)
    assert empty.registered and not empty.batch_available and not empty.ready(0)
    produce(src, "src_q", simple_events(3))
    tick_plain(src, "src_q")
    status = _status(src)
    assert status.batch_available and status.pending_events == 3
    assert status.newest_tick == status.last_tick + 1 and status.current_batch is None
    assert status.ready(0) and status.ready(3) and not status.ready(4)
    assert not status.ready(4, max_lag=3600)
    time.sleep(0.3)  # the consumer's last tick is now at least 0.3 s old
    assert _status(src).ready(4, max_lag=0.2)
    assert status.to_dict()["batch_available"] is True


def test_force_tick_inflates_the_estimate_so_a_wake_up_may_find_nothing(src):
    """Documented: the check may wake a mover for nothing (never miss work) after force_tick."""
    src.execute("select pgq.force_tick('src_q')")
    tick_plain(src, "src_q")
    # force_tick inflates the estimate: a batch is there, its events are not
    conn = src.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.next_batch('src_q', 'mover')")
            batch = cur.fetchone()[0]  # type: ignore[index]
            cur.execute("select count(*) from pgq.get_batch_events(%s)", (batch,))
            assert cur.fetchone()[0] == 0  # type: ignore[index]
        conn.rollback()  # nothing allocated
    finally:
        conn.close()
    status = _status(src)
    assert status.batch_available and status.pending_events > 1000  # PgQ's estimate, inflated
    assert status.ready(1000)


def test_all_consumers_in_one_query_and_missing_things(src):
    register(src, "src_q", "other")
    produce(src, "src_q", simple_events(2))
    tick_plain(src, "src_q")
    conn = src.connect()
    try:
        statuses = queue_statuses(conn, "src_q")
        assert {k: v.pending_events for k, v in statuses.items()} == {"mover": 2, "other": 2}
        nobody = pending_status(conn, "src_q", "nobody")
        assert not nobody.registered and not nobody.batch_available and nobody.newest_tick is not None
        with pytest.raises(ConsumerNotRegistered, match="pgq.register_consumer\\('src_q', 'nobody'\\)"):
            require_registered(nobody)
        with pytest.raises(QueueNotFound, match="queue 'no_q' does not exist"):
            pending_status(conn, "no_q", "mover")
        with pytest.raises(QueueNotFound):
            queue_statuses(conn, "no_q")
    finally:
        conn.close()
