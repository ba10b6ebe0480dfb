"""Finding movers in serialized DAGs: the real DagSerialization of real DAG objects."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
from typing import Any

import pytest
from airflow.sdk import DAG, task
from airflow.serialization.serialized_objects import DagSerialization

from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
from airflow_provider_pgq.ui.movers import movers_in_dag, with_rendered_values
from tests.helpers import EXAMPLES

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
CONNS = {"source_conn_id": "src", "target_conn_id": "dst"}


def _serialized(dag: DAG) -> dict[str, Any]:
    return DagSerialization.to_dict(dag)


def _example(name: str, monkeypatch: pytest.MonkeyPatch) -> DAG:
    monkeypatch.setenv("PGQ_PARTITION_CONN_IDS", "part_a,part_b")
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == name)


def test_a_plain_mover_and_its_defaults() -> None:
    with DAG("d", schedule=None, start_date=START) as dag:
        PgqQueueMoverOperator(task_id="m", **CONNS, source_queue="a", target_queue="b")
        PgqQueueMoverOperator(task_id="n", **CONNS, source_queue="a", target_queue="b", consumer_name="c",
                              subconsumer="s")
    found = {m.key: m for m in movers_in_dag("d", _serialized(dag))}
    assert set(found) == {"d.m", "d.n"}
    assert (found["d.m"].consumer_name, found["d.m"].subconsumer) == ("d.m", "")
    assert (found["d.n"].consumer_name, found["d.n"].subconsumer) == ("c", "s")
    assert found["d.m"].live and found["d.m"].source_queue == "a" and found["d.m"].target_conn_id == "dst"


def test_the_example_dags(monkeypatch: pytest.MonkeyPatch) -> None:
    oltp = list(movers_in_dag("example_pgq_oltp_to_batch",
                              _serialized(_example("example_pgq_oltp_to_batch", monkeypatch))))
    assert [(m.task_id, m.consumer_name, m.source_conn_id) for m in oltp] == [
        ("move_eventlog", "eventlog_to_batch_mover", "pgq_oltp")]
    parts = list(movers_in_dag("p", _serialized(_example("example_pgq_partition_consolidation", monkeypatch))))
    assert [(m.key, m.source_conn_id, m.subconsumer, m.target_queue) for m in parts] == [
        ("p.move_partition[0]", "part_a", "part_a", "events_all"),
        ("p.move_partition[1]", "part_b", "part_b", "events_all"),
    ]
    assert all(m.live and m.consumer_name == "consolidate_events" for m in parts)


def test_a_subclass_defined_in_a_dag_file_is_a_mover_and_other_tasks_are_not() -> None:
    class LocalMover(PgqQueueMoverOperator):
        pass

    with DAG("d", schedule=None, start_date=START) as dag:
        LocalMover(task_id="m", **CONNS, source_queue="a", target_queue="b")

        @task
        def other() -> None:
            pass

        other()
    assert [m.key for m in movers_in_dag("d", _serialized(dag))] == ["d.m"]


def test_templated_values_are_shown_but_not_read() -> None:
    with DAG("d", schedule=None, start_date=START) as dag:
        PgqQueueMoverOperator(task_id="m", **CONNS, source_queue="{{ params.q }}", target_queue="b")
    (mover,) = movers_in_dag("d", _serialized(dag))
    assert not mover.live and "source_queue" in (mover.problem or "")
    assert mover.source_queue == "{{ params.q }}"


def test_expand_of_one_list_in_airflows_order() -> None:
    with DAG("d", schedule=None, start_date=START) as dag:
        PgqQueueMoverOperator.partial(task_id="m", target_conn_id="dst", source_queue="q",
                                      target_queue="t").expand(source_conn_id=["a", "b", "c"])
    found = [(m.map_index, m.source_conn_id) for m in movers_in_dag("d", _serialized(dag))]
    assert found == [(0, "a"), (1, "b"), (2, "c")]


def test_expand_of_several_lists_is_not_guessed() -> None:
    """Airflow numbers these by the DAG file's keyword order; the stored DAG (jsonb on
    PostgreSQL, sorted keys when compressed) does not keep it: one row that says so."""
    with DAG("d", schedule=None, start_date=START) as dag:
        PgqQueueMoverOperator.partial(task_id="m", target_conn_id="dst", target_queue="t").expand(
            source_queue=["q1", "q2"], source_conn_id=["a", "b"])
    (mover,) = movers_in_dag("d", json.loads(json.dumps(_serialized(dag), sort_keys=True)))
    assert mover.map_index == -1 and not mover.live and "several lists" in (mover.problem or "")


def test_mapping_over_run_time_values_is_one_row_that_says_so() -> None:
    with DAG("d", schedule=None, start_date=START) as dag:
        @task
        def sources() -> list[str]:
            return ["a"]

        PgqQueueMoverOperator.partial(task_id="m", target_conn_id="dst", source_queue="q",
                                      target_queue="t").expand(source_conn_id=sources())
    (mover,) = movers_in_dag("d", _serialized(dag))
    assert mover.map_index == -1 and not mover.live and "run time" in (mover.problem or "")


def test_an_unresolvable_mover_as_its_last_run_rendered_it() -> None:
    with DAG("d", schedule=None, start_date=START) as dag:
        PgqQueueMoverOperator(task_id="m", **CONNS, source_queue="{{ params.q }}", target_queue="b")
    (mover,) = movers_in_dag("d", _serialized(dag))
    rendered = {-1: {"source_conn_id": "src", "target_conn_id": "dst", "source_queue": "real_q",
                     "target_queue": "b", "subconsumer": ""}}
    (resolved,) = with_rendered_values(mover, "run_7", rendered)
    assert resolved.live and resolved.source_queue == "real_q" and resolved.rendered_from == "run_7"
    assert resolved.consumer_name == "d.m"
    mapped = with_rendered_values(mover, "run_8", {1: {**rendered[-1], "source_conn_id": "b"}, 0: rendered[-1]})
    assert [(m.key, m.source_conn_id) for m in mapped] == [("d.m[0]", "src"), ("d.m[1]", "b")]
    still = with_rendered_values(mover, "run_9", {-1: {**rendered[-1], "source_queue": "{{ oops }}"}})
    assert not still[0].live
