"""Edges of the protocol found in review: a target rotation during a batch, a reset
retried after the batch reached the target, two keys fed by one source consumer."""

from __future__ import annotations

import pytest

from airflow_provider_pgq.core import faults, pgq
from airflow_provider_pgq.core.errors import TrackingKeyConflict
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.helpers import Server, produce, queue_events, register, run_mover, simple_events, tick


class Crash(RuntimeError):
    pass


def consume_all(server: Server, queue: str, consumer: str) -> list[str]:
    """What a PgQ consumer of the queue receives, batch by batch."""
    conn = server.connect()
    out: list[str] = []
    try:
        while (batch := pgq.next_batch_info(conn, queue, consumer)) is not None:
            with conn.cursor() as cur:
                cur.execute("select ev_data from pgq.get_batch_events(%s)", (batch.batch_id,))
                out += [r[0] for r in cur.fetchall()]
            pgq.finish_batch(conn, batch.batch_id)
            conn.commit()
        conn.commit()
    finally:
        conn.close()
    return out


def test_target_rotation_during_a_batch_loses_nothing(source: Server, target: Server) -> None:
    register(target, "dst_q", "reader")
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(2, prefix="first"))
    tick(source, "src_q")
    run_mover(source, target)
    tick(target, "dst_q")
    assert len(consume_all(target, "dst_q", "reader")) == 2
    produce(source, "src_q", simple_events(3, prefix="second"))
    tick(source, "src_q")

    def rotate_mid_stream(point: str) -> None:
        """What pgqd's maintenance does, at the worst moment of the batch."""
        if point != faults.MID_STREAM:
            return
        target.execute(
            "update pgq.queue set queue_rotation_period = '1 second',"
            " queue_switch_time = now() - interval '1 hour' where queue_name = 'dst_q'"
        )
        target.execute("select pgq.maint_rotate_tables_step1('dst_q')")
        target.execute("select pgq.maint_rotate_tables_step2()")
        tick(target, "dst_q")

    s, t = source.connect(), target.connect()
    try:
        report = QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover"), fault=rotate_mid_stream).drain()
    finally:
        s.close()
        t.close()
    assert report.events == 3
    assert target.execute("select queue_cur_table from pgq.queue where queue_name = 'dst_q'") == [(1,)]
    tick(target, "dst_q")
    tick(target, "dst_q")
    assert sorted(consume_all(target, "dst_q", "reader")) == sorted(e[1] for e in simple_events(3, prefix="second"))


def test_reset_retried_after_the_target_commit_applies_nothing_twice(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")

    def crash(point: str) -> None:
        if point == faults.AFTER_TARGET_COMMIT:
            raise Crash(point)

    options = MoverOptions("src_q", "dst_q", "mover")
    s, t = source.connect(), target.connect()
    try:
        with pytest.raises(Crash):
            QueueMover(s, t, options, fault=crash).drain()
        # the retry of a run that resets first (operator reposition="reset")
        mover = QueueMover(s, t, options)
        mover.reset()
        report = mover.drain()
    finally:
        s.close()
        t.close()
    assert report.skipped == 1 and report.events == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_one_source_consumer_cannot_feed_two_keys(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(4))
    tick(source, "src_q")
    run_mover(source, target, subconsumer="a")
    produce(source, "src_q", simple_events(4, start=10))
    tick(source, "src_q")
    before = queue_events(target, "dst_q")
    with pytest.raises(TrackingKeyConflict, match="one source consumer"):
        run_mover(source, target, subconsumer="b")
    assert queue_events(target, "dst_q") == before
