"""Catching up by default: pending ticks coalesced into batches of about
batch_target_events, exactly the right ticks, never past the interval end.

(The other tests' helpers move one tick a batch, tests.helpers.CLASSIC_BATCHES; these
pass batch_target_events themselves.)"""

from __future__ import annotations

import datetime as dt

from airflow_provider_pgq.core.mover import DEFAULT_BATCH_TARGET_EVENTS, DrainBounds
from tests.helpers import (
    Server,
    mark_of,
    produce,
    queue_events,
    register,
    run_mover,
    simple_events,
    tick,
    tick_time,
)


def _ticks(source: Server, count: int, per_tick: int) -> list[int]:
    ticks = []
    for i in range(count):
        produce(source, "src_q", simple_events(per_tick, start=i * per_tick))
        ticks.append(tick(source, "src_q"))
    return ticks


def _open_batch(source: Server) -> object:
    return source.execute("select current_batch from pgq.get_consumer_info('src_q', 'mover')")[0][0]


def test_a_backlog_of_small_ticks_moves_in_few_batches_of_the_target_size(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks = _ticks(source, 30, 100)
    report = run_mover(source, target, batch_target_events=1000)
    sizes = [r.events for r in report.batch_results]
    assert sum(sizes) == 3000 and queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert all(size <= 1000 for size in sizes), sizes
    assert len(sizes) <= 6, sizes  # one tick a batch would be 30
    assert mark_of(target, "mover") == ticks[-1]
    # the batches are consecutive tick ranges that cover every tick once
    ranges = [(r.prev_tick_id, r.cur_tick_id) for r in report.batch_results]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert _open_batch(source) is None


def test_one_pending_tick_is_one_batch(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    _ticks(source, 1, 50)
    report = run_mover(source, target, batch_target_events=DEFAULT_BATCH_TARGET_EVENTS)
    assert [r.events for r in report.batch_results] == [50]
    first = report.batch_results[0]
    assert first.cur_tick_id == mark_of(target, "mover")


def test_target_of_one_takes_one_tick_a_batch_as_the_classic_tool(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    _ticks(source, 5, 10)
    report = run_mover(source, target, batch_target_events=1)
    assert [r.events for r in report.batch_results] == [10] * 5


def test_coalesced_batches_never_end_after_the_interval_end(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks = _ticks(source, 12, 100)
    stop_at = tick_time(source, "src_q", ticks[7])
    inside = queue_events(source, "src_q")  # all events so far, to split below
    report = run_mover(source, target, bounds=DrainBounds(stop_at=stop_at), batch_target_events=100_000)
    assert report.stop_reason == "interval_end"
    assert mark_of(target, "mover") == ticks[7]
    assert report.events == 800 and sum(queue_events(target, "dst_q").values()) == 800
    assert _open_batch(source) is None  # nothing allocated across the interval end
    # the rest moves on the next run, once
    rest = run_mover(source, target, batch_target_events=100_000)
    assert rest.events == 400 and queue_events(target, "dst_q") == inside


def test_a_tick_after_the_interval_end_is_not_allocated(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    _ticks(source, 2, 10)
    before = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    report = run_mover(source, target, bounds=DrainBounds(stop_at=before),
                       batch_target_events=DEFAULT_BATCH_TARGET_EVENTS)
    assert report.stop_reason == "interval_end" and report.events == 0
    assert _open_batch(source) is None


def test_max_events_per_second_paces_the_catch_up(source: Server, target: Server) -> None:
    """A cap of 1,000 events a second over 3,000 pending events: batches of at most a
    second's worth, and the drain lasts at least the three seconds the cap allows (a
    lower bound the pauses guarantee on any machine); everything arrives once."""
    register(source, "src_q", "mover")
    _ticks(source, 30, 100)
    report = run_mover(source, target, batch_target_events=DEFAULT_BATCH_TARGET_EVENTS,
                       max_events_per_second=1000)
    sizes = [r.events for r in report.batch_results]
    assert sum(sizes) == 3000 and max(sizes) <= 1000 and len(sizes) >= 3, sizes
    assert report.seconds >= 2.9, report.seconds
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_max_events_per_second_must_be_a_rate() -> None:
    from airflow_provider_pgq.core.errors import InvalidParameter
    from airflow_provider_pgq.core.mover import MoverOptions

    for bad in (0, -5, float("nan"), float("inf"), True):
        try:
            MoverOptions("q", "q2", "c", max_events_per_second=bad)
        except InvalidParameter as exc:
            assert "max_events_per_second must be a finite number of events a second above zero" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")
