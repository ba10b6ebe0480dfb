"""Admin operators: the setup and ticker example DAGs through real Airflow (dag.test),
and the ticker's options called directly, against real databases."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.pending import pending_status
from airflow_provider_pgq.operators.admin import (
    PgqCreateQueueOperator,
    PgqRegisterConsumerOperator,
    PgqTickerOperator,
)
from tests.helpers import DagRunner, Server, produce, simple_events, tick
from tests.support.cluster import wait_until


def _status(db: Server, queue: str, consumer: str):
    conn = db.connect()
    try:
        return pending_status(conn, queue, consumer)
    finally:
        conn.close()


def test_setup_dag_is_idempotent_and_ticker_dag_makes_batches(make_db, run_dag: DagRunner):  # noqa: F811
    src, dst = make_db(), make_db()
    conns = {"pgq_source": src.uri(), "pgq_target": dst.uri()}

    first = run_dag("example_pgq_setup", conns)
    assert first["state"] == "success", first["log"][-3000:]
    assert first["xcom"]["create_source_queue[-1]"] == {"created": ["orders"], "existing": []}
    assert first["xcom"]["create_target_queue[-1]"] == {"created": ["orders"], "existing": []}
    assert first["xcom"]["register_mover[-1]"] == {"registered": ["orders_mover"], "existing": []}
    assert src.execute("select queue_ticker_max_count, queue_ticker_max_lag from pgq.queue"
                       " where queue_name = 'orders'")[0] == (1000, dt.timedelta(seconds=2))
    assert dst.execute("select count(*) from pgq.queue where queue_name = 'orders'")[0][0] == 1

    again = run_dag("example_pgq_setup", conns, logical_date="2026-06-01T13:00:00+00:00")
    assert again["state"] == "success", again["log"][-3000:]
    assert again["xcom"]["create_source_queue[-1]"] == {"created": [], "existing": ["orders"]}
    assert again["xcom"]["create_target_queue[-1]"] == {"created": [], "existing": ["orders"]}
    assert again["xcom"]["register_mover[-1]"] == {"registered": [], "existing": ["orders_mover"]}
    assert src.execute("select count(*) from pgq.queue")[0][0] == 1
    assert src.execute("select count(*) from pgq.get_consumer_info('orders', null)")[0][0] == 1

    # events without a ticker make no batch; one ticker run does
    produce(src, "orders", simple_events(10))
    assert not _status(src, "orders", "orders_mover").batch_available
    # 10 events are below ticker_max_count (1000): the ticker ticks once the last tick is
    # older than ticker_max_lag (2 s), which a cold Airflow start used to take care of
    assert wait_until(lambda: src.execute(
        "select ticker_lag > queue_ticker_max_lag from pgq.get_queue_info('orders')")[0][0], timeout=10)
    ticked = run_dag("example_pgq_ticker", {"pgq_source": src.uri()})
    assert ticked["state"] == "success", ticked["log"][-3000:]
    tick = ticked["xcom"]["tick_source[-1]"]["orders"]
    status = _status(src, "orders", "orders_mover")
    assert tick is not None and status.batch_available and status.newest_tick == tick


@pytest.fixture
def db(make_db, monkeypatch) -> Server:
    server = make_db(queue="q1")
    server.execute("select pgq.create_queue('q2')")
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_DB", server.uri())
    return server


def _last_ticks(db: Server) -> dict[str, int]:
    return dict(db.execute("select queue_name, last_tick_id from pgq.get_queue_info()"))


def test_ticker_ticks_only_when_due_unless_forced(db):
    ticker = PgqTickerOperator(task_id="tick", pgq_conn_id="pgq_db")
    # A queue's unused event sequence reads one ahead of its first tick, so the first
    # pass may tick a fresh queue; after that, with nothing new, no tick is due.
    ticker.execute({})  # type: ignore[arg-type]
    before = _last_ticks(db)
    assert ticker.execute({}) == {"q1": None, "q2": None}  # type: ignore[arg-type]
    produce(db, "q1", simple_events(3))
    db.execute("select pgq.set_queue_config('q1', 'ticker_max_count', '1')")
    assert ticker.execute({}) == {"q1": before["q1"] + 1, "q2": None}  # type: ignore[arg-type]
    forced = PgqTickerOperator(task_id="tick", pgq_conn_id="pgq_db", queue_name="q2", force=True)
    assert forced.execute({}) == {"q2": before["q2"] + 1}  # type: ignore[arg-type]


def test_ticker_skips_paused_and_external_ticker_queues(db):
    db.execute("select pgq.set_queue_config('q1', 'ticker_paused', 'true')")
    db.execute("select pgq.set_queue_config('q2', 'external_ticker', 'true')")
    produce(db, "q1", simple_events(3))
    result = PgqTickerOperator(task_id="tick", pgq_conn_id="pgq_db", force=True).execute({})  # type: ignore[arg-type]
    assert result == {}
    assert db.execute("select count(*) from pgq.tick")[0][0] == 2  # the two created with the queues


def test_create_and_register_take_lists(db):
    created = PgqCreateQueueOperator(task_id="c", pgq_conn_id="pgq_db", queue_name=["q2", "q3"],
                                     queue_config={"rotation_period": "1 hour"}).execute({})  # type: ignore[arg-type]
    assert created == {"created": ["q3"], "existing": ["q2"]}
    assert db.execute("select queue_name, extract(epoch from queue_rotation_period)::int from pgq.queue"
                      " where queue_name in ('q2', 'q3') order by 1") == [("q2", 3600), ("q3", 3600)]
    registered = PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="q3",
                                             consumer_name=["a", "b"]).execute({})  # type: ignore[arg-type]
    assert registered == {"registered": ["a", "b"], "existing": []}


def test_bad_parameters_are_refused(db):
    with pytest.raises(InvalidParameter, match="queue_ticker_max_lag"):
        PgqCreateQueueOperator(task_id="c", pgq_conn_id="pgq_db", queue_name="q",
                               queue_config={"queue_ticker_max_lag": "1s"})
    with pytest.raises(Exception, match="queue 'nope' does not exist"):
        PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="nope",
                                    consumer_name="a").execute({})  # type: ignore[arg-type]


def test_register_consumer_old_parameter_name_warns(db):
    with pytest.warns(DeprecationWarning, match="consumer_name"):
        op = PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="q3", consumer="old")
    assert op.consumer_name == "old" and "consumer_name" in op.template_fields
    PgqCreateQueueOperator(task_id="c", pgq_conn_id="pgq_db", queue_name="q3").execute({})  # type: ignore[arg-type]
    assert op.execute({}) == {"registered": ["old"], "existing": []}  # type: ignore[arg-type]


def test_register_consumer_at_oldest_sees_what_the_queue_holds(db, caplog):
    """register_at='oldest': a consumer registered after events were queued still gets
    them; 'now' (PgQ's rule) does not, and says so with the count."""
    PgqCreateQueueOperator(task_id="c", pgq_conn_id="pgq_db", queue_name="q4").execute({})  # type: ignore[arg-type]
    db.execute("select pgq.insert_event('q4', 't', 'early-' || g) from generate_series(1, 7) g")
    tick(db, "q4")
    with caplog.at_level(logging.WARNING, logger="airflow_provider_pgq.core.registration"):
        PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="q4",
                                    consumer_name="late_now").execute({})  # type: ignore[arg-type]
    assert "7 events the queue already holds" in caplog.text
    PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="q4", consumer_name="late_oldest",
                                register_at="oldest").execute({})  # type: ignore[arg-type]
    info = dict(db.execute("select consumer_name, pending_events from pgq.get_consumer_info('q4')"))
    assert info["late_oldest"] >= 7 and info["late_now"] == 0
    with pytest.raises(InvalidParameter, match="register_at"):
        PgqRegisterConsumerOperator(task_id="r", pgq_conn_id="pgq_db", queue_name="q4", consumer_name="x",
                                    register_at="yesterday")
