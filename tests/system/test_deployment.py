"""A real Airflow deployment, driven only through the REST API as the UI drives it.

api-server, scheduler, dag-processor and triggerer run as separate processes with the
LocalExecutor and a PostgreSQL metadata database on the throwaway cluster (see
deployment.py). The tests below run in order on one deployment; after each step the
source and target queues are compared event by event.

What dag.test() cannot show and these do: concurrent runs of one mover in a backfill
(issue 14, point 3), a run's state with a failed mapped partition (point 6), a deferred
sensor woken by the triggerer, an event-driven run created by an asset watcher, a task
marked failed or killed with SIGKILL in the middle of a drain.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import pytest

from airflow_provider_pgq.operators.turns import run_order
from tests.helpers import Server, produce, queue_events, simple_events, tick
from tests.system.conftest import PARTITION_DAG, System

pytestmark = pytest.mark.system

def _same(system: System, queue: str) -> None:
    source, target = queue_events(system.src, queue), queue_events(system.dst, queue)
    assert target == source, f"queue {queue}: {sum(source.values())} at the source, {sum(target.values())} moved"


def _exactly_once_so_far(system: System, queue: str) -> int:
    """After an interrupted drain: nothing twice, nothing the source does not hold."""
    source, target = queue_events(system.src, queue), queue_events(system.dst, queue)
    assert all(n == 1 for n in target.values()), "an event arrived twice"
    assert not (target - source), "the target holds events the source never had"
    return sum(target.values())


def _produce_ticks(server: Server, queue: str, ticks: int, per_tick: int, tag: str) -> list[int]:
    made = []
    for i in range(ticks):
        produce(server, queue, simple_events(per_tick, start=i * per_tick, prefix=f"{tag}{i}"))
        made.append(tick(server, queue))
    return made


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def _backend_gone(system: System, app: str) -> bool:
    rows = system.src.execute("select count(*) from pg_stat_activity where application_name = %s", (app,))
    return rows[0][0] == 0


def _backfill_five_days(system: System, dag_id: str, queues: tuple[str, ...]) -> tuple[list[dict[str, Any]], float]:
    """UI: Trigger -> Backfill, five daily intervals, reprocess "all runs", max active runs 5;
    40 events a day in each queue. Returns the backfill's runs once all have ended, and
    when it was created."""
    af = system.airflow
    af.unpause(dag_id)
    # catchup=False: unpausing makes one scheduled run (the latest interval); it registers
    # the consumers and finds nothing.
    first = af.wait(lambda: af.runs(dag_id), 60, f"the scheduled run of {dag_id}")[0]
    assert af.wait_run(dag_id, first["dag_run_id"]) == "success"
    # Events of five past days: one tick per day, its time moved into that day.
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    for queue in queues:
        ticks = _produce_ticks(system.src, queue, 5, 40, queue)
        for i, tick_id in enumerate(ticks):
            system.src.execute(
                "update pgq.tick set tick_time = %s where tick_id = %s"
                " and tick_queue = (select queue_id from pgq.queue where queue_name = %s)",
                (today - dt.timedelta(days=5 - i) + dt.timedelta(hours=12), tick_id, queue))
    created = time.time()
    backfill = af.api("POST", "/backfills", {
        "dag_id": dag_id,
        # Airflow 3's cron timetable: a run's data interval ends at its logical date, so
        # the runs of D-4 .. D each own the day before.
        "from_date": (today - dt.timedelta(days=4)).isoformat(),
        "to_date": today.isoformat(),
        "max_active_runs": 5,
        "reprocess_behavior": "completed",
    })

    def backfill_done() -> list[dict[str, Any]] | None:
        runs = [r for r in af.runs(dag_id) if r["run_type"] == "backfill"]
        done = len(runs) == 5 and all(r["state"] in ("success", "failed") for r in runs)
        return runs if done else None

    runs: list[dict[str, Any]] = af.wait(backfill_done, 240, f"backfill {backfill['id']} to finish", poll=1)
    assert {r["state"] for r in runs} == {"success"}
    for queue in queues:
        _same(system, queue)
    return runs, created


def _inside_interval(system: System, queue: str, run: dict[str, Any], report: dict[str, Any]) -> None:
    """The rule: never a batch ending after the run's interval."""
    if report["last_tick"] is None:
        return
    tick_time = system.src.execute(
        "select t.tick_time from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s and t.tick_id = %s", (queue, report["last_tick"]))[0][0]
    assert tick_time <= _parse(run["data_interval_end"]), (run, report)


