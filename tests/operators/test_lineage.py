"""OpenLineage (issue 24, point 5): a DAG run through real Airflow with the openlineage
provider writing to a file transport; the events it emitted name the source and target
queues as the postgres provider names tables, count the moved events and carry the tick
range. Without the provider the operator stays silent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.airflow.runner import read_result
from tests.helpers import ROOT, Server, produce, queue_events, register, simple_events, tick

DAGS = Path(__file__).parent / "lineage_dags"
JOB = "pgq_test_lineage.move"


@pytest.fixture
def lineage_home(airflow_home: Path, tmp_path: Path) -> Path:
    """A copy of the session's migrated Airflow home, for runs with OpenLineage on."""
    home = tmp_path / "airflow_home"
    shutil.copytree(airflow_home, home, ignore=shutil.ignore_patterns("worker.stderr", "logs"))
    return home


def _run(home: Path, conns: dict[str, str], logical_date: str, events_file: Path) -> dict[str, Any]:
    """One `dag.test()` of the lineage DAG in a fresh Airflow process with the openlineage
    provider's file transport on (its config is read once per process, so not the shared worker)."""
    # The tests package through a folder of its own, not the checkout: the checkout's
    # airflow_provider_pgq.egg-info beside the installed package lists the pgq plugin twice,
    # and Airflow 3.3.2's task-side plugin loader stops at the first repeated name, so the
    # openlineage plugin after it would never load (README, "Lineage").
    path = home / "pythonpath"
    if not path.exists():
        path.mkdir()
        (path / "tests").symlink_to(ROOT / "tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "OPENLINEAGE"))}
    env.update({f"AIRFLOW_CONN_{k.upper()}": v for k, v in conns.items()})
    env.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "PYTHONPATH": str(path),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "pgq-tests",
    })
    done = subprocess.run([sys.executable, "-m", "tests.airflow.runner", "pgq_test_lineage", logical_date],
                          env=env, cwd=path, capture_output=True, text=True, timeout=600)
    result = read_result(done.stdout)
    assert result is not None, f"rc {done.returncode}:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    result["log"] = done.stdout + done.stderr
    return result


def _task_events(events_file: Path, logical_date: str) -> dict[str, dict[str, Any]]:
    """The mover task's OpenLineage events of the Airflow run of that logical date, by eventType."""
    found: dict[str, dict[str, Any]] = {}
    for line in events_file.read_text().splitlines():
        event = json.loads(line)
        dag_run = event["run"]["facets"].get("airflow", {}).get("dagRun", {})
        if event["job"]["name"] == JOB and dag_run.get("logical_date") == logical_date:
            assert event["eventType"] not in found, f"two {event['eventType']} events for {JOB} of {logical_date}"
            found[event["eventType"]] = event
    return found


def _postgres_provider_address(server: Server) -> tuple[str, str]:
    """How apache-airflow-providers-postgres names the same connection: (namespace, database)."""
    from airflow.models.connection import Connection
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    info = PostgresHook().get_openlineage_database_info(Connection(conn_id="x", uri=server.uri()))
    return f"{info.scheme}://{info.authority}", str(info.database)


