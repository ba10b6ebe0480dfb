from __future__ import annotations

from tests.helpers import mark_of, produce, queue_events, register, run_mover, simple_events, tick


def test_moves_events_with_every_field(source, target):
    register(source, "src_q", "mover")
    events = simple_events(100)
    produce(source, "src_q", events)
    last = tick(source, "src_q")
    report = run_mover(source, target)
    assert report.events == 100
    assert report.batches >= 1
    assert report.last_tick == last
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last
    again = run_mover(source, target)
    assert again.events == 0 and again.batches == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
