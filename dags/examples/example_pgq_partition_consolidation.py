"""Many partition databases merged into one central queue.

One mapped task per partition (``.partial().expand_kwargs()`` over connection ids),
each under its own tracking key on the central database (subconsumer = the
partition's connection id), so the partitions' tick numbers never mix. A partition
that is down fails its own mapped task only: the other partitions still move, the
report still runs and counts (and names the partitions that did not report), and the
run ends failed through ``all_partitions_moved``, so a failure is never hidden behind
a green run. Clearing the failed map index retries that partition alone.

Connections: ``pgq_part_0``, ``pgq_part_1``, ``pgq_part_2`` (override the list with
the environment variable ``PGQ_PARTITION_CONN_IDS=conn_a,conn_b,...``), each with a
queue ``events``; ``pgq_central`` with the queue ``events_all``. pgqd must tick the
partitions.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

from airflow_provider_pgq.hooks.pgq import PgqHook
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

PARTITIONS = os.environ.get("PGQ_PARTITION_CONN_IDS", "pgq_part_0,pgq_part_1,pgq_part_2").split(",")

with DAG(
    dag_id="example_pgq_partition_consolidation",
    schedule="*/15 * * * *",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["pgq", "example"],
) as dag:
    moves = PgqQueueMoverOperator.partial(
        task_id="move_partition",
        target_conn_id="pgq_central",
        source_queue="events",
        target_queue="events_all",
        consumer_name="consolidate_events",
        force_tick=True,
        register_consumer=True,
        install_pgq_ext=True,
    ).expand_kwargs([{"source_conn_id": c, "subconsumer": c} for c in PARTITIONS])

    @task(trigger_rule="all_done")
    def report_central(reports: Any) -> dict[str, Any]:
        """Sums what the partitions moved and counts the central queue.

        A failed partition left no result: the results are read as one slice (iterating
        the lazy sequence would probe one index past the end and log "XCom not found"),
        and the partitions are matched by their subconsumer, not by position.
        """
        done = [r for r in reports[:] if r]
        missing = sorted(set(PARTITIONS) - {r["subconsumer"] for r in done})
        central = PgqHook("pgq_central").count_events("events_all")
        summary = {
            "partitions_moved": len(done),
            "partitions_failed": missing,
            "events_moved": sum(r["events"] for r in done),
            "central_events": central,
        }
        print(f"central queue events_all: {summary}")
        return summary

    report_central(moves.output)
    # The run's state: all_success over every partition, so one failed mover fails the run
    # (the report above, all_done, would otherwise be the only leaf and always succeed).
    moves >> EmptyOperator(task_id="all_partitions_moved")
