"""DAGs the deployment test drives through the REST API (see tests/system/test_deployment.py).

Connections (environment of every Airflow process): ``pgq_sys_src`` and ``pgq_sys_dst``;
each scenario has its own queue pair there, so the scenarios never share a consumer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import DAG, Asset, AssetWatcher, Context
from psycopg2.extensions import connection as Psycopg2Connection

from airflow_provider_pgq.core.mover import BatchResult, MoverOptions, QueueMover
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
from airflow_provider_pgq.sensors.pgq import PgqQueueSensor

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
CONNS: dict[str, Any] = {"source_conn_id": "pgq_sys_src", "target_conn_id": "pgq_sys_dst", "install_pgq_ext": True}


class SlowMover(PgqQueueMoverOperator):
    """Pauses after each batch, so the test can act on a task that is mid-drain (a real
    worker slowed down, not a mock: every batch still goes through the real protocol)."""

    pause = 1.0

    def make_mover(self, source: Psycopg2Connection, target: Psycopg2Connection, options: MoverOptions,
                   context: Context) -> QueueMover:
        def after(result: BatchResult) -> None:
            self._log_batch(result)
            time.sleep(self.pause)

        return QueueMover(source, target, options, on_batch=after)


# Backfills: daily intervals, each run moves only batches ending inside its interval.
with DAG("pgq_sys_backfill", schedule="@daily", start_date=START, catchup=False, max_active_runs=16) as bf:
    PgqQueueMoverOperator(
        task_id="move", **CONNS, source_queue="bf", target_queue="bf", consumer_name="bf_mover",
        stop_at_interval_end=True, register_consumer=True,
    )

class SpanRecordingMover(SlowMover):
    """Writes when each instance's drain began and ended (after its turn was given) to the
    file PGQ_TEST_SPANS names, so the test can check that no two drains of one map index
    overlapped (the task instance's own dates include the time it spent rescheduled). The
    pause after each batch makes a drain last long enough for overlaps to show."""

    def make_mover(self, source: Psycopg2Connection, target: Psycopg2Connection, options: MoverOptions,
                   context: Context) -> QueueMover:
        self._began = time.time()
        return super().make_mover(source, target, options, context)

    def execute(self, context: Context) -> dict[str, Any]:
        report = super().execute(context)
        ti = context["ti"]
        line = json.dumps({"run_id": ti.run_id, "map_index": ti.map_index, "began": self._began,
                           "ended": time.time(), "events": report["events"]})
        with open(os.environ["PGQ_TEST_SPANS"], "a") as spans:
            spans.write(line + "\n")
        return report


# Backfills of a mapped mover: two sources (queues bm0, bm1), one map index each.
with DAG("pgq_sys_backfill_mapped", schedule="@daily", start_date=START, catchup=False,
         max_active_runs=16) as bfm:
    SpanRecordingMover.partial(
        # retries: Airflow's own race (operators/turns.py) must not fail the run; a retry is a
        # new try number, and the drains it records still have to be one at a time
        task_id="move", **CONNS, stop_at_interval_end=True, register_consumer=True, turn_poll=8,
        retries=2, retry_delay=dt.timedelta(seconds=1),
    ).expand_kwargs([{"source_queue": q, "target_queue": q, "consumer_name": f"{q}_mover"} for q in ("bm0", "bm1")])

# Triggered, cleared, marked failed, killed.
with DAG("pgq_sys_drain", schedule=None, start_date=START, catchup=False, max_active_runs=4) as drain:
    # min_batch_events=1: one tick per batch (no catch-up coalescing), so a drain has steps.
    SlowMover(task_id="move", **CONNS, source_queue="dr", target_queue="dr", consumer_name="dr_mover",
              min_batch_events=1)

# A deferred sensor woken by the triggerer, then the move.
with DAG("pgq_sys_sensor", schedule=None, start_date=START, catchup=False) as sensor:
    wait = PgqQueueSensor(
        task_id="wait", pgq_conn_id="pgq_sys_src", queue_name="sn", consumer_name="sn_mover",
        min_events=1, deferrable=True, poke_interval=1, timeout=180,
    )
    wait >> PgqQueueMoverOperator(task_id="move", **CONNS, source_queue="sn", target_queue="sn",
                                  consumer_name="sn_mover")

# Event-driven: the triggerer's watcher creates the runs.
waiting: Any = Asset("pgq_sys_ed_waiting", watchers=[AssetWatcher(
    name="pgq_sys_ed_waiting",
    trigger=MessageQueueTrigger(scheme="pgq", pgq_conn_id="pgq_sys_src", queue_name="ed",
                                consumer_name="ed_mover", min_events=1, poll_interval=1.0),
)])

with DAG("pgq_sys_event", schedule=[waiting], start_date=START, catchup=False, max_active_runs=1) as event:
    PgqQueueMoverOperator(task_id="move", **CONNS, source_queue="ed", target_queue="ed", consumer_name="ed_mover")


# Templated queue names: the PgQ page reads such a mover as its last run rendered it.
with DAG("pgq_sys_templated", schedule=None, start_date=START, catchup=False, params={"queue": "tq"}) as templated:
    PgqQueueMoverOperator(task_id="move", **CONNS, source_queue="{{ params.queue }}",
                          target_queue="{{ params.queue }}", consumer_name="tq_mover", register_consumer=True)
