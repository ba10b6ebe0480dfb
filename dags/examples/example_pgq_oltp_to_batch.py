"""Hourly move of an OLTP database's event queue to a batch server's queue.

Connections (any ``postgres``/``pgq`` connection works, e.g. environment variables
``AIRFLOW_CONN_PGQ_OLTP=postgresql://mover:...@oltp-host:5432/shop``):

* ``pgq_oltp``  - the OLTP database with the source queue ``eventlog``;
* ``pgq_batch`` - the batch server's database with the target queue ``eventlog``.

Each run first asks the source to cut a tick (``force_tick``), so it drains every
event committed before the run started; pgqd must be ticking the OLTP database.
``max_runtime`` keeps a run inside its hour even after an outage; what is left is
moved by the next run. Retries are safe: batches that reached the batch server are
recognised through its pgq_ext and not applied again.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

with DAG(
    dag_id="example_pgq_oltp_to_batch",
    schedule="@hourly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=1)},
    tags=["pgq", "example"],
) as dag:
    PgqQueueMoverOperator(
        task_id="move_eventlog",
        source_conn_id="pgq_oltp",
        target_conn_id="pgq_batch",
        source_queue="eventlog",
        target_queue="eventlog",
        consumer_name="eventlog_to_batch_mover",
        force_tick=True,
        max_runtime=dt.timedelta(minutes=50),
        max_events=50_000_000,
        min_batch_events=10_000,
        register_consumer=True,
        install_pgq_ext=True,
        outlet_asset=True,
    )
