"""Switching movers mid-stream: the CLI and the operator share the tracking key
(consumer name, subconsumer '') and one core, so either continues the other."""

from __future__ import annotations

from pathlib import Path

from tests.airflow.test_example_dags import TEST_DAGS
from tests.helpers import DagRunner, Server, mark_of, produce, queue_events, register, simple_events, tick
from tests.test_cli import base_keys, run_cli, write_ini


def _batches(source: Server, prefix: str, n: int = 3) -> None:
    for i in range(n):
        produce(source, "src_q", simple_events(40, start=i * 40, prefix=f"{prefix}{i}"))
        tick(source, "src_q")


def test_cli_then_operator_then_cli(make_db, run_dag: DagRunner, tmp_path: Path) -> None:
    source, target = make_db(queue="src_q"), make_db(queue="dst_q", ext=True)
    conns = {"pgq_src": source.uri(), "pgq_dst": target.uri()}
    ini = write_ini(tmp_path / "mover.ini", base_keys(source, target, "mover", max_batches=2, batch_target_events=1))
    register(source, "src_q", "mover")
    _batches(source, "a")

    # the CLI moves two of three batches, the operator (same consumer name) the rest
    assert run_cli("--once", ini).returncode == 0
    assert 0 < sum(queue_events(target, "dst_q").values()) < 120
    dag = run_dag("pgq_test_reposition", conns, dags_folder=TEST_DAGS)
    assert dag["state"] == "success", dag["log"][-3000:]
    assert dag["xcom"]["move[-1]"]["events"] == 40
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")

    # and the reverse: the operator moved last, the CLI continues from its mark
    _batches(source, "b")
    before = mark_of(target, "mover")
    assert run_cli("--once", ini).returncode == 0
    assert run_cli("--once", ini).returncode == 0
    assert mark_of(target, "mover") > before
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert max(queue_events(target, "dst_q").values()) == 1
