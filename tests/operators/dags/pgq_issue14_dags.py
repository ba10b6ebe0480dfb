"""Test DAGs for the mover operator's defaults: outlet asset events and register_at."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

with DAG("pgq_test_outlet", schedule=None, start_date=START, catchup=False) as outlet_dag:
    PgqQueueMoverOperator(
        task_id="move", source_conn_id="pgq_src", target_conn_id="pgq_dst",
        source_queue="src_q", target_queue="dst_q", consumer_name="outlet_mover",
        outlet_asset=True,
    )

with DAG("pgq_test_register_oldest", schedule=None, start_date=START, catchup=False) as oldest_dag:
    PgqQueueMoverOperator(
        task_id="move", source_conn_id="pgq_src", target_conn_id="pgq_dst",
        source_queue="src_q", target_queue="dst_q", consumer_name="oldest_mover",
        register_consumer=True, register_at="oldest",
    )
