"""The order in which the runs of one mover take their turns (operators/turns.py); the
turns themselves are taken by real task instances in tests/system/test_deployment.py."""

from __future__ import annotations

from airflow_provider_pgq.operators.turns import ahead_of, run_order

D3, D4, D5 = (f"backfill__2026-12-0{d}T00:00:00+00:00" for d in (3, 4, 5))


def test_runs_are_ordered_by_their_timestamp_whatever_their_kind() -> None:
    runs = ["scheduled__2026-12-07T00:00:00+00:00", "manual__2026-12-06T10:00:00+00:00", D3, "my_run"]
    assert sorted(runs, key=run_order) == [D3, "manual__2026-12-06T10:00:00+00:00",
                                           "scheduled__2026-12-07T00:00:00+00:00", "my_run"]


def test_a_running_instance_goes_first_whichever_run_it_belongs_to() -> None:
    assert ahead_of(D3, {D3: "running", D5: "running"}) == [D5]
    assert ahead_of(D5, {D3: "running", D5: "running"}) == [D3]  # both step back: never two at once


def test_an_earlier_run_waiting_to_run_goes_first_a_later_one_does_not() -> None:
    for state in ("scheduled", "queued", "up_for_reschedule", "up_for_retry"):
        assert ahead_of(D4, {D3: state, D4: "running", D5: state}) == [D3], state


def test_finished_or_not_yet_scheduled_instances_are_not_waited_for() -> None:
    for state in ("success", "failed", "skipped", "upstream_failed", "deferred", None):
        assert ahead_of(D5, {D3: state, D4: state}) == [], state
