"""DAGs the tests need beyond the examples: an injected failure on the first try,
and templated parameters."""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import DAG, Context

from airflow_provider_pgq.core import faults
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator


class InjectedFault(RuntimeError):
    pass


class FailFirstTryMover(PgqQueueMoverOperator):
    """Dies at a fault point during the second batch of its first try."""

    fault_point = faults.AFTER_TARGET_COMMIT

    def make_mover(self, source: Any, target: Any, options: MoverOptions, context: Context) -> QueueMover:
        hits = {"n": 0}

        def fault(point: str) -> None:
            if point == self.fault_point and context["ti"].try_number == 1:
                hits["n"] += 1
                if hits["n"] == 2:
                    raise InjectedFault(f"injected at {point}")

        return QueueMover(source, target, options, fault=fault, on_batch=self._log_batch)


class FailMappedFirstTryMidStream(PgqQueueMoverOperator):
    """Map index 1 dies in the middle of its third batch's COPY on its first try: two
    batches committed, the third rolled back."""

    def make_mover(self, source: Any, target: Any, options: MoverOptions, context: Context) -> QueueMover:
        hits = {"n": 0}
        ti = context["ti"]

        def fault(point: str) -> None:
            if point == faults.MID_STREAM and ti.map_index == 1 and ti.try_number == 1:
                hits["n"] += 1
                if hits["n"] == 3:
                    raise InjectedFault(f"injected at {point}")

        return QueueMover(source, target, options, fault=fault, on_batch=self._log_batch)


START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

with DAG("pgq_test_retry", schedule=None, start_date=START, catchup=False) as retry_dag:
    FailFirstTryMover(
        task_id="move",
        source_conn_id="pgq_src",
        target_conn_id="pgq_dst",
        source_queue="src_q",
        target_queue="dst_q",
        consumer_name="retry_mover",
        retries=1,
        retry_delay=dt.timedelta(seconds=1),
        max_batches=1000,
        batch_target_events=1,  # one tick a batch: the fault hits the second of four
    )

with DAG("pgq_test_retry_mapped", schedule=None, start_date=START, catchup=False) as retry_mapped_dag:
    FailMappedFirstTryMidStream.partial(
        task_id="move",
        source_conn_id="pgq_src",
        target_conn_id="pgq_dst",
        target_queue="dst_q",
        retries=1,
        retry_delay=dt.timedelta(seconds=1),
        batch_target_events=1,  # one tick a batch
    ).expand_kwargs([
        {"source_queue": "src_a", "consumer_name": "mover_a"},
        {"source_queue": "src_b", "consumer_name": "mover_b"},
    ])

with DAG(
    "pgq_test_templated", schedule=None, start_date=START, catchup=False,
    params={"source_queue": "src_q", "target_queue": "dst_q", "suffix": "x"},
) as templated_dag:
    PgqQueueMoverOperator(
        task_id="move",
        source_conn_id="{{ 'pgq_' + 'src' }}",
        target_conn_id="pgq_dst",
        source_queue="{{ params.source_queue }}",
        target_queue="{{ params.target_queue }}",
        consumer_name="mover_{{ params.suffix }}",
        subconsumer="{{ dag.dag_id }}",
        register_consumer=True,
    )

with DAG(
    "pgq_test_reposition", schedule=None, start_date=START, catchup=False, params={"reposition": ""},
) as reposition_dag:
    PgqQueueMoverOperator(
        task_id="move",
        source_conn_id="pgq_src",
        target_conn_id="pgq_dst",
        source_queue="src_q",
        target_queue="dst_q",
        consumer_name="mover",
        reposition="{{ params.reposition }}",
        batch_target_events=1,  # one tick a batch, as the CLI of the switch test
    )
