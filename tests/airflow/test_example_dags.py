"""The example DAGs, run end to end through real Airflow against real databases."""

from __future__ import annotations

from tests.airflow.conftest import DagRunner
from tests.helpers import produce, queue_events, simple_events


def test_oltp_to_batch_runs_end_to_end(make_db, run_dag: DagRunner, pgqd):
    oltp = make_db(queue="eventlog")
    batch = make_db(queue="eventlog")
    pgqd.watch(oltp)
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
