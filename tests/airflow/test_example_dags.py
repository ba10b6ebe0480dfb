"""The example DAGs, run end to end through real Airflow against real databases."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path

from tests.helpers import DagRunner, produce, queue_events, register, simple_events, tick

TEST_DAGS = Path(__file__).parent / "dags"


def test_oltp_to_batch_runs_end_to_end(make_db, run_dag: DagRunner, pgqd):
    oltp = make_db(queue="eventlog")
    batch = make_db(queue="eventlog")
    pgqd.watch(oltp.dbname)
    result = run_dag("example_pgq_oltp_to_batch", {"pgq_oltp": oltp.uri(), "pgq_batch": batch.uri()})
    assert result["state"] == "success", result["log"][-3000:]
    # first run registers the consumer: events before that are not its business
    produce(oltp, "eventlog", simple_events(500))
    result = run_dag("example_pgq_oltp_to_batch", {"pgq_oltp": oltp.uri(), "pgq_batch": batch.uri()},
                     logical_date="2026-06-01T13:00:00+00:00")
    assert result["state"] == "success", result["log"][-3000:]
    report = result["xcom"]["move_eventlog[-1]"]
    assert report["events"] == 500
    assert queue_events(batch, "eventlog") == queue_events(oltp, "eventlog")
    # the same run once more (a clear): nothing new, nothing twice
    result = run_dag("example_pgq_oltp_to_batch", {"pgq_oltp": oltp.uri(), "pgq_batch": batch.uri()},
                     logical_date="2026-06-01T13:00:00+00:00")
    assert result["state"] == "success" and result["xcom"]["move_eventlog[-1]"]["events"] == 0
    assert queue_events(batch, "eventlog") == queue_events(oltp, "eventlog")


def _conns(**servers) -> dict[str, str]:
    return {k: v.uri() for k, v in servers.items()}


def test_partition_consolidation_three_partitions_one_down(make_db, run_dag: DagRunner, pgqd):
    parts = [make_db(queue="events") for _ in range(3)]
    central = make_db(queue="events_all")
    pgqd.watch(*(p.dbname for p in parts))
    conns = {f"pgq_part_{i}": p.uri() for i, p in enumerate(parts)}
    conns["pgq_central"] = central.uri()
    first = run_dag("example_pgq_partition_consolidation", conns)  # registers the consumers
    assert first["state"] == "success", first["log"][-3000:]
    for i, p in enumerate(parts):
        produce(p, "events", simple_events(200 + i, prefix=f"p{i}"))
    result = run_dag("example_pgq_partition_consolidation", conns, logical_date="2026-06-01T12:15:00+00:00")
    assert result["state"] == "success", result["log"][-3000:]
    expected: Counter = Counter()
    for p in parts:
        expected += queue_events(p, "events")
    assert queue_events(central, "events_all") == expected
    assert sum(expected.values()) == 603
    summary = result["xcom"]["report_central[-1]"]
    assert summary == {"partitions_moved": 3, "partitions_failed": [], "events_moved": 603, "central_events": 603}

    # partition 1 goes down: only its own mapped task fails, the others still move
    for i, p in enumerate(parts):
        produce(p, "events", simple_events(10, start=1000, prefix=f"q{i}"))
    conns["pgq_part_1"] = "postgresql://nobody:secret@127.0.0.1:1/none"
    down = run_dag("example_pgq_partition_consolidation", conns, logical_date="2026-06-01T12:30:00+00:00")
    tasks = down["tasks"]
    assert tasks["move_partition[1]"] == "failed"
    assert tasks["move_partition[0]"] == "success" and tasks["move_partition[2]"] == "success"
    assert tasks["report_central[-1]"] == "success"
    # issue 14: a failed partition fails the run (the report still ran), and the report
    # copes with the missing result without probing for it
    assert down["state"] == "failed"
    assert tasks["all_partitions_moved[-1]"] == "upstream_failed"
    report = down["xcom"]["report_central[-1]"]
    assert report["partitions_failed"] == ["pgq_part_1"] and report["partitions_moved"] == 2
    assert "XCom not found" not in down["log"]
    assert "secret" not in down["log"]
    arrived = expected + queue_events(parts[0], "events") + queue_events(parts[2], "events")
    arrived -= expected  # partitions 0 and 2 in full, partition 1 as before
    arrived += _with_prefix(expected, "p1")
    assert queue_events(central, "events_all") == arrived


def _with_prefix(events: Counter, prefix: str) -> Counter:
    return Counter({e: n for e, n in events.items() if e[0] == f"{prefix}.type"})


def test_backfill_moves_each_interval_once(make_db, run_dag: DagRunner):
    src, dst = make_db(queue="events"), make_db(queue="events")
    register(src, "events", "events_backfill_mover")
    produce(src, "events", simple_events(300, prefix="early"))
    tick(src, "events")
    time.sleep(1.2)
    middle = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.2)
    produce(src, "events", simple_events(200, prefix="late"))
    tick(src, "events")
    conns = _conns(pgq_source=src, pgq_target=dst)
    early = _with_prefix(queue_events(src, "events"), "early")

    first = run_dag("example_pgq_backfill", conns, logical_date=middle.isoformat())
    assert first["state"] == "success", first["log"][-3000:]
    assert first["xcom"]["move_interval[-1]"]["stop_reason"] == "interval_end"
    assert queue_events(dst, "events") == early

    again = run_dag("example_pgq_backfill", conns, logical_date=middle.isoformat())
    assert again["xcom"]["move_interval[-1]"]["events"] == 0
    assert queue_events(dst, "events") == early

    later = dt.datetime.now(dt.timezone.utc).isoformat()
    second = run_dag("example_pgq_backfill", conns, logical_date=later)
    assert second["xcom"]["move_interval[-1]"]["events"] == 200
    old = run_dag("example_pgq_backfill", conns, logical_date=middle.isoformat())
    assert old["state"] == "success" and old["xcom"]["move_interval[-1]"]["events"] == 0
    assert queue_events(dst, "events") == queue_events(src, "events")


def test_retry_after_injected_failure_moves_each_event_once(make_db, run_dag: DagRunner):
    src, dst = make_db(queue="src_q"), make_db(queue="dst_q", ext=True)
    register(src, "src_q", "retry_mover")
    for i in range(4):
        produce(src, "src_q", simple_events(50, start=i * 50))
        tick(src, "src_q")
    result = run_dag("pgq_test_retry", _conns(pgq_src=src, pgq_dst=dst), dags_folder=TEST_DAGS)
    assert result["state"] == "success", result["log"][-3000:]
    assert "injected at after_target_commit" in result["log"]
    report = result["xcom"]["move[-1]"]
    # the second batch reached the target before the crash: the retry finishes it only;
    # the report covers the whole run (read from the journal), with each try's part
    this = report["this_attempt"]
    assert this["skipped"] == 1 and this["batches"] == 2 and this["events"] == 100
    assert report["events"] == 200 and report["batches"] == 4 and report["skipped"] == 1
    assert [(a["try_number"], a["batches"], a["events"]) for a in report["attempts"]] == [(1, 2, 100), (2, 2, 100)]
    assert queue_events(dst, "dst_q") == queue_events(src, "src_q")
    # who applied each batch: the task instance, its try
    rows = dst.execute("select dag_id, run_id, task_id, map_index, try_number, events, job from pgq_ext.move_journal"
                       " where consumer_id = 'retry_mover' order by journal_id")
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("pgq_test_retry", "move", -1, 1, 50, None), ("pgq_test_retry", "move", -1, 1, 50, None),
        ("pgq_test_retry", "move", -1, 2, 50, None), ("pgq_test_retry", "move", -1, 2, 50, None)]
    assert len({r[1] for r in rows}) == 1 and rows[0][1]
    assert report["first_tick"] == report["attempts"][0]["first_tick"]
    assert report["last_tick"] == report["attempts"][1]["last_tick"]


def test_mapped_retry_report_counts_every_event_of_the_run_once(make_db, run_dag: DagRunner):
    """Map index 1 dies in the middle of its third batch on try 1 (two batches committed,
    the third rolled back); its retry moves the rest. Each map index's XCom counts every
    event of its run once (from the journal), with the split by try."""
    src, dst = make_db(queue="src_a"), make_db(queue="dst_q", ext=True)
    src.execute("select pgq.create_queue('src_b')")
    src.execute("select pgq.set_queue_config('src_b', 'ticker_max_count', '1')")
    for queue, consumer in (("src_a", "mover_a"), ("src_b", "mover_b")):
        register(src, queue, consumer)
    for i in range(4):
        produce(src, "src_a", simple_events(10, start=i * 10, prefix="a"))
        produce(src, "src_b", simple_events(30, start=i * 30, prefix="b"))
        tick(src, "src_a")
        tick(src, "src_b")
    result = run_dag("pgq_test_retry_mapped", _conns(pgq_src=src, pgq_dst=dst), dags_folder=TEST_DAGS)
    assert result["state"] == "success", result["log"][-3000:]
    assert "injected at mid_stream" in result["log"]
    a, b = result["xcom"]["move[0]"], result["xcom"]["move[1]"]
    assert a["events"] == 40 and a["batches"] == 4 and [x["try_number"] for x in a["attempts"]] == [1]
    assert b["events"] == 120 and b["batches"] == 4
    assert [(x["try_number"], x["batches"], x["events"]) for x in b["attempts"]] == [(1, 2, 60), (2, 2, 60)]
    assert b["this_attempt"]["events"] == 60 and b["this_attempt"]["skipped"] == 0
    assert queue_events(dst, "dst_q") == queue_events(src, "src_a") + queue_events(src, "src_b")
    assert dst.execute("select consumer_id, map_index, try_number, count(*), sum(events) from pgq_ext.move_journal"
                       " group by 1, 2, 3 order by 1, 2, 3") == [
        ("mover_a", 0, 1, 4, 40), ("mover_b", 1, 1, 2, 60), ("mover_b", 1, 2, 2, 60)]


def test_templated_fields_render_and_xcom_has_the_report(make_db, run_dag: DagRunner):
    src, dst = make_db(queue="src_q"), make_db(queue="dst_q", ext=True)
    register(src, "src_q", "mover_x")
    produce(src, "src_q", simple_events(5))
    tick(src, "src_q")
    result = run_dag("pgq_test_templated", _conns(pgq_src=src, pgq_dst=dst), dags_folder=TEST_DAGS)
    assert result["state"] == "success", result["log"][-3000:]
    report = result["xcom"]["move[-1]"]
    assert report["source_queue"] == "src_q" and report["target_queue"] == "dst_q"
    assert report["consumer_name"] == "mover_x" and report["subconsumer"] == "pgq_test_templated"
    for key in ("batches", "skipped", "events", "first_tick", "last_tick", "seconds", "lag_seconds",
                "pending_events", "stop_reason", "write_path"):
        assert key in report
    assert report["events"] == 5
    assert dst.execute("select subconsumer_id from pgq_ext.tracking_source") == [("pgq_test_templated",)]


def test_position_mismatch_fails_the_run_and_rewind_flag_recovers(make_db, run_dag: DagRunner):
    src, dst = make_db(queue="src_q"), make_db(queue="dst_q", ext=True)
    conns = _conns(pgq_src=src, pgq_dst=dst)
    register(src, "src_q", "mover")
    produce(src, "src_q", simple_events(10, prefix="a"))
    tick(src, "src_q")
    assert run_dag("pgq_test_reposition", conns, dags_folder=TEST_DAGS)["state"] == "success"
    produce(src, "src_q", simple_events(10, prefix="b"))
    tick(src, "src_q")
    src.execute("select pgq.unregister_consumer('src_q', 'mover')")
    register(src, "src_q", "mover")  # re-registered: the b events are behind it now
    produce(src, "src_q", simple_events(10, prefix="c"))
    tick(src, "src_q")
    failed = run_dag("pgq_test_reposition", conns, dags_folder=TEST_DAGS)
    assert failed["state"] == "failed"
    assert "position lost" in failed["log"] and "Rewind" in failed["log"]
    assert queue_events(dst, "dst_q") == _with_prefix(queue_events(src, "src_q"), "a")
    rewind = {"PGQ_TEST_RUN_CONF": '{"reposition": "rewind"}'}
    fixed = run_dag("pgq_test_reposition", conns, dags_folder=TEST_DAGS, env=rewind)
    assert fixed["state"] == "success", fixed["log"][-3000:]
    assert fixed["xcom"]["move[-1]"]["events"] == 20
    assert queue_events(dst, "dst_q") == queue_events(src, "src_q")
