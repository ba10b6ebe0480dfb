"""The DAG whose OpenLineage events tests/operators/test_lineage.py reads."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

with DAG("pgq_test_lineage", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
         catchup=False):
    PgqQueueMoverOperator(
        task_id="move", source_conn_id="pgq_src", target_conn_id="pgq_dst",
        source_queue="src_q", target_queue="dst_q", consumer_name="lineage_mover",
    )
