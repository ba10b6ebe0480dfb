"""Test DAGs for PgqQueueSensor.

``pgq_test_sensor_poke`` runs three independent poke-mode sensors in one DAG run (one
Airflow start-up instead of three): ``wait`` (3 events suffice), ``too_few`` (needs
100, times out after 1 s) and ``nobody`` (an unregistered consumer).
``pgq_test_sensor_deferrable`` waits in the trigger.

Connection ``pgq_src``: a database with queue ``src_q`` and consumers ``mover`` and ``mover2``.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from airflow_provider_pgq.sensors.pgq import PgqQueueSensor

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
COMMON = {"pgq_conn_id": "pgq_src", "queue_name": "src_q", "poke_interval": 0.2, "timeout": 120}

with DAG("pgq_test_sensor_poke", schedule=None, start_date=START, catchup=False) as poke_dag:
    PgqQueueSensor(task_id="wait", consumer_name="mover", min_events=3, **COMMON)  # type: ignore[arg-type]
    PgqQueueSensor(task_id="too_few", consumer_name="mover2", min_events=100,
                   **{**COMMON, "timeout": 1})  # type: ignore[arg-type]
    PgqQueueSensor(task_id="nobody", consumer_name="nobody", **COMMON)  # type: ignore[arg-type]

with DAG("pgq_test_sensor_deferrable", schedule=None, start_date=START, catchup=False) as deferrable_dag:
    PgqQueueSensor(task_id="wait", consumer_name="mover", min_events=3, deferrable=True,
                   **COMMON)  # type: ignore[arg-type]
