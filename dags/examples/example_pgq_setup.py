"""Queue administration as DAGs: set up queues and consumers, and tick where no pgqd runs.

``example_pgq_setup`` (run by hand, or on every deployment: every task is
idempotent) creates the queue ``orders`` in the source and the target database and
registers the mover's consumer ``orders_mover`` on the source, as
``example_pgq_event_driven`` expects. A consumer sees only events inserted after its
registration, so run it before the producers start.

``example_pgq_ticker`` cuts ticks every minute for the source database, for
installations without pgqd. Never enable it where pgqd ticks that database: PgQ
forbids two tickers on one queue at once, and pgqd does not take the advisory lock
this ticker serializes on.

Connections: ``pgq_source``, ``pgq_target`` (roles with pgq_admin).
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.admin import (
    PgqCreateQueueOperator,
    PgqRegisterConsumerOperator,
    PgqTickerOperator,
)

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

with DAG(
    dag_id="example_pgq_setup",
    schedule=None,
    start_date=START,
    catchup=False,
    tags=["pgq", "example"],
) as setup_dag:
    source_queue = PgqCreateQueueOperator(
        task_id="create_source_queue",
        pgq_conn_id="pgq_source",
        queue_name="orders",
        # batches at least every 2 s while events arrive, sooner after 1000 events
        queue_config={"ticker_max_lag": "2 seconds", "ticker_max_count": 1000},
    )
    target_queue = PgqCreateQueueOperator(
        task_id="create_target_queue", pgq_conn_id="pgq_target", queue_name="orders"
    )
    consumer = PgqRegisterConsumerOperator(
        task_id="register_mover", pgq_conn_id="pgq_source", queue_name="orders", consumer_name="orders_mover"
    )
    source_queue >> consumer

with DAG(
    dag_id="example_pgq_ticker",
    schedule=dt.timedelta(minutes=1),
    start_date=START,
    catchup=False,
    max_active_runs=1,
    tags=["pgq", "example"],
) as ticker_dag:
    PgqTickerOperator(task_id="tick_source", pgq_conn_id="pgq_source", queue_name="orders")
