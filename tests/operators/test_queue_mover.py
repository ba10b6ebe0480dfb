"""PgqQueueMoverOperator and the mover core on issue 14's points 2-4, against real
PostgreSQL with PgQ and real Airflow (dag.test in a subprocess, real metadata DB)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
from tests.core.test_poison_events import make_sql_ascii_db  # noqa: F401 - a fixture, for getfixturevalue
from tests.helpers import DagRunner, produce, queue_events, register, run_mover, simple_events, tick

DAGS = Path(__file__).parent / "dags"
MOVER_LOG = "airflow_provider_pgq.core.mover"
REGISTRATION_LOG = "airflow_provider_pgq.core.registration"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name in (MOVER_LOG, REGISTRATION_LOG) and r.levelno >= logging.WARNING]


# -- point 2: events queued before the first run ------------------------------------------


def test_register_now_warns_with_the_count_of_events_it_will_never_see(source, target, caplog):
    produce(source, "src_q", simple_events(1234))
    tick(source, "src_q")
    produce(source, "src_q", simple_events(5, start=5000))  # not ticked yet: the consumer sees these
    caplog.set_level(logging.INFO, logger=MOVER_LOG)
    caplog.set_level(logging.INFO, logger=REGISTRATION_LOG)
    report = run_mover(source, target, register_consumer=True)
    assert report.events == 0
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "1234 events the queue already holds" in warned[0] and "'src_q'" in warned[0]
    assert "register_at='oldest'" in warned[0]
    tick(source, "src_q")
    assert run_mover(source, target).events == 5


def test_register_oldest_moves_what_the_queue_still_holds(source, target, caplog):
    produce(source, "src_q", simple_events(700))
    tick(source, "src_q")
    produce(source, "src_q", simple_events(300, start=700))
    tick(source, "src_q")
    caplog.set_level(logging.INFO, logger=MOVER_LOG)
    caplog.set_level(logging.INFO, logger=REGISTRATION_LOG)
    report = run_mover(source, target, register_consumer=True, register_at="oldest")
    assert report.events == 1000
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert _warnings(caplog) == []


def test_register_oldest_never_moves_an_existing_registration(source, target):
    """register_at only applies to a new consumer: an existing one keeps its position."""
    produce(source, "src_q", simple_events(10))
    tick(source, "src_q")
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(4, start=10))
    tick(source, "src_q")
    assert run_mover(source, target, register_consumer=True, register_at="oldest").events == 4


def test_register_at_is_checked():
    with pytest.raises(InvalidParameter, match="register_at must be one of 'now', 'oldest'"):
        MoverOptions("a", "b", "c", register_at="first")


def test_operator_register_at_oldest_through_airflow(source, target, run_dag: DagRunner, tmp_path):
    produce(source, "src_q", simple_events(250))
    tick(source, "src_q")
    result = run_dag("pgq_test_register_oldest", {"pgq_src": source.uri(), "pgq_dst": target.uri()},
                     dags_folder=DAGS)
    assert result["state"] == "success", result["log"][-3000:]
    assert result["xcom"]["move[-1]"]["events"] == 250
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


# -- point 3: concurrent runs of one mover ------------------------------------------------


def test_mover_task_serializes_itself_by_default():
    kw = dict(source_conn_id="s", target_conn_id="t", source_queue="q", target_queue="q")
    assert PgqQueueMoverOperator(task_id="a", **kw).max_active_tis_per_dag == 1
    assert PgqQueueMoverOperator(task_id="b", max_active_tis_per_dag=4, **kw).max_active_tis_per_dag == 4


def test_racing_runs_of_one_mover_log_info_and_stay_exact(source, target, caplog):
    """Two runs handed the same open batch (what two concurrent DAG runs do): one applies
    it, the other finds it applied; neither is a WARNING, and the target holds it once."""
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(40))
    tick(source, "src_q")
    options = MoverOptions("src_q", "dst_q", "mover")
    conns = [source.connect(), target.connect(), source.connect(), target.connect()]
    caplog.set_level(logging.INFO, logger=MOVER_LOG)
    try:
        first, second = QueueMover(conns[0], conns[1], options), QueueMover(conns[2], conns[3], options)
        batch_a, batch_b = first.next_batch(), second.next_batch()
        assert batch_a is not None and batch_b is not None and batch_a.batch_id == batch_b.batch_id
        assert first.apply_batch(batch_a).outcome == "moved"
        assert second.apply_batch(batch_b).outcome == "skipped"
    finally:
        for c in conns:
            c.close()
    assert _warnings(caplog) == []
    said = " ".join(r.getMessage() for r in caplog.records if r.name == MOVER_LOG)
    assert "concurrent run of the same mover" in said
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


# -- point 4: asset events only when events moved -----------------------------------------


def test_outlet_asset_event_only_when_events_moved_with_the_report(source, target, run_dag: DagRunner):
    register(source, "src_q", "outlet_mover")
    conns = {"pgq_src": source.uri(), "pgq_dst": target.uri()}
    empty = run_dag("pgq_test_outlet", conns, dags_folder=DAGS)
    assert empty["state"] == "success", empty["log"][-3000:]
    assert empty["xcom"]["move[-1]"]["events"] == 0
    assert empty["asset_events"] == []
    produce(source, "src_q", simple_events(77))
    tick(source, "src_q")
    moved = run_dag("pgq_test_outlet", conns, dags_folder=DAGS, logical_date="2026-06-01T13:00:00+00:00")
    assert moved["state"] == "success", moved["log"][-3000:]
    [event] = moved["asset_events"]
    assert event["uri"] == "pgq://pgq_dst/dst_q"
    extra = event["extra"]
    assert extra["events"] == 77 and extra["batches"] >= 1 and extra["consumer_name"] == "outlet_mover"
    assert extra["last_tick"] > extra["first_tick"]


# -- issue 13: the outlet Asset is built at parse time, before templates are rendered ------


@pytest.mark.parametrize("templated", [
    {"target_conn_id": "{{ var.value.pgq_target }}"},
    {"target_queue": "{{ params.queue }}"},
    {"target_queue": "dst_{% if true %}q{% endif %}"},
])
def test_outlet_asset_refuses_templated_target(templated):
    kwargs = {"task_id": "m", "source_conn_id": "s", "target_conn_id": "pgq_dst", "source_queue": "src_q",
              "target_queue": "dst_q", "consumer_name": "c", **templated}
    name = next(iter(templated))
    with pytest.raises(InvalidParameter, match=f"outlet_asset=True needs a plain {name}.*before templates"):
        PgqQueueMoverOperator(outlet_asset=True, **kwargs)
    # without the outlet the same templates are fine: they are rendered at run time
    mover = PgqQueueMoverOperator(**kwargs)
    assert getattr(mover, name) == templated[name] and not mover.outlets
    plain = PgqQueueMoverOperator(**{**kwargs, "target_conn_id": "pgq_dst", "target_queue": "dst_q"},
                                  outlet_asset=True)
    assert [o.uri for o in plain.outlets] == ["pgq://pgq_dst/dst_q"]


def test_invalid_events_is_checked_when_the_dag_is_parsed():
    with pytest.raises(InvalidParameter, match="invalid_events must be one of 'stop', 'dead_letter'"):
        PgqQueueMoverOperator(task_id="m", source_conn_id="s", target_conn_id="t", source_queue="a",
                              target_queue="b", invalid_events="ignore")
    op = PgqQueueMoverOperator(task_id="m", source_conn_id="s", target_conn_id="t", source_queue="a",
                               target_queue="b", invalid_events="dead_letter")
    assert op.mover_options().invalid_events == "dead_letter"


def test_poison_events_through_airflow_stop_then_dead_letter_in_xcom(request, target, run_dag: DagRunner):
    """Issue 24: the default fails the task with the one line; invalid_events="dead_letter"
    moves the rest, and the run's XCom report counts the dead-lettered events."""
    from tests.core.test_poison_events import batch_of, dead_letters, target_events

    source = request.getfixturevalue("make_sql_ascii_db")("src_q")
    register(source, "src_q", "mover")
    ids, prev, cur = batch_of(source)
    conns = {"pgq_src": source.uri(), "pgq_dst": target.uri()}
    stopped = run_dag("pgq_test_poison_stop", conns, dags_folder=DAGS)
    assert stopped["state"] == "failed"
    assert f"ev_id {ids[1]} (22021" in stopped["log"] and f"ticks {prev}..{cur}" in stopped["log"]
    assert "invalid_events = dead_letter" in stopped["log"]
    moved = run_dag("pgq_test_poison_dead_letter", conns, dags_folder=DAGS)
    assert moved["state"] == "success", moved["log"][-3000:]
    report = moved["xcom"]["move[-1]"]
    assert (report["events"], report["dead_lettered"], report["last_tick"]) == (3, 2, cur)
    assert len(target_events(target)) == 3 and [d[0] for d in dead_letters(target)] == [ids[1], ids[3]]
