"""Interval-aligned moves, meant to be backfilled or cleared from the UI.

Every run moves only batches whose end tick is not later than its
``data_interval_end`` (``stop_at_interval_end=True``). What a backfill does here:

* runs for old intervals whose events were already moved find their batches marked
  in the target's pgq_ext (or already finished on the source) and move nothing:
  nothing is applied twice;
* runs for intervals that were missed (the task was off, the target was down) move
  the batches of their interval, in tick order, because PgQ hands batches out
  strictly in order; a batch that ends after the interval is left for the next run;
* clearing a run re-executes it with the same bound: same result.

Connections: ``pgq_source`` (queue ``events``), ``pgq_target`` (queue ``events``).
The source's ticker (pgqd) cuts the ticks; this DAG never forces one, so the batch
boundaries stay those of the ticker.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

with DAG(
    dag_id="example_pgq_backfill",
    schedule="@hourly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["pgq", "example"],
) as dag:
    PgqQueueMoverOperator(
        task_id="move_interval",
        source_conn_id="pgq_source",
        target_conn_id="pgq_target",
        source_queue="events",
        target_queue="events",
        consumer_name="events_backfill_mover",
        stop_at_interval_end=True,
        register_consumer=True,
        install_pgq_ext=True,
    )
