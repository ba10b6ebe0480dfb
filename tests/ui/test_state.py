"""The state colour rule, decided without a database."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from airflow_provider_pgq.core.pending import PendingStatus
from airflow_provider_pgq.core.positions import TargetMark
from airflow_provider_pgq.ui import state as state_module
from airflow_provider_pgq.ui.state import State, classify, marks_agree, rules

SOURCE = PendingStatus(queue_name="q", consumer_name="c", registered=True, last_tick=10,
                        newest_tick=12, current_batch=None, pending_events=0, lag_seconds=5.0)
TARGET = TargetMark(target_queue="t", consumer_name="c", subconsumer="", queue_exists=True, mark=10)


def test_keeping_up() -> None:
    assert classify(SOURCE, TARGET, None) is State.KEEPING_UP
    assert marks_agree(SOURCE, TARGET) is True


def test_falling_behind_needs_pending_events_and_lag() -> None:
    late = replace(SOURCE, pending_events=5, lag_seconds=1000.0)
    assert classify(late, TARGET, None, behind_seconds=900) is State.FALLING_BEHIND
    assert classify(replace(late, pending_events=0), TARGET, None, behind_seconds=900) is State.KEEPING_UP
    assert classify(late, TARGET, None, behind_seconds=2000) is State.KEEPING_UP


def test_stopped() -> None:
    assert classify(SOURCE, TARGET, "source database: refused") is State.STOPPED
    assert classify(replace(SOURCE, registered=False), TARGET, None) is State.STOPPED
    assert classify(SOURCE, replace(TARGET, queue_exists=False), None) is State.STOPPED
    assert classify(None, TARGET, None) is State.STOPPED


def test_mismatch_but_not_for_a_batch_in_flight() -> None:
    behind = replace(TARGET, mark=8)
    assert classify(SOURCE, behind, None) is State.MISMATCH
    ahead = replace(TARGET, mark=11)
    assert classify(SOURCE, ahead, None) is State.MISMATCH
    in_flight = replace(SOURCE, current_batch=77, next_tick=11)
    assert marks_agree(in_flight, ahead) is True and classify(in_flight, ahead, None) is State.KEEPING_UP
    assert marks_agree(in_flight, replace(TARGET, mark=12)) is False  # past the open batch's end
    assert marks_agree(SOURCE, replace(TARGET, mark=None)) is None
    assert classify(SOURCE, replace(TARGET, mark=None), None) is State.KEEPING_UP


def test_unknown_before_anything_else() -> None:
    assert classify(None, None, "templated", unknown=True) is State.UNKNOWN
    assert classify(SOURCE, replace(TARGET, mark=1), None, unknown=True) is State.UNKNOWN


def test_every_state_has_its_rule_written() -> None:
    assert set(rules(900)) == {s.value for s in State}
    assert "900 s" in rules(900)[State.FALLING_BEHIND.value]


def test_every_state_has_a_colour_on_the_page() -> None:
    css = (Path(state_module.__file__).parent / "static" / "pgq.css").read_text()
    for state in State:
        assert f".state-{state.value.replace(' ', '-')} {{ background:" in css, state


# -- issue 24, point 3: a mover stuck behind a dead worker showed "keeping up" -------------

#: The issue's row: open batch 14, 604,002 pending, lag 318 s, the task up_for_retry.
STUCK_ROW = replace(SOURCE, current_batch=14, next_tick=11, pending_events=604_002, lag_seconds=318.0,
                    last_seen_seconds=318.0)


def test_an_open_batch_nobody_touched_for_longer_than_the_setting_is_stuck() -> None:
    assert classify(STUCK_ROW, TARGET, None, behind_seconds=900, stuck_seconds=300) is State.STUCK
    assert classify(STUCK_ROW, TARGET, None, behind_seconds=900, stuck_seconds=400) is State.KEEPING_UP
    young = replace(STUCK_ROW, last_seen_seconds=2.0)  # a batch being moved right now
    assert classify(young, TARGET, None, stuck_seconds=300) is State.KEEPING_UP
    # no open batch: an idle consumer is not stuck, however long since PgQ last saw it
    idle = replace(STUCK_ROW, current_batch=None, next_tick=None, pending_events=0, last_seen_seconds=9999.0)
    assert classify(idle, TARGET, None, stuck_seconds=300) is State.KEEPING_UP


def test_an_open_batch_whose_task_is_up_for_retry_or_failed_is_stuck_at_once() -> None:
    young = replace(STUCK_ROW, last_seen_seconds=2.0)
    for task_state in ("up_for_retry", "failed"):
        assert classify(young, TARGET, None, task_state=task_state) is State.STUCK, task_state
    for task_state in ("running", "success", "queued", None):
        assert classify(young, TARGET, None, task_state=task_state) is State.KEEPING_UP, task_state
    # a failed task that left no open batch: nothing is held, the lag rule decides
    assert classify(replace(SOURCE, pending_events=5, lag_seconds=1000.0), TARGET, None, behind_seconds=900,
                    task_state="failed") is State.FALLING_BEHIND


def test_stuck_comes_after_mismatch_and_before_falling_behind() -> None:
    late = replace(STUCK_ROW, lag_seconds=5000.0)
    assert classify(late, TARGET, None, behind_seconds=900, stuck_seconds=300) is State.STUCK
    assert classify(late, replace(TARGET, mark=3), None, stuck_seconds=300) is State.MISMATCH
    assert classify(late, TARGET, "source database: refused", stuck_seconds=300) is State.STOPPED
    assert classify(late, TARGET, None, stuck_seconds=300, unknown=True) is State.UNKNOWN
    order = list(rules(900, 300))
    assert order.index(State.MISMATCH.value) < order.index(State.STUCK.value) < order.index(
        State.FALLING_BEHIND.value)
    assert "300 s" in rules(900, 300)[State.STUCK.value] and "up_for_retry" in rules(900, 300)[State.STUCK.value]
