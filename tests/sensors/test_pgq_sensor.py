"""PgqQueueSensor through real Airflow (dag.test in a subprocess) against a real database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_provider_pgq.sensors.pgq import PgqQueueSensor
from airflow_provider_pgq.triggers.pgq import APPLICATION_NAME
from tests.helpers import DagRunner, Server, produce, register, simple_events, tick_plain

DAGS = Path(__file__).parent / "dags"


@pytest.fixture
def src(make_db) -> Server:
    """src_q ticking on every new event; one event ticked before 'mover' registers, so
    PgQ's pending estimate is exact from then on (it is one low on an unused queue)."""
    db = make_db(queue="src_q")
    db.execute("select pgq.set_queue_config('src_q', 'ticker_max_count', '1')")
    produce(db, "src_q", simple_events(1, start=-1))
    tick_plain(db, "src_q")
    register(db, "src_q", "mover")
    register(db, "src_q", "mover2")
    return db


def test_poke_mode(src, run_dag: DagRunner):  # noqa: F811
    produce(src, "src_q", simple_events(4))
    tick_plain(src, "src_q")
    result = run_dag("pgq_test_sensor_poke", {"pgq_src": src.uri()}, dags_folder=DAGS)
    tasks, log = result["tasks"], result["log"]

    # enough events: success, the consumer's status as XCom
    assert tasks["wait[-1]"] == "success", log[-3000:]
    status = result["xcom"]["wait[-1]"]
    assert status["pending_events"] == 4 and status["batch_available"] is True
    assert status["newest_tick"] > status["last_tick"]

    # below min_events: it keeps poking until its timeout
    assert tasks["too_few[-1]"] == "failed"
    assert "Sensor has timed out" in log
    assert log.count("consumer 'mover2' on 'src_q': last tick") >= 2

    # a consumer that is not registered fails at once, saying what to do
    assert tasks["nobody[-1]"] == "failed"
    assert "consumer 'nobody' is not registered on queue 'src_q'" in log
    assert "pgq.register_consumer('src_q', 'nobody')" in log

    # the sensors only looked: both consumers still have all four waiting, no batch open
    assert src.execute("select consumer_name, current_batch, pending_events"
                       " from pgq.get_consumer_info('src_q', null)") == [("mover", None, 4), ("mover2", None, 4)]


def _trigger_sessions(db: Server) -> int:
    return int(db.execute(
        "select count(*) from pg_stat_activity where datname = %s and application_name = %s",
        (db.dbname, APPLICATION_NAME))[0][0])


def test_deferrable_mode_waits_in_the_trigger_then_resumes(src, run_dag: DagRunner):  # noqa: F811
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_dag, "pgq_test_sensor_deferrable", {"pgq_src": src.uri()}, dags_folder=DAGS)
        # the task has deferred once the trigger's poll session shows up in the database
        deadline = time.monotonic() + 240
        while _trigger_sessions(src) == 0:
            assert not future.done(), future.result()["log"][-3000:]
            assert time.monotonic() < deadline, "the sensor never deferred to its trigger"
            time.sleep(0.1)
        produce(src, "src_q", simple_events(5))
        tick_plain(src, "src_q")
        result = future.result(timeout=300)
    assert result["state"] == "success", result["log"][-3000:]
    assert "running trigger in line" in result["log"]
    status = result["xcom"]["wait[-1]"]
    assert status["pending_events"] == 5 and status["consumer_name"] == "mover" and "status" not in status


def test_bad_threshold_fails_at_parse_time():
    with pytest.raises(ValueError):
        PgqQueueSensor(task_id="x", pgq_conn_id="c", queue_name="q", consumer_name="m", min_events=-1)


def test_old_consumer_parameter_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="consumer_name"):
        sensor = PgqQueueSensor(task_id="x", pgq_conn_id="c", queue_name="q", consumer="m")
    assert sensor.consumer_name == "m" and "consumer_name" in sensor.template_fields
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="consumer_name only"):
        PgqQueueSensor(task_id="y", pgq_conn_id="c", queue_name="q", consumer="m", consumer_name="n")
    with pytest.raises(TypeError, match="needs consumer_name"):
        PgqQueueSensor(task_id="z", pgq_conn_id="c", queue_name="q")


def test_old_consumer_parameter_polls_the_same_consumer(src, monkeypatch):
    """The deprecated name reaches the real check: the poke reads that consumer."""
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", src.uri())
    produce(src, "src_q", simple_events(2))
    tick_plain(src, "src_q")
    with pytest.warns(DeprecationWarning):
        sensor = PgqQueueSensor(task_id="old", pgq_conn_id="pgq_src", queue_name="src_q", consumer="mover2")
    poke = sensor.poke({})  # type: ignore[arg-type]
    assert poke.is_done and poke.xcom_value["consumer_name"] == "mover2"
    assert poke.xcom_value["pending_events"] == 2


_DEFERRABLE_DEFAULT = (
    "from airflow_provider_pgq.sensors.pgq import PgqQueueSensor;"
    "s = PgqQueueSensor(task_id='x', pgq_conn_id='c', queue_name='q', consumer_name='m');"
    "print('DEFERRABLE', s.deferrable)"
)


@pytest.mark.parametrize("setting", [None, "True", "False"])
def test_deferrable_defaults_to_operators_default_deferrable(airflow_home, setting):
    """As Airflow's own sensors: ``[operators] default_deferrable`` decides when the DAG
    does not say (read when the module is imported, hence a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env["AIRFLOW_HOME"] = str(airflow_home)
    if setting is not None:
        env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = setting
    out = subprocess.run([sys.executable, "-c", _DEFERRABLE_DEFAULT], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert f"DEFERRABLE {setting == 'True'}" in out, out
