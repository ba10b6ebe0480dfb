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