def test_a_run_that_moved_events_reports_both_queues_the_count_and_the_ticks(
        source: Server, target: Server, lineage_home: Path, tmp_path: Path) -> None:
    register(source, "src_q", "lineage_mover")
    produce(source, "src_q", simple_events(123))
    tick(source, "src_q")
    produce(source, "src_q", simple_events(77, start=123))
    tick(source, "src_q")
    events_file = tmp_path / "openlineage.jsonl"
    conns = {"pgq_src": source.uri(), "pgq_dst": target.uri()}

    first, second = "2026-06-01T12:00:00+00:00", "2026-06-01T13:00:00+00:00"
    moved = _run(lineage_home, conns, first, events_file)
    assert moved["state"] == "success", moved["log"][-5000:]
    report = moved["xcom"]["move[-1]"]
    assert report["events"] == 200 and queue_events(target, "dst_q") == queue_events(source, "src_q")
    events = _task_events(events_file, first)
    assert set(events) == {"START", "COMPLETE"}, (events.keys(), moved["log"][-5000:])

    # START: the run has not moved anything yet, so it names no dataset
    assert events["START"]["inputs"] == [] and events["START"]["outputs"] == []
    complete = events["COMPLETE"]
    [source_ds], [target_ds] = complete["inputs"], complete["outputs"]
    for ds, server, queue in ((source_ds, source, "src_q"), (target_ds, target, "dst_q")):
        namespace, database = _postgres_provider_address(server)
        assert ds["namespace"] == namespace and namespace.startswith("postgres://")
        assert ds["name"] == f"{database}.pgq.{queue}" and database == server.dbname
    assert target_ds["outputFacets"]["outputStatistics"]["rowCount"] == 200
    ticks = source_ds["inputFacets"]["pgqTickRange"]
    [[last_tick]] = source.execute("select last_tick from pgq.get_consumer_info('src_q', 'lineage_mover')")
    assert (ticks["firstTick"], ticks["lastTick"]) == (report["first_tick"], report["last_tick"])
    assert ticks["lastTick"] == last_tick and ticks["firstTick"] < last_tick
    assert (ticks["batches"], ticks["consumer"], ticks["subconsumer"]) == (report["batches"], "lineage_mover", "")
    assert ticks["_schemaURL"].endswith("PgqTickRangeInputDatasetFacet:1-0-0")

    # a run that found nothing to move names no dataset either
    idle = _run(lineage_home, conns, second, events_file)
    assert idle["state"] == "success" and idle["xcom"]["move[-1]"]["events"] == 0, idle["log"][-5000:]
    idle_events = _task_events(events_file, second)
    assert set(idle_events) == {"START", "COMPLETE"}
    assert all(e["inputs"] == [] and e["outputs"] == [] for e in idle_events.values())


_WITHOUT_PROVIDER = r"""
import sys, warnings
warnings.simplefilter("error")
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
op = PgqQueueMoverOperator(task_id="m", source_conn_id="s", target_conn_id="t", source_queue="a", target_queue="b")
op._lineage = ({"events": 5, "first_tick": 1, "last_tick": 2, "batches": 1}, ("postgres://h:1", "d.pgq.a"),
               ("postgres://h:1", "d.pgq.b"))
# from here on neither package can be imported, as when they are not installed (Airflow's
# own start-up, which reads the installed providers' entry points, is over)
for name in [m for m in sys.modules if m.startswith(("openlineage", "airflow.providers.openlineage"))]:
    del sys.modules[name]
sys.modules["openlineage"] = sys.modules["airflow.providers.openlineage"] = None
print("ANSWER", op.get_openlineage_facets_on_complete(None))
"""

_NOT_IMPORTED = r"""
import sys
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
print("LOADED", sorted(m for m in sys.modules if m.startswith(("openlineage", "airflow_provider_pgq.operators.lineage",
                                                                  "airflow.providers.openlineage.extractors"))))
"""


def test_without_the_provider_the_operator_says_nothing(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")},
           "AIRFLOW_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_PROVIDER], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout.strip().splitlines()[-1] == "ANSWER None"
    assert "lineage" not in done.stderr.lower(), done.stderr
    # and importing the operator loads neither the openlineage client nor the provider's
    # extractors (Airflow itself reads every provider's get_provider_info): only a call does
    done = subprocess.run([sys.executable, "-c", _NOT_IMPORTED], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"


def test_names_for_connections_without_port_host_or_database(source: Server) -> None:
    from airflow.models.connection import Connection
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from airflow_provider_pgq.operators.queue_mover import queue_dataset_address

    conn = source.connect()
    try:
        # no port: 5432, as the postgres provider says for the same connection
        provider = PostgresHook().get_openlineage_database_info(Connection(conn_id="x", uri="postgresql://u@DB.Example/app"))
        assert queue_dataset_address({"host": "DB.Example", "dbname": "app"}, "q", conn) == (
            f"{provider.scheme}://{provider.authority}", "app.pgq.q")
        # no host: libpq's local socket; no database: the one the session is in
        assert queue_dataset_address({}, "q", conn) == ("postgres://localhost:5432", f"{source.dbname}.pgq.q")
    finally:
        conn.close()
