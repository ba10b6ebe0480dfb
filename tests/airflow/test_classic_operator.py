"""The operator's table_filter (and keep_lag) through a real DAG run: events of other
tables are consumed, counted as filtered and never moved; a retry after a crash in the
middle of a batch moves the named tables' events exactly once."""

from __future__ import annotations

import time

from tests.airflow.test_example_dags import TEST_DAGS
from tests.helpers import DagRunner, produce, queue_events, register, tick

TABLES3 = ("public.orders", "public.users", "public.audit")


def test_operator_table_filter_survives_a_crash_mid_batch(make_db, run_dag: DagRunner) -> None:
    src, dst = make_db(queue="src_q"), make_db(queue="dst_q", ext=True)
    register(src, "src_q", "filter_mover")
    for b in range(3):
        produce(src, "src_q", [("I:id", f"{b}-{i}", TABLES3[i % 3], None, None, None) for i in range(30)])
        tick(src, "src_q")
    time.sleep(1.2)  # keep_lag=1s: the ticks are old enough now
    result = run_dag("pgq_test_table_filter", {"pgq_src": src.uri(), "pgq_dst": dst.uri()},
                     dags_folder=TEST_DAGS)
    assert result["state"] == "success", result["log"][-3000:]
    assert "injected mid-stream crash" in result["log"]
    report = result["xcom"]["move[-1]"]
    assert (report["events"], report["filtered"]) == (60, 30)
    got = queue_events(dst, "dst_q")
    want = {e: c for e, c in queue_events(src, "src_q").items() if e[2] in ("public.orders", "public.users")}
    assert got == want and max(got.values()) == 1
    pending = src.execute("select pending_events, current_batch from pgq.get_consumer_info('src_q', 'filter_mover')")
    assert pending == [(0, None)]
