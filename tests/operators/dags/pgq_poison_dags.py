"""Test DAGs for poison events (issue 24): the default stop, and invalid_events = dead_letter."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

with DAG("pgq_test_poison_stop", schedule=None, start_date=START, catchup=False) as stop_dag:
    PgqQueueMoverOperator(
        task_id="move", source_conn_id="pgq_src", target_conn_id="pgq_dst",
        source_queue="src_q", target_queue="dst_q", consumer_name="mover",
    )

with DAG("pgq_test_poison_dead_letter", schedule=None, start_date=START, catchup=False) as dead_letter_dag:
    PgqQueueMoverOperator(
        task_id="move", source_conn_id="pgq_src", target_conn_id="pgq_dst",
        source_queue="src_q", target_queue="dst_q", consumer_name="mover",
        invalid_events="dead_letter",
    )