def _one_at_a_time(spans: list[tuple[dt.datetime | None, dt.datetime | None]]) -> None:
    spans = sorted(spans, key=lambda span: (span[0] is None, span[0]))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end is not None and start is not None and end <= start, f"two movers ran at once: {spans}"


def test_backfill_runs_the_mover_one_at_a_time_each_inside_its_interval(system: System) -> None:
    af = system.airflow
    runs, _ = _backfill_five_days(system, "pgq_sys_backfill", ("bf",))
    spans, moved = [], 0
    for run in runs:
        ti = af.task_instance("pgq_sys_backfill", run["dag_run_id"], "move")
        spans.append((_parse(ti["start_date"]), _parse(ti["end_date"])))
        report = af.xcom("pgq_sys_backfill", run["dag_run_id"], "move")
        moved += report["events"]
        _inside_interval(system, "bf", run, report)
    assert moved == 200
    _one_at_a_time(spans)


def test_backfill_of_a_mapped_mover_runs_each_map_index_one_at_a_time(system: System) -> None:
    """Issue 24 point 2: .partial() never ran the operator's max_active_tis_per_dag=1, so the
    five runs' instances of one map index drained at once. Now each map index moves one run
    at a time, oldest run first (the others are rescheduled), so each run moves exactly its
    own day; the two map indexes side by side."""
    af = system.airflow
    queues = ("bm0", "bm1")
    runs, created = _backfill_five_days(system, "pgq_sys_backfill_mapped", queues)
    # Each instance's drain, as the mover itself recorded it (after its turn was given);
    # not the first drain of the scheduled run the backfill then reprocessed.
    lines = (system.work / "spans.jsonl").read_text().splitlines()
    drains = [d for d in map(json.loads, lines) if d["began"] >= created]
    for map_index, queue in enumerate(queues):
        # (a retry after Airflow's reschedule race, operators/turns.py, drains again: counted too)
        mine = sorted((d for d in drains if d["map_index"] == map_index), key=lambda d: d["began"])
        order = list(dict.fromkeys(d["run_id"] for d in mine))  # each run at its first drain
        assert len(order) == 5, f"map index {map_index}: {mine}"
        assert order == sorted(order, key=run_order), f"map index {map_index}: not oldest first: {order}"
        _one_at_a_time([(dt.datetime.fromtimestamp(d["began"], dt.timezone.utc),
                         dt.datetime.fromtimestamp(d["ended"], dt.timezone.utc)) for d in mine])
        moved = 0
        for run in runs:
            report = af.xcom("pgq_sys_backfill_mapped", run["dag_run_id"], "move", map_index)
            assert report["events"] == 40, (map_index, run["dag_run_id"], report)
            moved += report["events"]
            _inside_interval(system, queue, run, report)
        assert moved == 200, f"map index {map_index} moved {moved}"


def test_trigger_then_clear_moves_nothing_twice(system: System) -> None:
    af = system.airflow
    af.unpause("pgq_sys_drain")
    _produce_ticks(system.src, "dr", 2, 50, "dr_a")
    run_id = af.trigger("pgq_sys_drain")
    assert af.wait_run("pgq_sys_drain", run_id) == "success"
    _same(system, "dr")
    assert af.xcom("pgq_sys_drain", run_id, "move")["events"] == 100
    # UI: the task -> Clear (only this task) -> it runs again
    af.api("POST", "/dags/pgq_sys_drain/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_id, "task_ids": ["move"], "only_failed": False,
    })
    af.wait(lambda: af.task_instance("pgq_sys_drain", run_id, "move")["try_number"] >= 2
            and af.run_state("pgq_sys_drain", run_id) == "success", 90, "the cleared run to finish")
    # the report covers the task instance's tries: the clear (try 2) moved nothing
    report = af.xcom("pgq_sys_drain", run_id, "move")
    assert report["this_attempt"]["events"] == 0 and report["events"] == 100
    assert [(a["try_number"], a["events"]) for a in report["attempts"]] == [(1, 100)]
    _same(system, "dr")


