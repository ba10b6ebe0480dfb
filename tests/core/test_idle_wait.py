"""An idle loop sleeps until just after the next tick is due at the queue's recent pace
(QueueMover.idle_wait), at most loop_delay; loop_delay when the pace is unknown or the
queue went quiet. Ticks made 0.3 s apart by the test give the pace."""

from __future__ import annotations

import time

from airflow_provider_pgq.core.mover import IDLE_POLL_MARGIN, MoverOptions, QueueMover
from tests.helpers import Server, produce, register, simple_events, tick


def _mover(source: Server, target: Server) -> QueueMover:
    return QueueMover(source.connect(), target.connect(), MoverOptions("src_q", "dst_q", "mover"))


def test_the_idle_wait_follows_the_tick_pace(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    mover = _mover(source, target)
    try:
        assert mover.drain().events == 0
        assert mover.idle_wait(1.0) == 1.0  # one tick only: no pace yet
        for n in range(5):
            produce(source, "src_q", simple_events(1, start=n))
            tick(source, "src_q")
            time.sleep(0.3)
        started = time.monotonic()
        assert mover.drain().events == 5
        assert mover.drain().events == 0  # the idle poll that reads the pace
        wait = mover.idle_wait(1.0)
        # the newest tick is about 0.3 s old and due again about 0.3 s after it: a short
        # wait (or, on a slow machine that is past due, a short retry), never loop_delay
        assert 0 < wait <= 0.3 + IDLE_POLL_MARGIN + 0.05, wait
        assert mover.idle_wait(0.01) == 0.01  # never longer than loop_delay
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        assert mover.drain().events == 0
        assert mover.idle_wait(1.0) == 1.0  # quiet for more than an interval: loop_delay
    finally:
        mover.source.close()
        mover.target.close()
