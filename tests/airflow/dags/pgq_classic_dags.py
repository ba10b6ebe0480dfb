"""Issue 11's operator DAG: table_filter (skytools' key as an operator argument), with
a crash in the middle of the first try's first batch."""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import DAG, Context

from airflow_provider_pgq.core import faults
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator


class CrashMidStreamOnFirstTry(PgqQueueMoverOperator):
    def make_mover(self, source: Any, target: Any, options: MoverOptions, context: Context) -> QueueMover:
        def fault(point: str) -> None:
            if point == faults.MID_STREAM and context["ti"].try_number == 1:
                raise RuntimeError("injected mid-stream crash")

        return QueueMover(source, target, options, fault=fault, on_batch=self._log_batch)


with DAG("pgq_test_table_filter", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
         catchup=False):
    CrashMidStreamOnFirstTry(
        task_id="move",
        source_conn_id="pgq_src",
        target_conn_id="pgq_dst",
        source_queue="src_q",
        target_queue="dst_q",
        consumer_name="filter_mover",
        table_filter=["orders", "public.users"],
        keep_lag=dt.timedelta(seconds=1),
        retries=1,
        retry_delay=dt.timedelta(seconds=1),
    )