def _interrupt_mid_drain(system: System, tag: str, interrupt: Any) -> None:
    af = system.airflow
    _produce_ticks(system.src, "dr", 15, 10, tag)
    run_id = af.trigger("pgq_sys_drain")
    before = _exactly_once_so_far(system, "dr")
    af.wait(lambda: (ti := af.task_instance("pgq_sys_drain", run_id, "move"))["state"] == "running"
            and ti["pid"] and _exactly_once_so_far(system, "dr") > before, 90, "the first batch of the drain")
    interrupt(af.task_instance("pgq_sys_drain", run_id, "move"), run_id)
    af.wait(lambda: af.task_instance("pgq_sys_drain", run_id, "move")["state"] == "failed", 90,
            "the task to be failed")
    af.wait(lambda: _backend_gone(system, "airflow:pgq_sys_drain.move"), 60, "the task's sessions to end")
    partial = _exactly_once_so_far(system, "dr")
    assert partial < sum(queue_events(system.src, "dr").values()), "the drain was not interrupted"
    # the stopped try wrote no XCom; the target's journal holds what it moved, under its run and try
    (events, tries), = system.dst.execute(
        "select coalesce(sum(events), 0), array_agg(distinct try_number) from pgq_ext.move_journal"
        " where consumer_id = 'dr_mover' and run_id = %s", (run_id,))
    assert (int(events), tries) == (partial - before, [1])
    assert af.wait_run("pgq_sys_drain", af.trigger("pgq_sys_drain")) == "success"
    _same(system, "dr")


def test_mark_a_running_mover_failed(system: System) -> None:
    """UI: a running task -> Mark state as failed: the worker is stopped mid-drain."""
    af = system.airflow

    def mark_failed(ti: dict[str, Any], run_id: str) -> None:
        af.api("PATCH", f"/dags/pgq_sys_drain/dagRuns/{run_id}/taskInstances/move", {"new_state": "failed"})

    _interrupt_mid_drain(system, "dr_b", mark_failed)


def test_kill_9_a_running_mover(system: System) -> None:
    def kill(ti: dict[str, Any], run_id: str) -> None:
        os.kill(int(ti["pid"]), signal.SIGKILL)

    _interrupt_mid_drain(system, "dr_c", kill)


def test_deferred_sensor_is_woken_by_the_triggerer(system: System) -> None:
    af = system.airflow
    af.unpause("pgq_sys_sensor")
    run_id = af.trigger("pgq_sys_sensor")
    af.wait(lambda: af.task_instance("pgq_sys_sensor", run_id, "wait")["state"] == "deferred", 90,
            "the sensor to defer")
    _produce_ticks(system.src, "sn", 1, 25, "sn")
    assert af.wait_run("pgq_sys_sensor", run_id) == "success"
    assert af.xcom("pgq_sys_sensor", run_id, "move")["events"] == 25
    _same(system, "sn")


def test_asset_watcher_creates_an_event_driven_run(system: System) -> None:
    af = system.airflow
    af.unpause("pgq_sys_event")
    af.wait(lambda: not _backend_gone(system, "airflow-pgq-trigger"), 90, "the triggerer to watch queue ed")
    _produce_ticks(system.src, "ed", 1, 15, "ed")

    def moved_run() -> dict[str, Any] | None:
        done = [r for r in af.runs("pgq_sys_event") if r["state"] == "success"]
        return done[0] if done else None

    run = af.wait(moved_run, 120, "an asset-triggered run of pgq_sys_event")
    assert run["run_type"] == "asset_triggered"
    _same(system, "ed")


def test_a_failed_partition_fails_the_run_and_the_report_still_runs(system: System) -> None:
    af = system.airflow
    af.unpause(PARTITION_DAG)  # catchup=False: one scheduled run, which registers the consumers
    first = af.wait(lambda: af.runs(PARTITION_DAG), 60, "the scheduled partition run")[0]["dag_run_id"]
    assert af.wait_run(PARTITION_DAG, first) == "failed"
    for i, part in enumerate(system.parts):
        produce(part, "events", simple_events(30 + i, prefix=f"part{i}"))
    run_id = af.trigger(PARTITION_DAG)
    assert af.wait_run(PARTITION_DAG, run_id) == "failed"
    states = {(t["task_id"], t["map_index"]): t["state"] for t in af.task_instances(PARTITION_DAG, run_id)}
    assert states[("move_partition", 0)] == "success" and states[("move_partition", 1)] == "success"
    assert states[("move_partition", 2)] == "failed"
    assert states[("report_central", -1)] == "success"
    assert states[("all_partitions_moved", -1)] == "upstream_failed"
    report = af.xcom(PARTITION_DAG, run_id, "report_central")
    assert report["partitions_failed"] == ["pgq_part_down"] and report["events_moved"] == 61
    expected: Counter[Any] = Counter()
    for part in system.parts:
        expected += queue_events(part, "events")
    assert queue_events(system.central, "events_all") == expected
    logs = subprocess.run(["grep", "-rl", "XCom not found", str(af.home / "logs")],
                          capture_output=True, text=True).stdout
    assert PARTITION_DAG not in logs, logs
