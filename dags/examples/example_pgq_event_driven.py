"""Event-driven moves: the DAG runs when the source queue has events waiting, not on a clock.

The Asset ``pgq_orders_waiting`` is watched in the triggerer by
``MessageQueueTrigger(scheme="pgq", ...)``, which this provider resolves to
``PgqQueueEventTrigger``: it polls the mover's consumer on the source queue
(positions only, it takes no batch) and fires an asset event whenever a batch with
at least ``min_events`` events has become available. Each asset event starts a run
of this DAG, whose task drains the queue exactly once into the target. Asset events
that arrive while a run is queued fold into it; an extra run finds nothing to move.

What must run: the scheduler, a triggerer (``airflow triggerer``) with this provider
installed in its environment, and a ticker for the source database (pgqd, or the
``example_pgq_ticker`` DAG): without new ticks no batch becomes available.
Run ``example_pgq_setup`` once first: it creates the queues and registers the
consumer ``orders_mover`` the watcher waits on.

Connections: ``pgq_source`` (queue ``orders``), ``pgq_target`` (queue ``orders``).
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import DAG, Asset, AssetWatcher

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

orders_waiting = Asset(
    "pgq_orders_waiting",
    watchers=[
        AssetWatcher(
            name="pgq_orders_waiting",
            trigger=MessageQueueTrigger(
                scheme="pgq",
                pgq_conn_id="pgq_source",
                queue_name="orders",
                consumer_name="orders_mover",
                min_events=1,
                max_lag=300.0,
                poll_interval=5.0,
            ),
        )
    ],
)

with DAG(
    dag_id="example_pgq_event_driven",
    schedule=[orders_waiting],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=30)},
    tags=["pgq", "example"],
) as dag:
    PgqQueueMoverOperator(
        task_id="move_orders",
        source_conn_id="pgq_source",
        target_conn_id="pgq_target",
        source_queue="orders",
        target_queue="orders",
        consumer_name="orders_mover",
        max_runtime=dt.timedelta(minutes=10),
        install_pgq_ext=True,
        outlet_asset=True,
    )
